"""LLaDA2.x and LLaDA-MoE: ``maskkv.generate(method="nocache")`` and the models' forward against
transcriptions of the official code, in fp32 and bf16, greedy and seeded sampling.

The reference side is written here from the official sources and imports nothing from
``maskkv.generation`` (LLaDA's ``generate.py`` transcription comes from
``test_official_exact.py``):
- ``llada2_forward``: ``modeling_llada2_moe.py`` of LLaDA2.0 (fused QKV, q/k RMSNorm, partial
  RoPE with cos/sin in the model dtype, SDPA with the 4-D additive mask, the sigmoid router with
  expert bias and group-limited top-k, ``moe_infer``, shared experts, fp32 logits). One
  departure: the official ``generate`` builds its block mask in bf16 and SDPA refuses a bf16 mask
  for fp32 queries, so the transcription casts the (0 / -inf, exactly representable) mask to the
  query dtype. ``soft=True`` is the LLaDA2.1 file, whose mask is the 0/1 block pattern itself.
- ``llada2_generate``: ``LLaDA2MoeModelLM.generate`` of the 2.0 file (transfer schedule,
  threshold, EOS stop, early stop; temperature 0 draws from the softmax, as that file does) and
  of the 2.1 file (``version="2.1"``: argmax at temperature 0, token editing, post steps).
- ``lladamoe_forward``: ``modeling_lladamoe.py`` (SDPA attention, q/k norm on [*, head_dim] rows,
  partial RoPE, the softmax router with expert bias, the per-expert loop with ``index_add_``).
Both read the checkpoint tensors by their official names from the model's state dict.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_official_exact import _add_gumbel_noise, _rms_norm, _rotate_half, llada_generate

from maskkv import generate
from maskkv.models import load_checkpoint
from maskkv.testing import tiny_checkpoint

DTYPES = [torch.float32, torch.bfloat16]

# ------------------------------------------------------------------------------------------------
# Official forward passes, transcribed
# ------------------------------------------------------------------------------------------------


def _rope_tables(cfg, head_dim, positions, dtype):
    """LLaDA2MoeRotaryEmbedding / LLaDAMoERotaryEmbedding with the default rope type."""
    dim = int(head_dim * cfg.partial_rotary_factor)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq_expanded = inv_freq[None, :, None].float().expand(positions.shape[0], -1, 1)
    freqs = (inv_freq_expanded @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * 1.0).to(dtype), (emb.sin() * 1.0).to(dtype)


def _apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (_rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


def _repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _mlp(x, sd, p):
    gate = F.linear(x, sd[p + "gate_proj.weight"])
    return F.linear(
        F.silu(gate) * F.linear(x, sd[p + "up_proj.weight"]), sd[p + "down_proj.weight"]
    )


def _llada2_moe(sd, cfg, p, hidden_states):
    """LLaDA2MoeSparseMoeBlock.forward in eval mode (LLaDA2MoeGate + moe_infer)."""
    identity = hidden_states
    bsz, seq_len, h = hidden_states.shape
    x = hidden_states.view(-1, h)
    logits = F.linear(x.type(torch.float32), sd[p + "gate.weight"].type(torch.float32))
    scores = torch.sigmoid(logits.float()).type_as(logits)
    scores_for_routing = scores + sd[p + "gate.expert_bias"]
    n = scores_for_routing.shape[0]
    group_scores = scores_for_routing.view(n, cfg.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(n, cfg.n_group, cfg.num_experts // cfg.n_group)
        .reshape(n, -1)
    )
    masked_scores = scores_for_routing.masked_fill(~score_mask.bool(), float("-inf"))
    _, topk_idx = torch.topk(masked_scores, k=cfg.num_experts_per_tok, dim=-1)
    scores = torch.gather(scores, dim=1, index=topk_idx).type_as(logits)
    k = cfg.num_experts_per_tok
    topk_weight = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores
    topk_weight = topk_weight * cfg.routed_scaling_factor
    # moe_infer
    cnts = topk_idx.new_zeros((topk_idx.shape[0], cfg.num_experts))
    cnts.scatter_(1, topk_idx, 1)
    tokens_per_expert = cnts.sum(dim=0).cpu().numpy()
    idxs = topk_idx.view(-1).argsort()
    sorted_tokens = x[idxs // topk_idx.shape[1]]
    outputs, start_idx = [], 0
    for i, num_tokens in enumerate(tokens_per_expert):
        if num_tokens == 0:
            continue
        end_idx = start_idx + num_tokens
        outputs.append(_mlp(sorted_tokens[start_idx:end_idx], sd, p + f"experts.{i}."))
        start_idx = end_idx
    outs = torch.cat(outputs, dim=0)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    y = (
        new_x.view(*topk_idx.shape, -1)
        .type(topk_weight.dtype)
        .mul_(topk_weight.unsqueeze(dim=-1))
        .sum(dim=1)
        .type(new_x.dtype)
    ).view(bsz, seq_len, h)
    if cfg.num_shared_experts is not None:
        y = y + _mlp(identity, sd, p + "shared_experts.")
    return y


def llada2_forward(sd, cfg, x, attention_mask=None, position_ids=None):
    """modeling_llada2_moe.py, LLaDA2MoeModelLM.forward (SDPA): fp32 logits [B, L, V].

    attention_mask: the 4-D additive mask ``generate`` passes (or None: bidirectional)."""
    B, L = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = F.embedding(x, sd["model.word_embeddings.weight"])
    if position_ids is None:
        position_ids = torch.arange(L)[None]
    cos, sin = _rope_tables(cfg, hd, position_ids, h.dtype)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        residual = h
        hs = _rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = F.linear(hs, sd[p + "attention.query_key_value.weight"])
        qkv = qkv.view(B, L, nh + 2 * nkv, hd)
        q, k, v = qkv.split([nh, nkv, nkv], dim=-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cfg.use_qk_norm:
            q = _rms_norm(q, sd[p + "attention.query_layernorm.weight"], cfg.rms_norm_eps)
            k = _rms_norm(k, sd[p + "attention.key_layernorm.weight"], cfg.rms_norm_eps)
        q, k = _apply_rope(q, k, cos, sin)
        k, v = _repeat_kv(k, nh // nkv), _repeat_kv(v, nh // nkv)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, :, :, : k.shape[-2]].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=hd**-0.5, is_causal=False
        )
        out = out.transpose(1, 2).contiguous().reshape(B, L, -1)
        h = residual + F.linear(out, sd[p + "attention.dense.weight"])
        residual = h
        hs = _rms_norm(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if i >= cfg.first_k_dense_replace:
            hs = _llada2_moe(sd, cfg, p + "mlp.", hs)
        else:
            hs = _mlp(hs, sd, p + "mlp.")
        h = residual + hs
    h = _rms_norm(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return F.linear(h, sd["lm_head.weight"]).float()


def _lladamoe_moe(sd, cfg, p, hidden_states):
    """LLaDAMoESparseMoeBlock.forward."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = F.linear(hidden_states, sd[p + "gate.weight"])
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    if p + "expert_bias" in sd:
        routing_weights += sd[p + "expert_bias"]
    routing_weights, selected_experts = torch.topk(routing_weights, cfg.num_experts_per_tok, dim=-1)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype)
    expert_mask = F.one_hot(selected_experts, num_classes=cfg.num_experts).permute(2, 1, 0)
    for expert_idx in range(cfg.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current = (
            _mlp(current_state, sd, p + f"experts.{expert_idx}.")
            * routing_weights[top_x, idx, None]
        )
        final.index_add_(0, top_x, current.to(hidden_states.dtype))
    return final.reshape(batch_size, sequence_length, hidden_dim)


def _expand_mask(mask, dtype, tgt_len):
    """AttentionMaskConverter(is_causal=False).to_4d for a 2-D padding mask."""
    bsz, src_len = mask.size()
    expanded = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


def lladamoe_forward(sd, cfg, x, attention_mask=None, position_ids=None):
    """modeling_lladamoe.py, LLaDAMoEModelLM.forward (LLaDAMoESdpaAttention): logits [B, L, V]."""
    B, L = x.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    h = F.embedding(x, sd["model.embed_tokens.weight"])
    if position_ids is None:
        position_ids = torch.arange(L)[None]
    cos, sin = _rope_tables(cfg, hd, position_ids, h.dtype)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        residual = h
        hs = _rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q, k = F.linear(hs, sd[a + "q_proj.weight"]), F.linear(hs, sd[a + "k_proj.weight"])
        if cfg.qk_layernorm:
            q = _rms_norm(q.reshape(-1, hd), sd[a + "q_norm.weight"], cfg.rms_norm_eps)
            k = _rms_norm(k.reshape(-1, hd), sd[a + "k_norm.weight"], cfg.rms_norm_eps)
            q, k = q.reshape(B, L, -1), k.reshape(B, L, -1)
        v = F.linear(hs, sd[a + "v_proj.weight"])
        q = q.view(B, L, nh, hd).transpose(1, 2)
        k = k.view(B, L, nkv, hd).transpose(1, 2)
        v = v.view(B, L, nkv, hd).transpose(1, 2)
        q, k = _apply_rope(q, k, cos, sin)
        k, v = _repeat_kv(k, nh // nkv), _repeat_kv(v, nh // nkv)
        mask = None
        if attention_mask is not None:
            mask = _expand_mask(attention_mask, q.dtype, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        out = out.transpose(1, 2).contiguous().view(B, L, cfg.hidden_size)
        h = residual + F.linear(out, sd[a + "o_proj.weight"])
        residual = h
        hs = _rms_norm(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if cfg.moe_layer_freq[i]:
            out = _lladamoe_moe(sd, cfg, p + "mlp.", hs)
            if p + "shared_expert.gate_proj.weight" in sd:
                out = out + _mlp(hs, sd, p + "shared_expert.")
        else:
            out = _mlp(hs, sd, p + "mlp.")
        h = residual + out
    h = _rms_norm(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return F.linear(h, sd["lm_head.weight"])


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("llada2", "lladamoe"):
        path = tiny_checkpoint(kind, tmp_path_factory.mktemp(kind))
        for dtype in DTYPES:
            out[kind, dtype] = load_checkpoint(path, dtype=dtype).eval()
    return out


def _prompts(B, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (B, P), generator=g)


# ------------------------------------------------------------------------------------------------
# Forward passes: bit-identical logits
# ------------------------------------------------------------------------------------------------


def _block_mask(L, block_length, dtype=torch.float32):
    """The 2.0 file's mask: log of the block lower triangle (0 / -inf)."""
    n = -(-L // block_length)
    tril = torch.tril(torch.ones(n, n))
    full = tril.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)
    return full.log()[None, None, :L, :L].to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llada2_forward_bit_identical(models, dtype):
    model = models["llada2", dtype]
    ids = _prompts(2, 37)
    sd, cfg = model.state_dict(), model.config
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llada2_forward(sd, cfg, ids))
        ours = model(ids, block_length=8).logits
        ref = llada2_forward(sd, cfg, ids, _block_mask(37, 8))
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lladamoe_forward_bit_identical(models, dtype):
    model = models["lladamoe", dtype]
    ids = _prompts(2, 37)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0
    sd, cfg = model.state_dict(), model.config
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lladamoe_forward(sd, cfg, ids))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(ids, attention_mask=mask).logits
        ref = lladamoe_forward(sd, cfg, ids, mask, positions)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1, 5:], ref[1, 5:])
