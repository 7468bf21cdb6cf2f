"""LLaDA, Dream, LLaDA2.x and LLaDA-MoE as transformers models that load the official
checkpoints unchanged.

Importing this package registers them with AutoConfig / AutoModel / AutoModelForMaskedLM (LLaDA,
LLaDA2 and LLaDA-MoE also with AutoModelForCausalLM, as their official auto_map does), so the
official checkpoints load without `trust_remote_code`.
"""

from __future__ import annotations

import os

import torch

from ._common import (
    DiffusionLMMixin,
    bidirectional_attention,
    default_position_ids,
    load_pretrained_checked,
    read_config_dict,
)
from .dream import DreamConfig, DreamModelLM
from .llada import LLaDAConfig, LLaDAModelLM
from .llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from .lladamoe import LLaDAMoEConfig, LLaDAMoEModelLM

#: config.json ``model_type`` (lower case) -> model class.
MODEL_CLASSES: dict[str, type] = {
    "llada": LLaDAModelLM,
    "dream": DreamModelLM,
    "llada2_moe": LLaDA2MoeModelLM,
    "lladamoe": LLaDAMoEModelLM,
}

#: config.json ``architectures`` entries that decide over ``model_type``: the released
#: LLaDA-MoE config.json says ``model_type: "llada"``.
ARCHITECTURES: dict[str, type] = {
    "LLaDAModelLM": LLaDAModelLM,
    "DreamModel": DreamModelLM,
    "LLaDA2MoeModelLM": LLaDA2MoeModelLM,
    "LLaDAMoEModelLM": LLaDAMoEModelLM,
}


def model_class_for(model_type: str, architectures: list[str] | None = None) -> type:
    """The model class for a config.json's ``architectures`` (a known entry wins) or, failing
    that, its ``model_type`` ("llada", "Dream", "llada2_moe", "lladamoe"; case-insensitive)."""
    for arch in architectures or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    try:
        return MODEL_CLASSES[str(model_type).lower()]
    except KeyError:
        raise ValueError(
            f"model_type: unsupported {model_type!r}; supported: 'llada', 'Dream', "
            "'llada2_moe', 'lladamoe'"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> LLaDAModelLM | DreamModelLM:
    """Load a LLaDA, Dream, LLaDA2 or LLaDA-MoE checkpoint directory (config.json +
    `model.safetensors` or sharded `model-*.safetensors` with `model.safetensors.index.json`),
    picking the class from config.json's `architectures` or `model_type` (`model_class_for`; its
    `auto_map` / remote code is never used).

    dtype: torch dtype or its name; None keeps the checkpoint's dtype. device: where to put the
    model (loaded on the CPU first). Returns the model in eval mode.
    Raises ValueError naming any missing, unexpected or mis-shaped tensor.
    """
    config = read_config_dict(path)
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"checkpoint {path}: config.json has no model_type")
    model_class = model_class_for(model_type, config.get("architectures"))
    return load_pretrained_checked(model_class, path, dtype=dtype, device=device)


__all__ = [
    "ARCHITECTURES",
    "DiffusionLMMixin",
    "DreamConfig",
    "DreamModelLM",
    "LLaDAConfig",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "LLaDAModelLM",
    "MODEL_CLASSES",
    "bidirectional_attention",
    "default_position_ids",
    "load_checkpoint",
    "model_class_for",
]
