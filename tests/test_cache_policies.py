"""Cache policies and decoding rules: exact against transcriptions of Fast-dLLM's loops, dLLM-Cache
degenerates to NoCache, the rules count as documented, and everything composes with every method
(batch 2, left padding) on both models."""

import math

import pytest
import torch
import torch.nn.functional as F

import maskkv
from maskkv import methods
from maskkv.generation import generate
from maskkv.generation.decoding import select_top
from maskkv.models import load_checkpoint
from maskkv.testing import tiny_checkpoint

LAYERS = {"llada": "n_layers", "dream": "num_hidden_layers"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("llada", "dream"):
        path = tiny_checkpoint(kind, tmp_path_factory.mktemp(kind), **{LAYERS[kind]: 3})
        out[kind] = load_checkpoint(path).eval()
        # A confident twin: the final norm scaled up sharpens every distribution, so that a 0.9
        # threshold reveals several tokens per step (random weights alone stay near uniform).
        sharp = load_checkpoint(path).eval()
        norm = sharp.model.transformer.ln_f if kind == "llada" else sharp.model.norm
        with torch.no_grad():
            norm.weight.mul_(20.0)
        out[kind, "sharp"] = sharp
    return out


def _prompt(B=1, P=40, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, P), generator=g)


# ------------------------------------------------------------------------------------------------
# Fast-dLLM, transcribed: a model call with a KV cache (keys/values concatenated, or written in
# place at `replace` as the official replace_position does) and the three loops' transfer rules.
# ------------------------------------------------------------------------------------------------


def _kv_forward(model, x, start, past=None, replace=None):
    """Logits [B, T, V] of tokens x[:, start:start + T'] (T' = x's length after start, or the
    replace span) attending to [past ‖ new] or to past with new written at `replace`."""
    tokens = x[:, start:] if replace is None else x[:, replace[0] : replace[1]]
    first = start if replace is None else replace[0]
    pos = torch.arange(first, first + tokens.shape[1]).expand(x.shape[0], -1)
    cos, sin = model.rotary(pos)
    h = model.embed(tokens)
    present = []
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)
        if past is not None and replace is None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        elif past is not None:
            past[i][0][:, :, replace[0] : replace[1]] = k
            past[i][1][:, :, replace[0] : replace[1]] = v
            k, v = past[i]
        G = q.shape[1] // k.shape[1]
        attn = F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        )
        present.append((k, v))
        h = layer.mlp_block(layer.attn_output(h, attn))
    return model.head(h).float(), present


def _transfer_counts(mask_index, steps):
    mask_num = mask_index.sum(1, keepdim=True)
    out = torch.zeros(mask_num.shape[0], steps, dtype=torch.long) + mask_num // steps
    for i in range(mask_num.shape[0]):
        out[i, : int(mask_num[i] % steps)] += 1
    return out


