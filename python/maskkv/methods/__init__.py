"""Eviction methods: MaskKV and the paper's baselines, TailVote (MaskKV extended), and the
FullCache / NoCache references.

A method is a small frozen dataclass = (score, layer budgets, head budgets) (DESIGN "Method ="):

==================  ===========  ===============  ====================
method              score        layer budgets    head budgets
==================  ===========  ===============  ====================
MaskKV              mask         maskkv profile   prompt_preference
SnapKV              window       uniform          uniform
PyramidKV           window       pyramid          uniform
SqueezeAttention    window       squeeze profile  uniform
AdaKV               window       uniform          adakv
TailVote            mask (tail)  maskkv profile   adakv (on the votes)
FullCache           --           whole prompt     --
NoCache             --           (recomputed)     --
==================  ===========  ===============  ====================

TailVote goes beyond the paper where MaskKV's rule loses evidence: every query the engine
recomputes at later steps votes (Dream: also the last prompt position, which predicts the first
response token), and the layer's budget is split between KV heads by those votes.

>>> from maskkv import methods
>>> m = methods.get("maskkv", budget=128)
>>> m.layer_budgets(32, 4096, methods.LayerProfile.find(model_dir))  # doctest: +SKIP
"""

from .base import Method, WindowMethod, apportion, available, get, register

# Import order = registration order = the order ``available()`` lists (the paper's tables, then
# TailVote, then the references).
from .maskkv import MaskKV  # isort: skip
from .snapkv import SnapKV  # isort: skip
from .pyramidkv import PyramidKV  # isort: skip
from .squeeze import SqueezeAttention  # isort: skip
from .adakv import AdaKV  # isort: skip
from .tailvote import TailVote  # isort: skip
from .fullcache import FullCache  # isort: skip
from .nocache import NoCache  # isort: skip
from .profile import PROFILE_FILENAME, LayerProfile, MissingProfileWarning  # isort: skip

__all__ = [
    "PROFILE_FILENAME",
    "AdaKV",
    "FullCache",
    "LayerProfile",
    "MaskKV",
    "Method",
    "MissingProfileWarning",
    "NoCache",
    "PyramidKV",
    "SnapKV",
    "SqueezeAttention",
    "TailVote",
    "WindowMethod",
    "apportion",
    "available",
    "get",
    "register",
]
