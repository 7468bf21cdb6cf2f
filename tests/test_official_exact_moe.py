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

import pytest
import torch
import torch.nn.functional as F
from test_official_exact import _rms_norm, _rotate_half, llada_generate

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


def test_checkpoints_load_as_the_public_classes(models):
    """``maskkv.load_checkpoint`` finds each family's class, exported at the top level."""
    import maskkv

    assert isinstance(models["llada2", torch.float32], maskkv.LLaDA2MoeModelLM)
    assert isinstance(models["lladamoe", torch.float32], maskkv.LLaDAMoEModelLM)
    assert isinstance(models["llada2", torch.float32].config, maskkv.LLaDA2MoeConfig)
    assert isinstance(models["lladamoe", torch.float32].config, maskkv.LLaDAMoEConfig)


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


# ------------------------------------------------------------------------------------------------
# Official sampling loops, transcribed
# ------------------------------------------------------------------------------------------------


def _top_k_logits(logits, k):
    if k is None or k <= 0:
        return logits
    values, _ = torch.topk(logits, k)
    min_values = values[..., -1, None]
    return torch.where(logits < min_values, torch.full_like(logits, float("-inf")), logits)


def _top_p_logits(logits, p):
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_mask = cumulative_probs > p
    sorted_mask[..., 1:] = sorted_mask[..., :-1].clone()
    sorted_mask[..., 0] = False
    mask_indices = torch.scatter(
        torch.full_like(logits, False, dtype=torch.bool), -1, sorted_indices, sorted_mask
    )
    return logits.masked_fill(mask_indices, float("-inf"))


def _sample_with_temperature_topk_topp(
    logits, temperature=1.0, top_k=0, top_p=1.0, argmax_at_zero=False
):
    """The 2.0 file's sampler; ``argmax_at_zero``: the 2.1 file's added temperature-0 branch."""
    orig_shape = logits.shape[:-1]
    vocab_size = logits.shape[-1]
    logits = logits.reshape(-1, vocab_size)
    if argmax_at_zero and temperature == 0.0:
        token = torch.argmax(logits, dim=-1, keepdim=True)
        probs = F.softmax(logits, dim=-1)
        token_prob = torch.gather(probs, -1, token)
        return token.view(*orig_shape), token_prob.view(*orig_shape)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logits = _top_k_logits(logits, top_k)
    logits = _top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1)
    token_prob = torch.gather(probs, -1, token)
    return token.view(*orig_shape), token_prob.view(*orig_shape)


def _get_num_transfer_tokens(block_length, steps):
    if steps == 0:
        return torch.tensor([], dtype=torch.int64)
    base = block_length // steps
    remainder = block_length % steps
    num_transfer_tokens = torch.full((steps,), base, dtype=torch.int64)
    num_transfer_tokens[:remainder] += 1
    return num_transfer_tokens