def _transfer(logits, mask_index, x, k, threshold=None, factor=None):
    """Fast-dLLM's get_transfer_index / get_transfer_index_dynamic, greedy, low confidence."""
    x0 = logits.argmax(-1)
    p = torch.gather(F.softmax(logits.double(), -1), -1, x0[..., None])[..., 0]
    x0 = torch.where(mask_index, x0, x)
    conf = torch.where(mask_index, p, -math.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    j = 0  # batch 1, as the official loops
    n_masked = int(mask_index[j].sum())
    if factor is not None:
        threshs = [1 - factor / (n + 1) for n in range(1, n_masked + 1)]
        threshs[0] = -1
        srt = torch.sort(conf[j][mask_index[j]], descending=True)[0]
        for top in range(len(threshs)):
            if srt[top] < threshs[top]:
                break
        if top == 0 or top == len(threshs) - 1:
            top += 1
        transfer[j, torch.topk(conf[j], top).indices] = True
        return x0, transfer
    k = n_masked if threshold is not None else int(k[j])
    idx = torch.topk(conf[j], k).indices
    transfer[j, idx] = True
    if threshold is not None:
        for r in range(1, k):
            if conf[j, idx[r]] < threshold:
                transfer[j, idx[r]] = False
    return x0, transfer


def _fastdllm(model, prompt, gen_length, block_length, steps, dual, threshold=None, factor=None):
    """generate_with_prefix_cache (dual=False) / generate_with_dual_cache (dual=True)."""
    mask_id = model.config.mask_token_id
    P = prompt.shape[1]
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    nfe = 0
    for nb in range(num_blocks):
        s, e = P + nb * block_length, P + (nb + 1) * block_length
        counts = _transfer_counts(x[:, s:e] == mask_id, spb)

        def fixed_count(i, counts=counts):  # indexed only by the fixed schedule, as officially
            return counts[:, i] if threshold is None and factor is None else None

        logits, past = _kv_forward(model, x, 0)
        nfe += 1
        mask_index = x == mask_id
        mask_index[:, e:] = False
        x0, tr = _transfer(logits, mask_index, x, fixed_count(0), threshold, factor)
        x[tr] = x0[tr]
        if not dual:
            past = [(k[:, :, :s], v[:, :, :s]) for k, v in past]
        i = 1
        while (x[:, s:e] == mask_id).any():
            nfe += 1
            if dual:
                mask_index = x[:, s:e] == mask_id
                logits, _ = _kv_forward(model, x, s, past, replace=(s, e))
                x0, tr = _transfer(logits, mask_index, x[:, s:e], fixed_count(i), threshold, factor)
                x[:, s:e][tr] = x0[tr]
            else:
                mask_index = x[:, s:] == mask_id
                mask_index[:, block_length:] = False
                logits, _ = _kv_forward(model, x, s, past)
                x0, tr = _transfer(logits, mask_index, x[:, s:], fixed_count(i), threshold, factor)
                x[:, s:][tr] = x0[tr]
            i += 1
    return x, nfe


RULES = {
    "fixed": (maskkv.FixedSteps(), {}),
    "threshold": (maskkv.Threshold(0.9), {"threshold": 0.9}),
    "factor": (maskkv.Factor(1.0), {"factor": 1.0}),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dual", [False, True], ids=["prefix", "dual"])
def test_fullcache_refresh_prompt_equals_fastdllm(models, dual, rule):
    model = models["llada", "sharp"]
    prompt = _prompt(P=40, seed=1)
    decoding, ref_kw = RULES[rule]
    kw = dict(gen_length=16, block_length=8, steps=8)
    ref, ref_nfe = _fastdllm(model, prompt, dual=dual, **kw, **ref_kw)
    policy = maskkv.DualCache(True) if dual else maskkv.PrefixCache(True)
    out = generate(model, prompt, method="fullcache", cache=policy, decoding=decoding, **kw)
    assert torch.equal(out.sequences, ref)
    assert out.stats.nfe == ref_nfe
    if rule != "fixed":  # the sharpened model does decode in parallel
        assert out.stats.mean_tokens_per_step > 1.0
    assert sum(out.stats.tokens_per_step) == 16


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_dllm_cache_every_step_equals_nocache(models, kind):
    model = models[kind]
    prompt = _prompt(P=40, seed=2)
    kw = dict(gen_length=16, block_length=8, steps=8, alg="entropy")  # Dream: deterministic
    ref = generate(model, prompt, method="nocache", **kw)
    for method in (methods.FullCache(), methods.MaskKV(budget=8), methods.SnapKV(budget=8)):
        cache = maskkv.DLLMCache(1, 1, 0.25)
        with pytest.warns(methods.MissingProfileWarning) if method.name == "maskkv" else _null():
            methods.profile._reset_missing_profile_warnings()
            out = generate(model, prompt, method=method, cache=cache, **kw)
        assert torch.equal(out.sequences, ref.sequences), method.name
        assert out.stats.step_kinds == ["full"] * 8


def test_dllm_cache_refresh_schedule_and_partial_steps(models):
    model = models["llada"]
    prompt = _prompt(P=40, seed=3)
    out = generate(
        model,
        prompt,
        method="fullcache",
        cache=maskkv.DLLMCache(6, 3, 0.25),
        gen_length=16,
        block_length=8,
        steps=8,
    )
    assert out.stats.step_kinds == ["full", "partial", "partial", "tail"] + [
        "partial",
        "partial",
        "full",
        "partial",
    ]
    # K, V: [B, Hkv, T, D] fp32; attention and MLP outputs: [B, T, d] fp32, per layer.
    cfg = model.config
    per_layer = 2 * cfg.num_key_value_heads * 16 * cfg.head_dim * 4 + 2 * 16 * cfg.d_model * 4
    assert out.stats.response_kv_bytes == cfg.n_layers * per_layer
    assert (out.sequences[:, 40:] != cfg.mask_token_id).all()


def test_dllm_cache_zero_ratio_reuses_features(models):
    # With transfer_ratio 0 an in-between step recomputes nothing inside the layers (the cached
    # attention and MLP outputs are added to the new embeddings); generation still finishes.
    model = models["llada"]
    out = generate(
        model,
        _prompt(P=40, seed=4),
        method=methods.SnapKV(budget=8),
        cache=maskkv.DLLMCache(50, 4, 0.0),
        gen_length=8,
        steps=8,
    )
    assert out.stats.step_kinds[:5] == ["full", "partial", "partial", "partial", "tail"]
    assert (out.sequences[:, 40:] != model.config.mask_token_id).all()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_threshold_out_of_reach_reveals_one_token_per_step(models, kind):
    # No probability reaches 1.0 on a random model: each step reveals exactly the most confident
    # token; for LLaDA that is low-confidence remasking with one token per step.
    model = models[kind]
    prompt = _prompt(P=40, seed=5)
    kw = dict(gen_length=16, block_length=8)
    out = generate(model, prompt, method="fullcache", decoding=maskkv.Threshold(1.0), **kw, steps=2)
    assert out.stats.tokens_per_step == [1.0] * 16
    assert out.stats.nfe == 16
    if kind == "llada":
        one = generate(model, prompt, method="fullcache", steps=16, **kw)
        assert torch.equal(out.sequences, one.sequences)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_single_block_prefix_equals_prompt_cache(models, kind):
    # One block, no prompt refresh: the prefix cache recomputes the whole tail at every step,
    # which is exactly PromptCache (and for LLaDA the dual cache too: the block is the tail).
    model = models[kind]
    prompt = _prompt(P=40, seed=6)
    kw = dict(method=methods.SnapKV(budget=8), gen_length=8, block_length=8, steps=4, alg="entropy")
    ref = generate(model, prompt, **kw)
    policies = [maskkv.PrefixCache()] + ([maskkv.DualCache()] if kind == "llada" else [])
    for policy in policies:
        out = generate(model, prompt, cache=policy, **kw)
        assert torch.equal(out.sequences, ref.sequences), policy


@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("name", methods.available())
def test_every_method_with_every_policy_batch_two_left_padded(models, kind, name):
    model = models[kind, "sharp"]
    cfg = model.config
    B, P, R = 2, 36, 8
    ids = _prompt(B=B, P=P, seed=7)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :10] = 0
    ids[1, :10] = cfg.pad_token_id
    method = methods.get(name) if name in ("fullcache", "nocache") else methods.get(name, budget=8)
    policies = [
        (maskkv.PromptCache(), maskkv.FixedSteps()),
        (maskkv.PrefixCache(), maskkv.Threshold(0.9)),
        (maskkv.DualCache(), maskkv.Factor(1.0)),
        (maskkv.DualCache(refresh_prompt=True), maskkv.Threshold(0.9)),
        (maskkv.DLLMCache(4, 2, 0.5), maskkv.FixedSteps()),
    ]
    methods.profile._reset_missing_profile_warnings()
    for policy, rule in policies:
        with (
            pytest.warns(methods.MissingProfileWarning)
            if name in ("maskkv", "squeezeattention", "tailvote")
            else _null()
        ):
            methods.profile._reset_missing_profile_warnings()
            out = generate(
                model,
                ids,
                method=method,
                cache=policy,
                decoding=rule,
                attention_mask=mask,
                gen_length=R,
                block_length=4,
                steps=4,
            )
        stats = out.stats
        assert (out.sequences[:, P:] != cfg.mask_token_id).all(), (policy, rule)
        assert sum(stats.tokens_per_step) == R
        assert len(stats.tokens_per_step) == stats.nfe
        assert stats.refresh_time + stats.inner_time == pytest.approx(stats.total_time)
        if method.caches_prompt and policy.keeps_response_kv:
            assert stats.response_kv_bytes > 0
        else:
            assert stats.response_kv_bytes == 0


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_left_padded_row_equals_unpadded_with_dual_cache_and_threshold(models, kind):
    model = models[kind, "sharp"]
    cfg = model.config
    short = _prompt(B=1, P=30, seed=8)
    padded = torch.cat([torch.full((1, 10), cfg.pad_token_id), short], 1)
    batch = torch.cat([_prompt(B=1, P=40, seed=9), padded])
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :10] = 0
    kw = dict(
        method=methods.SnapKV(budget=8, window=4),
        cache=maskkv.DualCache(),
        decoding=maskkv.Threshold(0.9),
        gen_length=8,
        block_length=4,
        steps=4,
        alg="entropy",  # Dream's default "origin" reveals random positions
    )
    alone = generate(model, short, **kw)
    both = generate(model, batch, attention_mask=mask, **kw)
    assert torch.equal(both.sequences[1, 40:], alone.sequences[0, 30:])


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_block_wise_every_algorithm(models, alg):
    model = models["dream", "sharp"]
    prompt = _prompt(P=36, seed=10)
    kw = dict(gen_length=8, block_length=4, steps=4, alg=alg, seed=0)
    for cache, rule in [
        (maskkv.PromptCache(), maskkv.FixedSteps()),
        (maskkv.DualCache(), maskkv.Threshold(0.9)),
        (maskkv.PrefixCache(refresh_prompt=True), maskkv.Factor(1.0)),
    ]:
        out = generate(model, prompt, method="fullcache", cache=cache, decoding=rule, **kw)
        assert (out.sequences[:, 36:] != model.config.mask_token_id).all(), (alg, cache, rule)
        if rule.fixed:
            assert out.stats.nfe == 4


