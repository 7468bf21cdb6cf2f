"""MaskKV layer-importance calibration: I(l) = 1 - mean cos(residual before / after attention).

Runs the first denoising step ([prompt ‖ masks]) of each calibration prompt through the model
and, at every layer, compares the residual stream entering the attention block with the one
leaving it (``h`` versus ``h + attn_out(...)``), averaged over tokens and prompts. Layers whose
attention barely moves the residual stream get low importance and, under MaskKV, smaller budgets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .generation.engine import dense_attention, position_ids_from_mask
from .methods import LayerProfile
from .models._common import block_causal_attention
from .models.llada2 import LLADA2_BLOCK_LENGTH

__all__ = ["calibrate", "layer_cosines"]


@torch.no_grad()
def layer_cosines(
    model, input_ids: torch.Tensor, gen_length: int, attention_mask=None
) -> torch.Tensor:
    """fp64 [layers]: mean cosine between the residual before and after each attention block,
    over the real tokens of [prompt ‖ gen_length masks]. A block-causal model (LLaDA2) attends
    block-causally, in its official block length, as its first denoising step does."""
    B, P = input_ids.shape
    device = input_ids.device
    x = torch.cat(
        [
            input_ids,
            torch.full(
                (B, gen_length), model.config.mask_token_id, device=device, dtype=torch.long
            ),
        ],
        1,
    )
    mask = (
        torch.ones_like(x)
        if attention_mask is None
        else torch.cat(
            [
                attention_mask.to(device).long(),
                torch.ones(B, gen_length, dtype=torch.long, device=device),
            ],
            1,
        )
    )
    cos, sin = model.rotary(position_ids_from_mask(mask))
    key_valid = mask.bool()
    h = model.embed(x)
    out = []
    block_causal = getattr(model, "dllm_kind", "") == "llada2"
    for layer in model.layers:
        q, k, v = layer.qkv(h, cos, sin)
        if block_causal:
            attn = block_causal_attention(q, k, v, LLADA2_BLOCK_LENGTH, key_valid)
        else:
            attn = dense_attention(q, k, v, key_valid, 4096)[0]
        h_after = layer.attn_output(h, attn)
        c = F.cosine_similarity(h.float(), h_after.float(), dim=-1)  # [B, L]
        out.append((c * key_valid).sum().double() / key_valid.sum())
        h = layer.mlp_block(h_after)
    return torch.stack(out)


def calibrate(
    model,
    prompts: Iterable[torch.Tensor],
    *,
    gen_length: int = 128,
    progress: bool = False,
) -> LayerProfile:
    """Average ``layer_cosines`` over calibration prompts (each int [1, P] or [P]) and return
    the profile I(l) = 1 - mean cos."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one calibration prompt, got none")
    device = next(model.parameters()).device
    it = prompts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(prompts, desc="calibrating", unit="prompt")
    total = None
    for ids in it:
        ids = torch.as_tensor(ids, device=device).long()
        ids = ids[None] if ids.dim() == 1 else ids
        c = layer_cosines(model, ids, gen_length)
        total = c if total is None else total + c
    mean = (total / len(prompts)).tolist()
    return LayerProfile.from_cosines(
        mean,
        model_type=getattr(model.config, "model_type", None),
        num_prompts=len(prompts),
        meta={"gen_length": gen_length},
    )
