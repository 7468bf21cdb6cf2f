"""Generation on tiny checkpoints: caching is exact where it can be, every method runs on both models
(GQA, batch 2 left-padded), and the stats tell the truth. The samplers against the official code:
tests/test_official_exact.py."""

import pytest
import torch
import torch.nn.functional as F

from maskkv import methods
from maskkv.generation import generate
from maskkv.generation.engine import Denoiser
from maskkv.models import load_checkpoint
from maskkv.testing import tiny_checkpoint

KINDS = ["llada", "dream"]
ALL_KINDS = ["llada", "llada-gqa", "dream"]
LAYERS = {"llada": "n_layers", "dream": "num_hidden_layers"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in KINDS:
        for layers in (1, 3):
            path = tiny_checkpoint(
                kind, tmp_path_factory.mktemp(f"{kind}{layers}"), **{LAYERS[kind]: layers}
            )
            out[kind, layers] = load_checkpoint(path).eval()
    # LLaDA-8B has as many KV heads as query heads, but the layout allows GQA: exercise it too.
    path = tiny_checkpoint("llada", tmp_path_factory.mktemp("llada-gqa"), n_layers=3, n_kv_heads=2)
    out["llada-gqa", 3] = load_checkpoint(path).eval()
    return out


def _prompt(B=1, P=48, seed=0, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, P), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_seeded_and_cfg_caches_exactly(models, kind):
    model = models[kind, 1]
    prompt = _prompt(P=36, seed=9)
    extra = dict(cfg_scale=1.5) if kind == "llada" else dict(alg="origin", top_p=0.9, top_k=50)
    kw = dict(gen_length=8, block_length=8, steps=4, temperature=0.7, seed=3, **extra)
    a = generate(model, prompt, method="nocache", **kw)
    b = generate(model, prompt, method="nocache", **kw)
    c = generate(model, prompt, method="fullcache", **kw)
    assert torch.equal(a.sequences, b.sequences), "same seed, same sample"
    assert torch.equal(a.sequences, c.sequences), "one layer: caching is exact, also with CFG"
    assert (a.sequences[:, 36:] != model.config.mask_token_id).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fullcache_equals_nocache_with_one_layer(models, kind):
    # With one layer the prompt KV depend on prompt embeddings only, so caching them is exact.
    model = models[kind, 1]
    prompt = _prompt(P=40, seed=1)
    kw = dict(gen_length=16, block_length=8, steps=8, alg="entropy")
    a = generate(model, prompt, method="nocache", **kw)
    b = generate(model, prompt, method="fullcache", **kw)
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_match_a_frozen_prompt_recompute(models, kind):
    # Step 2 of FullCache must equal a dense forward in which each layer's prompt K/V are the ones
    # step 1 produced: check by comparing the cached path's logits with the dense path's at step 1
    # (nothing revealed yet: both see the same sequence), where they must agree to rounding.
    model = models[kind, 3]
    prompt = _prompt(P=40, seed=2)
    P, R = prompt.shape[1], 8
    x = F.pad(prompt, (0, R), value=model.config.mask_token_id)
    need = torch.ones(1, R, dtype=torch.bool)
    cached = Denoiser(model, methods.FullCache(), P)
    first = cached(x, need)
    second = cached(x, need)  # the cached pass over an unchanged sequence
    dense = Denoiser(model, methods.NoCache(), P)(x, need)
    torch.testing.assert_close(first, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_nocache_logits_equal_model_forward(models, kind):
    model = models[kind, 3]
    prompt = _prompt(P=30, seed=3)
    x = F.pad(prompt, (0, 6), value=model.config.mask_token_id)
    need = torch.tensor([[True, False, True, True, False, True]])
    logits = Denoiser(model, methods.NoCache(), 30)(x, need)
    full = model(x).logits.float()[0]
    shift = 1 if kind == "dream" else 0
    cols = 30 + need[0].nonzero()[:, 0] - shift
    torch.testing.assert_close(logits, full[cols], rtol=1e-5, atol=1e-5)


def test_dream_first_token_comes_from_last_prompt_position(models):
    model = models["dream", 3]
    prompt = _prompt(P=20, seed=4)
    out = generate(model, prompt, method="fullcache", gen_length=1, steps=1)
    x = F.pad(prompt, (0, 1), value=model.config.mask_token_id)
    expected = model(x).logits[0, 19].argmax()
    assert out.sequences[0, 20] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_budget_covering_the_prompt_equals_fullcache(models, kind):
    model = models[kind, 3]
    prompt = _prompt(P=40, seed=5)
    kw = dict(gen_length=16, block_length=8, steps=8, alg="entropy")
    full = generate(model, prompt, method="fullcache", **kw)
    for name in ("maskkv", "snapkv", "adakv"):
        big = generate(model, prompt, method=methods.get(name, budget=64), **kw)
        assert torch.equal(big.sequences, full.sequences), name


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("name", methods.available())
def test_every_method_batch_two_left_padded(models, kind, name):
    model = models[kind, 3]
    cfg = model.config
    B, P, R = 2, 44, 8
    ids = _prompt(B=B, P=P, seed=6)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :10] = 0  # row 1: 34 real tokens, left padded
    ids[1, :10] = cfg.pad_token_id
    method = (
        methods.get(name, budget=12) if name not in ("fullcache", "nocache") else methods.get(name)
    )
    # Dream's default "origin" sampler reveals by random draws: from an unseeded global RNG
    # (whatever tests ran before on this xdist worker) every mask can be out after 3 of the 4 steps.
    torch.manual_seed(0)
    with (
        pytest.warns(methods.MissingProfileWarning)
        if name in ("maskkv", "squeezeattention", "tailvote")
        else _null()
    ):
        methods.profile._reset_missing_profile_warnings()
        out = generate(
            model, ids, method=method, attention_mask=mask, gen_length=R, block_length=R, steps=4
        )
    assert out.sequences.shape == (B, P + R)
    assert (out.sequences[:, P:] != cfg.mask_token_id).all(), "every mask is revealed"
    stats = out.stats
    assert len(stats.step_times) == 4
    if not method.caches_prompt:
        assert stats.kept_lengths is None
        return
    shift = 1 if kind == "dream" else 0
    Pc = P - shift
    kept = stats.kept_lengths  # [layers, B, Hkv]
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    assert kept.shape == (cfg.num_hidden_layers, B, Hkv)
    real = torch.tensor([Pc, Pc - 10])
    if method.evicts:
        budgets = torch.tensor(stats.layer_budgets)[:, None]
        assert torch.equal(kept.sum(-1).long(), Hkv * budgets.clamp_max(real[None]))
    else:
        assert torch.equal(kept, real[None, :, None].expand_as(kept).int())
    # The cache holds exactly the kept rows: keys and values, D elements each, fp32.
    assert stats.prompt_kv_bytes_kept == int(kept.sum()) * 2 * D * 4
    assert stats.prompt_kv_bytes_full == cfg.num_hidden_layers * B * Hkv * Pc * 2 * D * 4


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_row_equals_unpadded_generation(models, kind):
    model = models[kind, 3]
    cfg = model.config
    short = _prompt(B=1, P=34, seed=7)
    padded = torch.cat([torch.full((1, 10), cfg.pad_token_id), short], 1)
    batch = torch.cat([_prompt(B=1, P=44, seed=8), padded])
    mask = torch.ones(2, 44, dtype=torch.long)
    mask[1, :10] = 0
    kw = dict(gen_length=8, block_length=8, steps=4, alg="entropy")
    for name in ("fullcache", "snapkv"):
        method = methods.get(name, budget=12, window=4) if name == "snapkv" else methods.get(name)
        alone = generate(model, short, method=method, **kw)
        both = generate(model, batch, method=method, attention_mask=mask, **kw)
        assert torch.equal(both.sequences[1, 44:], alone.sequences[0, 34:]), name


def test_bad_arguments(models):
    model = models["llada", 1]
    with pytest.raises(ValueError, match=r"input_ids: expected a \[B, P\]"):
        generate(model, torch.zeros(5, dtype=torch.long), method="nocache")
    with pytest.raises(ValueError, match=r"attention_mask: expected \[B=1, P=5\]"):
        generate(model, torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="block_length"):
        generate(
            model,
            torch.zeros(1, 5, dtype=torch.long),
            method="nocache",
            gen_length=8,
            block_length=3,
        )
    with pytest.raises(ValueError, match="name: unknown method"):
        generate(model, torch.zeros(1, 5, dtype=torch.long), method="h2o")
    with pytest.raises(ValueError, match="step1_lse must be True, False, 'cudnn' or 'flash'"):
        Denoiser(model, methods.MaskKV(budget=4), 5, step1_lse="sdpa")


def test_step1_lse_falls_back_off_cuda():
    """Off CUDA no fused forward returns the LSE: plain SDPA, lse None, same output."""
    from maskkv.generation.engine import dense_attention

    q, k, v = (torch.randn(1, 4, 40, 16) for _ in range(3))
    out, lse = dense_attention(q, k, v, None, 16, lse_from=30)
    assert lse is None
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_llada_gumbel_noise_follows_the_official_stream_up_to_the_cap(monkeypatch):
    # Below FULL_NOISE_MAX_BYTES the noise is the official [B, L, V] draw indexed at the needed
    # rows; above it only [n, V] is drawn (no [B, L, V] tensor at long prompts).
    from maskkv.generation import llada

    rows = (torch.tensor([0, 1, 1]), torch.tensor([5, 2, 7]))
    torch.manual_seed(0)
    official = torch.rand((2, 9, 11), dtype=torch.float64)[rows]
    torch.manual_seed(0)
    assert torch.equal(llada.gumbel_uniforms(rows, (2, 9, 11), torch.device("cpu")), official)
    monkeypatch.setattr(llada, "FULL_NOISE_MAX_BYTES", 2 * 9 * 11 * 8 - 1)
    torch.manual_seed(0)
    small = llada.gumbel_uniforms(rows, (2, 9, 11), torch.device("cpu"))
    torch.manual_seed(0)
    assert small.shape == (3, 11) and torch.equal(small, torch.rand((3, 11), dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_first_pass_memo_replays_step_one_exactly(models, kind):
    from maskkv.generation import FirstPassMemo

    model = models[kind, 3]
    ids = _prompt(B=2, P=48, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the attention mask is part of what must match
    runs = [
        ("fullcache", None),
        ("maskkv", methods.MaskKV(budget=8)),
        ("snapkv", methods.SnapKV(budget=16)),
        ("adakv", methods.AdaKV(budget=8)),
        ("nocache", None),
        ("dual", methods.MaskKV(budget=8)),
        ("dllm", methods.MaskKV(budget=8)),  # keeps block outputs: not served by the memo
    ]
    memo = FirstPassMemo()
    for name, method in runs:
        cache = name if name in ("dual", "dllm") else None
        method = method if method is not None else name
        kw = dict(gen_length=8, steps=8, attention_mask=mask, cache=cache, method=method, seed=0)
        alone, shared = generate(model, ids, **kw), generate(model, ids, first_pass=memo, **kw)
        assert torch.equal(shared.sequences, alone.sequences), name
        if alone.stats.first_kept_positions is not None:
            for a, b in zip(alone.stats.first_kept_positions, shared.stats.first_kept_positions):
                assert torch.equal(a, b), name
    assert memo.replays == len(runs) - 2  # all but the recording run and DLLMCache's
    assert memo.nbytes > 0
    # Another batch is not served from the record: it recomputes (and records itself).
    other = _prompt(B=2, P=48, seed=4)
    kw = dict(gen_length=8, steps=8, method=methods.MaskKV(budget=8), seed=0)
    shared = generate(model, other, first_pass=memo, **kw)
    assert torch.equal(shared.sequences, generate(model, other, **kw).sequences)
    assert memo.replays == len(runs) - 2
