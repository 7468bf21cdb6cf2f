"""``maskkv.generate(method="nocache")`` against transcriptions of the official code, in bf16, fp16 and
fp32, greedy and seeded sampling, batch 1 and batch 2 left-padded.

The reference side is written here from the official sources and imports nothing from
``maskkv.generation``:
- ``llada_forward``: GSAI-ML/LLaDA-8B ``modeling_llada.py`` (LLaMA block, RMSNorm, full-precision
  RoPE, additive float attention bias for padding, SDPA);
- ``dream_forward``: Dream-v0 ``modeling_dream.py`` (Qwen2 layers, cos/sin cast to the model dtype,
  4-D boolean attention mask and ``cumsum - 1`` positions for padding);
- ``llada_generate``: ML-GSAI/LLaDA ``generate.py`` (current version: softmax in the logits'
  dtype, ``logits_eos_inf`` / ``confidence_eos_eot_inf``; ``float64_softmax`` gives the version
  before June 2025);
- ``dream_generate``: Dream-v0 ``generation_utils.py`` ``_sample`` and ``sample_tokens``.
Both read the checkpoint tensors by their official names from the model's state dict.

The models are tiny random checkpoints with a sharpened LM head (logits x 40): most masked
positions get confidence exactly 1.0 (or entropy exactly 0) in bf16, many also in fp32, so the
tests only pass if ties break as the official ``topk`` over [B, L] breaks them.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from maskkv import generate
from maskkv.models import load_checkpoint
from maskkv.testing import tiny_checkpoint

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHARPEN = 40.0


# ------------------------------------------------------------------------------------------------
# Official forward passes, transcribed
# ------------------------------------------------------------------------------------------------


def _rms_norm(x, weight, eps):
    og_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(og_dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def llada_forward(sd, cfg, input_ids, attention_mask=None, positions=None):
    """modeling_llada.py, LLaDAModel.forward for block_type llama: logits [B, L, V].

    positions: None is the official 0..L-1 for every row; a [B, L] tensor replaces it (the one
    departure, used for left-padded rows only, see the padded-batch test)."""
    B, L = input_ids.shape
    n_heads, n_kv = cfg.n_heads, cfg.n_kv_heads
    hd = cfg.d_model // n_heads
    x = F.embedding(input_ids, sd["model.transformer.wte.weight"])
    bias = None
    if attention_mask is not None and 0.0 in attention_mask:
        am = attention_mask.to(dtype=torch.float).view(B, -1)[:, None, None, :]
        am = (1.0 - am) * torch.finfo(am.dtype).min
        bias = torch.zeros(1, 1, L, L) + am  # bidirectional bias (zeros) + padding bias
        bias = bias.masked_fill(bias == float("-inf"), torch.finfo(bias.dtype).min)
    # RotaryEmbedding.get_rotary_embedding: positions 0..L-1 (padding counted)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    if positions is None:
        seq = torch.arange(L, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", seq, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        pos_sin, pos_cos = emb.sin()[None, None], emb.cos()[None, None]
    else:  # the same outer product, one row of positions per batch row
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        pos_sin, pos_cos = emb.sin()[:, None], emb.cos()[:, None]
    for i in range(cfg.n_layers):
        p = f"model.transformer.blocks.{i}."
        x_normed = _rms_norm(x, sd[p + "attn_norm.weight"], cfg.rms_norm_eps)
        q = F.linear(x_normed, sd[p + "q_proj.weight"])
        k = F.linear(x_normed, sd[p + "k_proj.weight"])
        v = F.linear(x_normed, sd[p + "v_proj.weight"])
        dtype = k.dtype
        q = q.view(B, L, n_heads, hd).transpose(1, 2)
        k = k.view(B, L, n_kv, hd).transpose(1, 2)
        v = v.view(B, L, n_kv, hd).transpose(1, 2)
        q_, k_ = q.float(), k.float()  # rope_full_precision
        q_ = ((q_ * pos_cos) + (_rotate_half(q_) * pos_sin)).to(q_.dtype)
        k_ = ((k_ * pos_cos) + (_rotate_half(k_) * pos_sin)).to(k_.dtype)
        q, k = q_.type_as(q), k_.type_as(k)
        attn_bias = None
        if bias is not None:
            attn_bias = bias.to(dtype)
            attn_bias = attn_bias.masked_fill(attn_bias == float("-inf"), torch.finfo(dtype).min)
        if n_heads != n_kv:
            k = k.repeat_interleave(n_heads // n_kv, dim=1, output_size=n_heads)
            v = v.repeat_interleave(n_heads // n_kv, dim=1, output_size=n_heads)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, L, cfg.d_model)
        x = x + F.linear(att, sd[p + "attn_out.weight"])
        og_x = x
        x = _rms_norm(x, sd[p + "ff_norm.weight"], cfg.rms_norm_eps)
        x, x_up = F.linear(x, sd[p + "ff_proj.weight"]), F.linear(x, sd[p + "up_proj.weight"])
        x = F.silu(x) * x_up
        x = og_x + F.linear(x, sd[p + "ff_out.weight"])
    x = _rms_norm(x, sd["model.transformer.ln_f.weight"], cfg.rms_norm_eps)
    return F.linear(x, sd["model.transformer.ff_out.weight"])


def dream_forward(sd, cfg, x, attention_mask, tok_idx):
    """modeling_dream.py, DreamModel.forward (SDPA attention): logits [B, L, V] (unshifted)."""
    B, L = x.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    h = F.embedding(x, sd["model.embed_tokens.weight"])
    position_ids = torch.arange(L)[None] if tok_idx is None else tok_idx
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(h.dtype)[:, None], emb.sin().to(h.dtype)[:, None]
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        residual = h
        hs = _rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        a = p + "self_attn."
        q = F.linear(hs, sd[a + "q_proj.weight"], sd[a + "q_proj.bias"])
        k = F.linear(hs, sd[a + "k_proj.weight"], sd[a + "k_proj.bias"])
        v = F.linear(hs, sd[a + "v_proj.weight"], sd[a + "v_proj.bias"])
        q = q.view(B, L, nh, hd).transpose(1, 2)
        k = k.view(B, L, nkv, hd).transpose(1, 2)
        v = v.view(B, L, nkv, hd).transpose(1, 2)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        rep = nh // nkv
        k = k[:, :, None].expand(B, nkv, rep, L, hd).reshape(B, nh, L, hd)
        v = v[:, :, None].expand(B, nkv, rep, L, hd).reshape(B, nh, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        out = out.transpose(1, 2).contiguous().view(B, L, cfg.hidden_size)
        h = residual + F.linear(out, sd[a + "o_proj.weight"])
        residual = h
        hs = _rms_norm(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        m = p + "mlp."
        gate = F.linear(hs, sd[m + "gate_proj.weight"])
        hs = F.linear(
            F.silu(gate) * F.linear(hs, sd[m + "up_proj.weight"]), sd[m + "down_proj.weight"]
        )
        h = residual + hs
    h = _rms_norm(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return F.linear(h, sd["lm_head.weight"])


# ------------------------------------------------------------------------------------------------
# Official sampling loops, transcribed
# ------------------------------------------------------------------------------------------------


def _add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def _get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def llada_generate(
    model_fn,
    prompt,
    attention_mask=None,
    steps=128,
    gen_length=128,
    block_length=128,
    temperature=0.0,
    cfg_scale=0.0,
    remasking="low_confidence",
    mask_id=126336,
    logits_eos_inf=False,
    confidence_eos_eot_inf=False,
    eos=126081,
    eot=126348,
    float64_softmax=False,
):
    """generate.py; ``eos`` / ``eot`` replace the hard-coded 126081 / 126348."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((prompt.shape[0], gen_length), dtype=attention_mask.dtype)],
            dim=-1,
        )
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (
            x[
                :,
                prompt.shape[1] + num_block * block_length : prompt.shape[1]
                + (num_block + 1) * block_length,
            ]
            == mask_id
        )
        num_transfer_tokens = _get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                attention_mask_ = None
                if attention_mask is not None:
                    attention_mask_ = torch.cat([attention_mask, attention_mask], dim=0)
                logits = model_fn(x_, attention_mask_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model_fn(x, attention_mask)
            if logits_eos_inf:
                logits[:, :, eos] = -torch.inf
            logits_with_noise = _add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos] = logits[:, :, eot] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64) if float64_softmax else logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


