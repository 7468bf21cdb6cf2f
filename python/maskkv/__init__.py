"""maskkv: mask-query KV-cache eviction for long-prompt diffusion LLMs (LLaDA, Dream).

>>> import maskkv
>>> model = maskkv.load_checkpoint("path/to/LLaDA-8B-Instruct")          # doctest: +SKIP
>>> out = maskkv.generate(model, ids, method=maskkv.MaskKV(budget=256),  # doctest: +SKIP
...                       gen_length=256, block_length=32, steps=256)
>>> out.sequences, out.stats.summary()                                  # doctest: +SKIP
"""

from . import methods
from .generation import (
    DLLMCache,
    DualCache,
    Factor,
    FixedSteps,
    GenerationOutput,
    PrefixCache,
    PromptCache,
    Threshold,
    generate,
)
from .methods import (
    AdaKV,
    FullCache,
    LayerProfile,
    MaskKV,
    NoCache,
    PyramidKV,
    SnapKV,
    SqueezeAttention,
    TailVote,
)
from .models import (
    DreamConfig,
    DreamModelLM,
    LLaDA2MoeConfig,
    LLaDA2MoeModelLM,
    LLaDAConfig,
    LLaDAModelLM,
    LLaDAMoEConfig,
    LLaDAMoEModelLM,
    load_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "AdaKV",
    "DLLMCache",
    "DreamConfig",
    "DreamModelLM",
    "DualCache",
    "Factor",
    "FixedSteps",
    "FullCache",
    "GenerationOutput",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "LayerProfile",
    "MaskKV",
    "NoCache",
    "PrefixCache",
    "PromptCache",
    "PyramidKV",
    "SnapKV",
    "SqueezeAttention",
    "TailVote",
    "Threshold",
    "generate",
    "load_checkpoint",
    "methods",
]