@torch.no_grad()
def llada2_generate(
    model_fn,
    inputs,
    temperature=0.0,
    block_length=32,
    steps=32,
    gen_length=2048,
    top_p=None,
    top_k=None,
    eos_early_stop=False,
    minimal_topk=1,
    threshold=0.95,
    eos_id=156892,
    mask_id=156895,
    version="2.0",
    editing_threshold=0.9,
    max_post_steps=16,
    num_to_transfer=1,
    block_causal=True,
    argmax_at_zero=None,
):
    """LLaDA2MoeModelLM.generate: the 2.0 file, or with ``version="2.1"`` the 2.1 file's loop
    (token editing). ``argmax_at_zero`` (default: only in 2.1): the 2.1 file's argmax at
    temperature 0 (the 2.0 file samples from the softmax there). ``block_causal``: the 2.0
    file's log()-ed mask (0 / -inf) or, False, the 2.1 file's 0/1 mask added as it is.
    ``model_fn(x, mask, positions)`` is the model's forward. Returns the answer up to its first
    EOS (batch 1)."""
    if argmax_at_zero is None:
        argmax_at_zero = version == "2.1"
    steps = min(steps, gen_length // minimal_topk)
    input_ids = inputs
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks))
    pattern = (
        block_mask.repeat_interleave(block_length, dim=0)
        .repeat_interleave(block_length, dim=1)
        .unsqueeze(0)
        .unsqueeze(0)
    )
    block_diffusion_attention_mask = pattern.log() if block_causal else pattern
    position_ids = torch.arange(total_length).unsqueeze(0)
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids.clone()
    prefill_blocks = prompt_length // block_length
    schedule = _get_num_transfer_tokens(block_length, steps)
    for num_block in range(prefill_blocks, num_blocks):
        current_window_end = (num_block + 1) * block_length
        cur_x = x[:, :current_window_end]
        cur_attn_mask = block_diffusion_attention_mask[
            :, :, :current_window_end, :current_window_end
        ]
        cur_position_ids = position_ids[:, :current_window_end]
        if version == "2.0":
            for step in range(steps):
                active_block_mask = cur_x[:, -block_length:] == mask_id
                if active_block_mask.sum() == 0:
                    break
                logits = model_fn(cur_x, cur_attn_mask, cur_position_ids)
                active_logits = logits[:, -block_length:, :]
                x0, x0_p = _sample_with_temperature_topk_topp(
                    active_logits, temperature, top_k, top_p, argmax_at_zero
                )
                num_to_transfer = schedule[step].item()
                transfer_index = torch.zeros_like(x0, dtype=torch.bool)
                confidence = torch.where(active_block_mask, x0_p, -torch.inf)
                high_conf_mask = confidence[0] > threshold
                num_high_confidence = high_conf_mask.sum().item()
                if num_high_confidence >= num_to_transfer:
                    transfer_index[0] = high_conf_mask
                else:
                    _, idx = torch.topk(
                        confidence[0], k=min(num_to_transfer, active_block_mask.sum().item())
                    )
                    transfer_index[0, idx] = True
                if transfer_index.any():
                    cur_x[:, -block_length:][transfer_index] = x0[transfer_index]
                if eos_early_stop and (x0[transfer_index] == eos_id).any():
                    eos_pos_in_x = (cur_x[0] == eos_id).nonzero(as_tuple=True)
                    if len(eos_pos_in_x[0]) > 0:
                        eos_pos = eos_pos_in_x[0][0].item()
                        if (cur_x[0, prompt_length:eos_pos] != mask_id).all():
                            return x[:, prompt_length : eos_pos + 1]  # prompt dropped here
            x[:, :current_window_end] = cur_x
            if eos_id is not None and (x[0, prompt_length:current_window_end] == eos_id).any():
                break
        else:
            block_start_pos = num_block * block_length
            post_steps = 0
            while True:
                old_block_tokens = cur_x[:, -block_length:].clone()
                active_block_mask = cur_x[:, -block_length:] == mask_id
                if torch.any(active_block_mask) == False:  # noqa: E712 (transcribed)
                    post_steps += 1
                if post_steps > max_post_steps:
                    break
                prompt_mask_in_block = torch.zeros(block_length, dtype=torch.bool)
                if block_start_pos < prompt_length:
                    prompt_end_in_block = min(prompt_length - block_start_pos, block_length)
                    prompt_mask_in_block[:prompt_end_in_block] = True
                logits = model_fn(cur_x, cur_attn_mask, cur_position_ids)
                active_logits = logits[:, -block_length:, :]
                x0, x0_p = _sample_with_temperature_topk_topp(
                    active_logits, temperature, top_k, top_p, argmax_at_zero
                )
                mask_transfer_index = torch.zeros_like(x0, dtype=torch.bool)
                if active_block_mask.sum() > 0:
                    mask_confidence = torch.where(active_block_mask, x0_p, -torch.inf)
                    high_conf_mask = (mask_confidence[0] > threshold) & active_block_mask[0]
                    num_high_confidence = high_conf_mask.sum().item()
                    if num_high_confidence >= num_to_transfer:
                        mask_transfer_index[0] = high_conf_mask
                    else:
                        num_available = active_block_mask.sum().item()
                        if num_available > 0:
                            _, idx = torch.topk(
                                mask_confidence[0], k=min(num_to_transfer, num_available)
                            )
                            mask_transfer_index[0, idx] = True
                editing_transfer_index = torch.zeros_like(x0, dtype=torch.bool)
                non_mask_positions = ~active_block_mask
                non_prompt_positions = ~prompt_mask_in_block
                editable_positions = non_mask_positions & non_prompt_positions[None, :]
                editing_confidence = torch.where(editable_positions, x0_p, -torch.inf)
                high_conf_editing = (
                    editing_confidence[0] > editing_threshold
                ) & editable_positions[0]
                token_changed = x0[0] != old_block_tokens[0]
                editing_transfer_index[0] = high_conf_editing & token_changed
                final_transfer_index = mask_transfer_index | editing_transfer_index
                if final_transfer_index.any():
                    cur_x[:, -block_length:][final_transfer_index] = x0[final_transfer_index]
                if active_block_mask.sum() == 0 and not editing_transfer_index.any():
                    break
            x[:, :current_window_end] = cur_x
            if eos_early_stop:
                generated_part = x[0, prompt_length:current_window_end]
                if (generated_part == mask_id).sum() == 0:
                    eos_positions = (generated_part == eos_id).nonzero(as_tuple=True)[0]
                    if len(eos_positions) > 0:
                        break
    generated_answer = x[:, : prompt_length + gen_length]
    eos_positions = (generated_answer[0][input_ids.shape[1] :] == eos_id).nonzero(as_tuple=True)[0]
    first = eos_positions[0].item() if len(eos_positions) > 0 else gen_length
    return generated_answer[:, input_ids.shape[1] : input_ids.shape[1] + first + 1]