def _top_p_logits(logits, top_p=None):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool, device=logits.device)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_logits(logits, top_k=None):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def _sample_tokens(
    logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False
):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_logits(logits, top_p)
    if top_k is not None:
        logits = _top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:  # the official code has a bare `except:`
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(
    sd,
    cfg,
    input_ids,
    attention_mask=None,
    max_new_tokens=16,
    steps=512,
    eps=1e-3,
    alg="origin",
    alg_temp=None,
    temperature=0.0,
    top_p=None,
    top_k=None,
):
    """generation_utils.py, DreamGenerationMixin._sample."""
    mask_token_id = cfg.mask_token_id
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        attention_mask = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(
            attention_mask.unsqueeze(1).unsqueeze(-2),
            attention_mask.unsqueeze(1).unsqueeze(-1),
        )
    else:
        tok_idx = None
        attention_mask = "full"
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = dream_forward(sd, cfg, x, attention_mask, tok_idx)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = _sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = _sample_tokens(
                    mask_logits, temperature=temperature, top_p=top_p, top_k=top_k
                )
            elif alg == "topk_margin":
                confidence, x0 = _sample_tokens(
                    mask_logits,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    margin_confidence=True,
                )
            elif alg == "entropy":
                confidence, x0 = _sample_tokens(
                    mask_logits, temperature, top_p=top_p, top_k=top_k, neg_entropy=True
                )
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = (
                int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            )
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(
                        full_confidence, num_samples=number_transfer_tokens
                    )
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


