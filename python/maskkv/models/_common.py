"""Pieces shared by the model files: RMSNorm, rotary embeddings (full and partial), bidirectional
and block-causal attention, the full-sequence forward every model runs, and checkpoint checks.

The generation loop and `forward` share all of their math through one small layer protocol, which
both models implement::

    hidden = model.embed(input_ids)                      # [B, T] -> [B, T, d]
    cos, sin = model.rotary(position_ids)                # [B, T] -> fp32 [B, T, head_dim] each
    for layer in model.layers:
        q, k, v = layer.qkv(hidden, cos, sin)            # pre-norm + projections + RoPE on q and k
        hidden = layer.attn_output(hidden, attention(q, k, v))   # output projection + residual
        hidden = layer.mlp_block(hidden)                 # post-norm + gated MLP + residual
    logits = model.head(hidden)                          # final norm + LM head

Every op takes any sequence length T, so callers may run it on token chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_TRANSFORMERS_VERSION = version.parse(transformers.__version__)


class RMSNorm(nn.Module):
    """Root-mean-square norm as LLaDA and Qwen2 compute it: normalise in fp32, cast back to the
    input dtype, then multiply by the weight (in that order, so bf16 checkpoints reproduce
    exactly)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d] -> [..., d]"""
        dtype = hidden.dtype
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for the given positions, always in fp32.

    position_ids: int [B, T] -> (cos, sin), each fp32 [B, T, head_dim].

    Frequencies are recomputed on every call (head_dim / 2 numbers) instead of being kept in a
    buffer: a buffer would be cast to bf16 by `model.to(dtype)` and, on transformers 5, created on
    the meta device during loading. The values equal the official LLaDA and Qwen2 tables.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T], got shape {tuple(position_ids.shape)}")
    device = position_ids.device
    device_type = device.type if device.type in ("cuda", "cpu", "xpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta**exponent)  # [head_dim / 2]
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: [f, f]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool = True
) -> torch.Tensor:
    """Rotate queries or keys.

    x: [B, H, T, D] (any float dtype); cos, sin: fp32 [B, T, D] (or [1, T, D])
    -> [B, H, T, D] in x.dtype.
    full_precision=True rotates in fp32 and casts back once, as LLaDA does (`rope_full_precision`).
    full_precision=False casts cos/sin to x.dtype and rotates in that dtype, as Qwen2 and the
    official Dream code do; in bf16 each product and the sum round separately, so the two differ
    in the last bit, and only this order reproduces Dream's bf16 logits bit for bit.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    if not full_precision:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = cos.shape[-1] channels of every head and pass the rest through, in
    x's dtype (cos and sin are cast to it first), as the LLaDA2 and LLaDA-MoE files do
    (``partial_rotary_factor`` < 1 gives R < D).

    x: [B, H, T, D]; cos, sin: fp32 [B, T, R] (or [1, T, R]) with R <= D even -> [B, H, T, D].
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return apply_rotary(x, cos, sin, full_precision=False)
    rotated = apply_rotary(x[..., :rot], cos, sin, full_precision=False)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H * D] -> [B, H, T, D]"""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D]"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full (non-causal) attention with grouped KV heads, scale 1/sqrt(D).

    q: [B, Hq, T, D]; k, v: [B, Hkv, L, D] with Hq a multiple of Hkv (query head h reads KV head
    h // (Hq / Hkv)); key_padding_mask: bool [B, L], True for real tokens, or None.
    Returns [B, Hq, T, D]. Padding keys are excluded; padding queries still attend to the real keys
    (their outputs are finite and simply unused).
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(device=q.device, dtype=torch.bool)
        if q.device.type == "cuda":
            # SDPA's memory-efficient kernel has mis-handled non-contiguous inputs with a mask in
            # some torch versions (pytorch#112577); Dream's reference code does the same.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)


def block_causal_mask(
    q_start: int,
    q_end: int,
    num_keys: int,
    block_length: int,
    key_valid: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """bool [B or 1, 1, q_end - q_start, num_keys]: query position i may read key position j
    when j's block is not after i's (blocks of ``block_length`` positions from position 0) and
    key j is real (``key_valid`` bool [B, >= num_keys], or None). A padding query whose blocks
    hold no real key reads itself, so that its (unused) output stays finite."""
    q_pos = torch.arange(q_start, q_end, device=device)
    k_pos = torch.arange(num_keys, device=device)
    mask = (k_pos[None, :] // block_length <= q_pos[:, None] // block_length)[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :num_keys].to(device=device, dtype=torch.bool)
        mask = mask | (k_pos[None, :] == q_pos[:, None])
    return mask


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_length: int,
    key_valid: torch.Tensor | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Block-causal attention (LLaDA2): a position reads every position of its own block and of
    the blocks before it, blocks being ``block_length`` positions from position 0.

    q: [B, Hq, L, D]; k, v: [B, Hkv, L, D] (the same L positions); key_valid: bool [B, L] or
    None. Returns [B, Hq, L, D].

    Queries run in chunks of whole blocks (about ``query_chunk`` positions); a chunk reads only
    the keys up to its last block, through SDPA with a [chunk, keys] mask, so no [L, L] mask or
    score matrix exists for a long sequence, and the masked-out work is the upper half of each
    chunk's diagonal square (``benchmarks/bench_block_causal.py``: on one CPU core at 8192
    positions, chunks of 1024 took 0.47x the time of one [L, L]-masked SDPA and 0.68x of one
    mask-free SDPA per block; chunks of 256 were 12% faster still there, at more calls). With
    one chunk (L <= query_chunk) this is SDPA with the whole [L, L] mask, the official LLaDA2
    forward's computation.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    L = q.shape[2]
    chunk = max(block_length, query_chunk // block_length * block_length)
    outs = []
    for start in range(0, L, chunk):
        end = min(start + chunk, L)
        keys = min(L, -(-end // block_length) * block_length)
        mask = block_causal_mask(start, end, keys, block_length, key_valid, q.device)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], attn_mask=mask
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def default_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions for a (possibly left-padded) batch: int64 [B, T].

    Without a mask: 0..T-1 for every row. With a mask (1 = real token): cumsum(mask) - 1, clamped
    at 0, so the first real token of every row sits at position 0 and a left-padded row gets the
    same positions as the row alone. Dream's generation code does the same for real tokens (it
    puts padding at 1, which no real token ever sees); the official LLaDA code ignores padding for
    positions. We use this one rule for both models, so a padded row matches the row alone.
    """
    b, t = input_ids.shape
    if attention_mask is None:
        return torch.arange(t, device=input_ids.device, dtype=torch.int64).expand(b, t)
    return (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)


