"""Eviction methods: MaskKV and the paper's baselines, plus the FullCache / NoCache references.

A method is a small frozen dataclass = (score, layer budgets, head budgets) (DESIGN "Method ="):

==================  =======  ===============  =================
method              score    layer budgets    head budgets
==================  =======  ===============  =================
MaskKV              mask     maskkv profile   prompt_preference
SnapKV              window   uniform          uniform
PyramidKV           window   pyramid          uniform
SqueezeAttention    window   squeeze profile  uniform
AdaKV               window   uniform          adakv
TailVote            tail     maskkv profile   prompt_preference
FullCache           --       whole prompt     --
NoCache             --       (recomputed)     --
==================  =======  ===============  =================

>>> from maskkv import methods
>>> m = methods.get("maskkv", budget=128)
>>> m.layer_budgets(32, 4096, methods.LayerProfile.find(model_dir))  # doctest: +SKIP
"""

from .base import Method, WindowMethod, apportion, available, get, register

# Import order = registration order = the order ``available()`` lists (the paper's tables).
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