# ------------------------------------------------------------------------------------------------
# Fixtures: tiny sharpened checkpoints, prompts with repeated tokens
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("llada", "dream"):
        path = tiny_checkpoint(kind, tmp_path_factory.mktemp(kind))
        for dtype in DTYPES:
            model = load_checkpoint(path, dtype=dtype).eval()
            with torch.no_grad():
                head = model.lm_head if kind == "dream" else model.model.transformer.ff_out
                head.weight.mul_(SHARPEN)
            if kind == "llada":
                model.config.eot_token_id = 261  # <|eot_id|> in the tiny vocabulary
            out[kind, dtype] = model
    return out


def _prompts(B, P, pad=0, seed=0):
    """[B, P] ids made of a short motif repeated (duplicate tokens), row 1 left-padded by ``pad``;
    returns (ids, attention_mask or None)."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 250, (B, 5), generator=g)
    ids = motif.repeat(1, -(-P // 5))[:, :P].contiguous()
    if not pad:
        return ids, None
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 257 if ids.max() < 257 else 256  # a pad id that is not the mask id
    return ids, mask


def _llada_ref(model, ids, mask, **kw):
    sd, cfg = model.state_dict(), model.config

    def fn(x, am):
        return llada_forward(sd, cfg, x, am)

    return llada_generate(fn, ids, mask, mask_id=cfg.mask_token_id, eos=257, eot=261, **kw)


# ------------------------------------------------------------------------------------------------
# Forward passes: bit-identical logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_forward_logits_bit_identical(models, kind, dtype):
    model = models[kind, dtype]
    ids, _ = _prompts(2, 30)
    with torch.no_grad():
        ours = model(ids).logits
        if kind == "llada":
            ref = llada_forward(model.state_dict(), model.config, ids)
        else:
            ref = dream_forward(model.state_dict(), model.config, ids, "full", None)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# LLaDA
# ------------------------------------------------------------------------------------------------

LLADA_CASES = {
    "greedy": dict(),
    "greedy-float64-softmax": dict(float64_softmax=True),
    "sampled-cfg": dict(temperature=0.8, cfg_scale=1.5),
    "random-remasking": dict(remasking="random", temperature=0.5),
    "eos-flags-greedy": dict(logits_eos_inf=True, confidence_eos_eot_inf=True),
    "eos-flags-sampled": dict(temperature=0.7, confidence_eos_eot_inf=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LLADA_CASES))
@pytest.mark.parametrize("batch", [1, 2])
def test_llada_matches_official(models, dtype, case, batch):
    model = models["llada", dtype]
    kw = dict(LLADA_CASES[case])
    float64 = kw.pop("float64_softmax", False)
    ids, _ = _prompts(batch, 26, seed=batch)
    sched = dict(gen_length=16, block_length=8, steps=8)
    torch.manual_seed(11)
    ref = _llada_ref(model, ids, None, float64_softmax=float64, **sched, **kw)
    out = generate(
        model,
        ids,
        method="nocache",
        seed=11,
        **(dict(confidence_dtype=torch.float64) if float64 else {}),
        **sched,
        **kw,
    )
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["greedy", "sampled-cfg"])
def test_llada_left_padded_batch_matches_official(models, dtype, case):
    # maskkv gives a left-padded row the positions it would have alone (cumsum of the mask - 1);
    # the official LLaDA code counts the padding. RoPE is relative, so that changes rounding only,
    # but bit-exactness needs the same positions: the reference forward takes maskkv's.
    model = models["llada", dtype]
    ids, mask = _prompts(2, 26, pad=7, seed=3)
    sd, cfg = model.state_dict(), model.config
    kw = LLADA_CASES[case]

    def fn(x, am):
        positions = (am.long().cumsum(-1) - 1).clamp(min=0)
        return llada_forward(sd, cfg, x, am, positions=positions)

    torch.manual_seed(5)
    ref = llada_generate(
        fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=16, block_length=8, steps=8, **kw
    )
    out = generate(
        model,
        ids,
        attention_mask=mask,
        method="nocache",
        seed=5,
        gen_length=16,
        block_length=8,
        steps=8,
        **kw,
    )
    assert torch.equal(out.sequences, ref)


# ------------------------------------------------------------------------------------------------
# Dream
# ------------------------------------------------------------------------------------------------

DREAM_CASES = {
    "origin-greedy": dict(alg="origin"),
    "origin-sampled": dict(alg="origin", temperature=0.7, top_p=0.9, top_k=40),
    "maskgit_plus-greedy": dict(alg="maskgit_plus"),
    "topk_margin-greedy": dict(alg="topk_margin"),
    "entropy-greedy": dict(alg="entropy"),
    "entropy-recommended": dict(alg="entropy", temperature=0.2, top_p=0.95),
    "maskgit_plus-alg_temp": dict(alg="maskgit_plus", alg_temp=0.5, temperature=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(DREAM_CASES))
@pytest.mark.parametrize("pad", [0, 6])
def test_dream_matches_official(models, dtype, case, pad):
    model = models["dream", dtype]
    kw = DREAM_CASES[case]
    ids, mask = _prompts(2, 24, pad=pad, seed=pad)
    torch.manual_seed(7)
    ref = dream_generate(
        model.state_dict(), model.config, ids, mask, max_new_tokens=16, steps=8, **kw
    )
    out = generate(
        model, ids, attention_mask=mask, method="nocache", gen_length=16, steps=8, seed=7, **kw
    )
    assert torch.equal(out.sequences, ref)


# ------------------------------------------------------------------------------------------------
# Seeds, defaults
# ------------------------------------------------------------------------------------------------


def test_seed_is_manual_seed_and_leaves_global_state_alone(models):
    model = models["dream", torch.float32]
    ids, _ = _prompts(1, 20)
    kw = dict(method="nocache", gen_length=8, steps=4, alg="entropy", temperature=1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, ids, seed=9, **kw)
    assert torch.equal(torch.get_rng_state(), before), "seed= must not touch the global state"
    torch.manual_seed(9)
    b = generate(model, ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(torch.get_rng_state(), before), "seed=None draws from the global state"


def test_dream_defaults_are_official(models):
    # DreamGenerationConfig: alg "origin", steps 512, eps 1e-3, temperature 0. Origin at
    # temperature 0 still draws which positions to reveal, so the seed matters.
    model = models["dream", torch.float32]
    ids, _ = _prompts(1, 12)
    torch.manual_seed(2)
    ref = dream_generate(model.state_dict(), model.config, ids, None, max_new_tokens=8)
    out = generate(model, ids, method="nocache", gen_length=8, seed=2)
    assert len(out.stats.step_times) < 512, "steps with nothing masked run no forward pass"
    assert torch.equal(out.sequences, ref)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(alg="greedy"), "alg"),
        (dict(remasking="lowest"), "remasking"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(alg_temp=-1.0), "alg_temp"),
        (dict(confidence_dtype="float64"), "confidence_dtype"),
    ],
)
def test_bad_sampling_options(models, kwargs, name):
    for kind in ("llada", "dream"):
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            generate(models[kind, torch.float32], torch.zeros(1, 4, dtype=torch.long), **kwargs)