# ------------------------------------------------------------------------------------------------
# LLaDA2: NoCache against the official loops
# ------------------------------------------------------------------------------------------------

SHARPEN = 40.0  # most candidates get probability 1.0: ties everywhere, as in test_official_exact
EOS = 257


@pytest.fixture(scope="module")
def llada2_models(tmp_path_factory):
    """(flavour, dtype) -> model: "sharp" (LM head x 40: ties) and "eos" (x 10, the EOS row
    x 3: EOS is drawn often enough to exercise the stops)."""
    path = tiny_checkpoint("llada2", tmp_path_factory.mktemp("llada2"))
    out = {}
    for dtype in DTYPES:
        for flavour, scale, eos_scale in (("sharp", SHARPEN, 1.0), ("eos", 10.0, 3.0)):
            model = load_checkpoint(path, dtype=dtype).eval()
            with torch.no_grad():
                model.lm_head.weight.mul_(scale)
                model.lm_head.weight[EOS] *= eos_scale
            out[flavour, dtype] = model
    return out


def _answer(response, eos=EOS):
    """The response up to its first EOS (inclusive), as the official ``generate`` returns it."""
    hits = (response == eos).nonzero()
    return response[: int(hits[0]) + 1] if len(hits) else response


# case -> (model flavour, (prompt seed, prompt length), maskkv.generate kwargs, official
# llada2_generate kwargs). Prompts of 16 tokens end on a block boundary, of 21 inside a block; the
# "eos" cases' prompts were picked so that the fp32 answer has an EOS after several tokens (and,
# for 2.1, so that editing changes it).
LLADA2_CASES = {
    "greedy": ("sharp", (0, 21), {}, dict(argmax_at_zero=True)),
    "t0-sample-2.0-file": ("sharp", (1, 16), dict(zero_temperature="sample"), {}),
    "sampled": ("sharp", (2, 21), dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.9)),
    "fixed-steps": ("sharp", (3, 16), dict(decoding="fixed", steps=4), dict(threshold=1.0, steps=4, argmax_at_zero=True)),
    "threshold-minimal-topk": ("eos", (9, 16), dict(decoding=0.7, minimal_topk=3), dict(threshold=0.7, minimal_topk=3, argmax_at_zero=True)),
    "eos-early-stop": ("eos", (4, 16), dict(eos_early_stop=True), dict(eos_early_stop=True, argmax_at_zero=True)),
    "2.1-editing": ("eos", (9, 21), dict(editing_threshold=0.5, max_post_steps=3), dict(version="2.1", editing_threshold=0.5, max_post_steps=3)),
    "2.1-file-additive-mask": ("eos", (1, 21), dict(editing_threshold=0.5, block_mask="additive", temperature=0.8), dict(version="2.1", editing_threshold=0.5, block_causal=False, temperature=0.8)),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LLADA2_CASES))
