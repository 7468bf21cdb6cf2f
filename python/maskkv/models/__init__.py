"""LLaDA and Dream as transformers models that load the official checkpoints unchanged.

Importing this package registers both with AutoConfig / AutoModel / AutoModelForMaskedLM (LLaDA
also with AutoModelForCausalLM, as its official auto_map does), so the official checkpoints load
without `trust_remote_code`.
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

MODEL_CLASSES: dict[str, type] = {"llada": LLaDAModelLM, "dream": DreamModelLM}


def model_class_for(model_type: str) -> type:
    """The model class for a config.json `model_type` ("llada", "Dream"; case-insensitive)."""
    try:
        return MODEL_CLASSES[str(model_type).lower()]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: 'llada', 'Dream'"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> LLaDAModelLM | DreamModelLM:
    """Load a LLaDA or Dream checkpoint directory (config.json + `model.safetensors` or sharded
    `model-*.safetensors` with `model.safetensors.index.json`), picking the class from config.json's
    `model_type` (its `auto_map` / remote code is never used).

    dtype: torch dtype or its name; None keeps the checkpoint's dtype. device: where to put the
    model (loaded on the CPU first). Returns the model in eval mode.
    Raises ValueError naming any missing, unexpected or mis-shaped tensor.
    """
    model_type = read_config_dict(path).get("model_type")
    if model_type is None:
        raise ValueError(f"checkpoint {path}: config.json has no model_type")
    return load_pretrained_checked(model_class_for(model_type), path, dtype=dtype, device=device)


__all__ = [
    "DiffusionLMMixin",
    "DreamConfig",
    "DreamModelLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "MODEL_CLASSES",
    "bidirectional_attention",
    "default_position_ids",
    "load_checkpoint",
    "model_class_for",
]