class DiffusionLMMixin:
    """The full-sequence bidirectional forward (NoCache), written once in terms of the layer
    protocol so the generation loop and `forward` cannot drift apart.

    A model using it provides `embed`, `rotary`, `layers` (each with `qkv`, `attn_output`,
    `mlp_block`) and `head`.
    """

    dllm_kind: str = ""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        block_length: int | None = None,
    ) -> MaskedLMOutput | tuple[torch.Tensor]:
        """input_ids: int [B, T]; attention_mask: [B, T] with 1 for real tokens (left padding), or
        None; position_ids: int [B, T] or None (see `default_position_ids`); block_length: None
        for bidirectional attention, an int for block-causal attention with blocks of that many
        positions from position 0 (LLaDA2's training and generation, see
        `block_causal_attention`).
        Returns an output whose `.logits` is [B, T, vocab] (the model's `head` dtype).
        """
        if block_length is not None and (
            isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1
        ):
            raise ValueError(f"block_length: expected None or a positive int, got {block_length!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must be [B, T] = {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(input_ids.device)
            # An all-ones mask is dropped so SDPA can pick its flash kernel.
            if not bool(attention_mask.bool().all()):
                key_padding_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)

        hidden = self.embed(input_ids)
        cos, sin = self.rotary(position_ids.to(input_ids.device))
        for layer in self.layers:
            q, k, v = layer.qkv(hidden, cos, sin)
            if block_length is None:
                attn = bidirectional_attention(q, k, v, key_padding_mask)
            else:
                attn = block_causal_attention(q, k, v, block_length, key_padding_mask)
            hidden = layer.attn_output(hidden, attn)
            hidden = layer.mlp_block(hidden)
        logits = self.head(hidden)

        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The raw config.json of a checkpoint directory."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no config.json")
    with open(config_file) as f:
        return json.load(f)