def test_llada2_matches_official(llada2_models, dtype, case):
    from maskkv.generation import FixedSteps, Threshold

    flavour, (seed, P), ours, official = LLADA2_CASES[case]
    model = llada2_models[flavour, dtype]
    sd, cfg = model.state_dict(), model.config

    def fn(x, mask, positions):
        return llada2_forward(sd, cfg, x, mask, positions)

    ours = dict(ours)
    if ours.get("decoding") == "fixed":
        ours["decoding"] = FixedSteps()
    elif isinstance(ours.get("decoding"), float):
        ours["decoding"] = Threshold(ours["decoding"])
    sched = dict(gen_length=20, block_length=8)
    ids = _prompts(1, P, seed=seed)
    torch.manual_seed(seed)
    official = {"steps": 8} | official
    ref = llada2_generate(fn, ids, eos_id=EOS, mask_id=cfg.mask_token_id, **sched, **official)
    out = generate(model, ids, method="nocache", seed=seed, **{"steps": 8} | sched | ours)
    assert torch.equal(_answer(out.responses[0]), ref[0]), (out.responses[0], ref[0])


# ------------------------------------------------------------------------------------------------
# LLaDA-MoE: NoCache against LLaDA's generate.py
# ------------------------------------------------------------------------------------------------

LLADAMOE_CASES = {
    "greedy": dict(),
    "sampled-cfg": dict(temperature=0.8, cfg_scale=1.5),
    "random-remasking": dict(remasking="random", temperature=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LLADAMOE_CASES))
def test_lladamoe_matches_official(models, dtype, case):
    model = models["lladamoe", dtype]
    sd, cfg = model.state_dict(), model.config
    kw = LLADAMOE_CASES[case]
    ids = _prompts(1, 26, seed=1)
    sched = dict(gen_length=16, block_length=8, steps=8)
    torch.manual_seed(11)
    ref = llada_generate(
        lambda x, am: lladamoe_forward(sd, cfg, x, am), ids, mask_id=cfg.mask_token_id,
        **sched, **kw,
    )  # fmt: skip
    out = generate(model, ids, method="nocache", seed=11, **sched, **kw)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lladamoe_left_padded_batch_matches_official(models, dtype):
    # As for LLaDA: the reference forward takes maskkv's positions for the padded row.
    model = models["lladamoe", dtype]
    sd, cfg = model.state_dict(), model.config
    ids = _prompts(2, 26, seed=3)
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[1, :7] = 0

    def fn(x, am):
        return lladamoe_forward(sd, cfg, x, am, (am.long().cumsum(-1) - 1).clamp(min=0))

    sched = dict(gen_length=16, block_length=8, steps=8)
    ref = llada_generate(fn, ids, mask, mask_id=cfg.mask_token_id, **sched)
    out = generate(model, ids, attention_mask=mask, method="nocache", **sched)
    assert torch.equal(out.sequences, ref)