def test_dream_blocks_reveal_in_order(models):
    # Block-wise Dream: after the first block's steps only the first block is decoded.
    model = models["dream"]
    seen = []

    def spy(x, need):
        seen.append(need.clone())
        return torch.randn(int(need.sum()), model.config.vocab_size)

    from maskkv.generation.dream import sample_dream

    sample_dream(spy, _prompt(P=10), mask_id=model.config.mask_token_id, gen_length=8, steps=4,
                 block_length=4)  # fmt: skip
    assert all(not n[:, 4:].any() for n in seen[:2])
    assert all(not n[:, :4].any() for n in seen[2:])


def _factor_reference(sorted_conf, f):
    threshs = [1 - f / (n + 1) for n in range(1, len(sorted_conf) + 1)]
    threshs[0] = -1
    for top in range(len(threshs)):
        if sorted_conf[top] < threshs[top]:
            break
    if top == 0 or top == len(threshs) - 1:
        top += 1
    return top


def test_rule_counts():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(64, 12, generator=g, dtype=torch.float64) ** 0.2
    need = torch.rand(64, 12, generator=g) < 0.7
    need[0] = False  # a row with nothing masked reveals nothing
    need[1] = False
    need[1, 3] = True  # a single mask is always revealed
    for f in (0.5, 1.0, 2.0):
        counts = maskkv.Factor(f).count(prob, need)
        for b in range(64):
            srt = sorted(prob[b][need[b]].tolist(), reverse=True)
            assert int(counts[b]) == (_factor_reference(srt, f) if srt else 0), (f, b)
    counts = maskkv.Threshold(0.9).count(prob, need)
    expected = ((prob >= 0.9) & need).sum(-1).clamp_min(1) * need.any(-1)
    assert torch.equal(counts, expected)
    chosen = select_top(torch.where(need, prob, -torch.inf), counts)
    assert torch.equal(chosen.sum(-1), counts)
    assert not (chosen & ~need).any()