def checkpoint_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a single-file or sharded safetensors checkpoint,
    read from the file headers only (no tensor data is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    index_file = path / SAFE_WEIGHTS_INDEX_NAME
    single_file = path / SAFE_WEIGHTS_NAME
    if index_file.is_file():
        with open(index_file) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single_file.is_file():
        weight_map = {}
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"checkpoint {path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} found"
        )

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not (path / file).is_file():
            raise FileNotFoundError(
                f"checkpoint {path}: shard {file} named in the index is missing"
            )
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if weight_map:
        for name, file in weight_map.items():
            if name not in shapes:
                raise ValueError(
                    f"checkpoint {path}: tensor '{name}' is listed in the index under {file} "
                    "but no shard holds it"
                )
    return shapes


def check_tensor_names(
    path: str | os.PathLike,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != found[n])
    problems = []
    if missing:
        problems.append("missing tensor " + ", ".join(f"'{n}'" for n in missing[:8]))
    if unexpected:
        problems.append("unexpected tensor " + ", ".join(f"'{n}'" for n in unexpected[:8]))
    if mismatched:
        problems.append(
            "tensor shape mismatch "
            + ", ".join(f"'{n}' {found[n]} (expected {tuple(expected[n])})" for n in mismatched[:8])
        )
    if problems:
        raise ValueError(f"checkpoint {path}: " + "; ".join(problems))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """A torch dtype from a dtype or its name; None and "auto" give "auto" (the checkpoint's own
    dtype, like transformers 5's default)."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"unknown floating dtype {dtype!r}")
        return resolved
    return dtype


def dtype_kwargs(dtype: torch.dtype | str | None) -> dict[str, Any]:
    """`from_pretrained`'s dtype argument: `torch_dtype` on transformers 4 (4.56+ also take
    `dtype`, older ones would silently treat `dtype` as a config override), `dtype` on 5 (where
    `torch_dtype` still works but warns)."""
    dtype = resolve_dtype(dtype)
    if _TRANSFORMERS_VERSION.major >= 5:
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def load_pretrained_checked(
    model_class: type,
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """`model_class.from_pretrained(path)` with exact tensor-name checking: any missing,
    unexpected or mis-shaped tensor raises ValueError naming it (from_pretrained only warns).
    Returns the model in eval mode on `device`."""
    path = Path(path)
    dtype = resolve_dtype(dtype)
    config_class = model_class.config_class
    config_dict = read_config_dict(path)
    if str(config_dict.get("model_type")).lower() != config_class.model_type.lower():
        # A class picked by `architectures` (LLaDA-MoE's config.json says "llada"): from_dict
        # does not warn about the other model_type, which from_pretrained would.
        config = config_class.from_dict(config_dict)
    else:
        config = config_class.from_pretrained(path)

    # Check names and shapes from the safetensors headers against a meta-device instance first:
    # costs no memory and fails before any weight is read.
    with torch.device("meta"):
        reference = model_class(config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    del reference
    check_tensor_names(path, expected, checkpoint_tensor_shapes(path))

    model, info = model_class.from_pretrained(
        path, config=config, output_loading_info=True, **dtype_kwargs(dtype)
    )
    # Second guard, in case a transformers version renames keys on the way in.
    for key, what in (
        ("missing_keys", "missing tensor"),
        ("unexpected_keys", "unexpected tensor"),
        ("mismatched_keys", "tensor shape mismatch"),
    ):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key, ()) or ())
        if names:
            raise ValueError(f"checkpoint {path}: {what} " + ", ".join(f"'{n}'" for n in names))
    if isinstance(dtype, torch.dtype) and model.dtype != dtype:
        model.to(dtype)  # belt and braces: never hand back fp32 when bf16 was asked for
    model.eval()
    if device is not None:
        model.to(device)
    return model