def test_bad_inputs(models):
    model = models["llada"]
    ids = _prompt(P=8)
    for bad in (0, 0.0, -0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="tau"):
            maskkv.Threshold(bad)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="f: expected"):
            maskkv.Factor(bad)
    with pytest.raises(ValueError, match="prompt_interval"):
        maskkv.DLLMCache(prompt_interval=0)
    with pytest.raises(ValueError, match="response_interval"):
        maskkv.DLLMCache(response_interval=-5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="transfer_ratio"):
            maskkv.DLLMCache(transfer_ratio=bad)
    with pytest.raises(ValueError, match="refresh_prompt"):
        maskkv.DualCache(refresh_prompt="yes")
    with pytest.raises(ValueError, match="cache: expected"):
        generate(model, ids, method="nocache", cache="h2o", gen_length=4)
    with pytest.raises(ValueError, match="decoding: expected"):
        generate(model, ids, method="nocache", decoding="greedy", gen_length=4)
    with pytest.raises(ValueError, match="block_length"):
        generate(model, ids, cache="dual", gen_length=8, block_length=3)
    with pytest.raises(ValueError, match="steps"):
        generate(model, ids, cache="prefix", gen_length=8, block_length=4, steps=3)
    dream = models["dream"]
    with pytest.raises(ValueError, match="block_length"):
        generate(dream, ids, cache="dual", gen_length=8, block_length=3)
    with pytest.raises(ValueError, match="steps"):
        generate(dream, ids, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="alg_temp"):
        generate(dream, ids, gen_length=4, decoding=maskkv.Threshold(0.9), alg_temp=0.5)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
