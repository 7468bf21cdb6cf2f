"""LLaDA2 (block-causal, MoE) and LLaDA-MoE generation on tiny checkpoints: caching is exact for
the block-causal model (FullCache == NoCache at 2 and 3 layers, every cache policy), a padded
batch row generates what it generates alone, every method runs on both families with exact
budgets, the MoE backends agree, and bad input is named. The official samplers:
tests/test_official_exact_moe.py."""

import contextlib

import pytest
import torch

from maskkv import methods
from maskkv.generation import DualCache, PrefixCache, PromptCache, Threshold, generate
from maskkv.generation.block_causal import BlockCausalDenoiser, BlockLayout
from maskkv.models import _moe, load_checkpoint
from maskkv.models._common import block_causal_attention
from maskkv.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind, layers in (("llada2", 2), ("llada2", 3), ("lladamoe", 2)):
        path = tiny_checkpoint(kind, tmp_path_factory.mktemp(kind), num_hidden_layers=layers,
                               **({"moe_layer_freq": [0, 1]} if kind == "lladamoe" else {}))  # fmt: skip
        out[kind, layers] = load_checkpoint(path).eval()
    return out


def _prompt(B=1, P=40, seed=0):
    return torch.randint(0, 250, (B, P), generator=torch.Generator().manual_seed(seed))


def test_block_layout_aligns_rows_on_one_grid():
    prompt = torch.arange(1, 31)[None].repeat(2, 1)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :13] = 0  # row 1: 17 real tokens
    layout, x = BlockLayout.build(prompt, mask, gen_length=10, block_length=8, mask_id=99)
    # Row 0: 3 complete blocks + 6 tail tokens; row 1: 2 blocks + 1; both start generating at 24.
    assert layout.head == 24 and layout.blocks == 2 and layout.pad.tolist() == [0, 8]
    assert layout.prompt_tail.tolist() == [6, 1] and layout.mask_start == 30
    assert x[0, :30].tolist() == list(range(1, 31)) and (x[0, 30:] == 99).all()
    assert x[1, 8:25].tolist() == list(range(14, 31)) and (x[1, 25:] == 99).all()
    assert layout.positions(x.device)[1, 8:26].tolist() == list(range(18))
    assert layout.key_valid(x.device)[1].tolist() == [False] * 8 + [True] * 32


def test_block_causal_attention_chunks_equal_one_masked_pass():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, :16] = False
    ref = block_causal_attention(q, k, v, 8, valid, query_chunk=4096)
    out = block_causal_attention(q, k, v, 8, valid, query_chunk=16)  # 5 chunks of 2 blocks
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # Against the plain definition: key j visible from query i iff block(j) <= block(i).
    blk = torch.arange(70) // 8
    allowed = (blk[None] <= blk[:, None])[None, None] & valid[:, None, None]
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4
    naive = s.masked_fill(~allowed, -torch.inf).softmax(-1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out[0], naive[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, :, 16:], naive[1, :, 16:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize(
    "cache", [DualCache(), PrefixCache(refresh_prompt=True), PromptCache()], ids=str
)
def test_llada2_fullcache_equals_nocache(models, layers, cache):
    model = models["llada2", layers]
    for seed, P in ((0, 37), (1, 32)):
        ids = _prompt(1, P, seed)
        kw = dict(gen_length=20, block_length=8, steps=8)
        ref = generate(model, ids, method="nocache", **kw)
        out = generate(model, ids, method="fullcache", cache=cache, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        kinds = out.stats.step_kinds
        assert kinds[0] == "full" and "tail" in kinds
        if isinstance(cache, PromptCache):
            assert out.stats.response_kv_bytes == 0
        else:
            assert out.stats.response_kv_bytes > 0


def test_llada2_cached_step_logits_match_the_window_forward(models):
    # A later step's logits (pruned prompt = whole prompt) equal the block-causal forward of the
    # window, up to float rounding.
    model = models["llada2", 3]
    ids = _prompt(1, 29, 2)
    layout, x = BlockLayout.build(ids, None, gen_length=12, block_length=8, mask_id=258)
    den = BlockCausalDenoiser(model, methods.get("fullcache"), layout)
    den.start_block(x, 0)
    den.block_logits(x, 0)
    x[:, 29:32] = torch.tensor([5, 6, 7])  # finish block 0, then start block 1
    den.start_block(x, 1)
    got = den.block_logits(x, 1)
    with torch.no_grad():
        lo, hi = layout.block(1)
        ref = model(x[:, :hi], block_length=8).logits[:, lo:hi]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert den.stats.step_kinds == ["full", "tail", "tail"]  # step 1, commit, step


@pytest.mark.parametrize("method", ["nocache", "fullcache"])
def test_llada2_left_padded_rows_equal_rows_alone(models, method):
    model = models["llada2", 2]
    lens = (30, 17, 24)
    P = max(lens)
    ids = torch.full((3, P), 257)
    mask = torch.zeros(3, P, dtype=torch.long)
    alone = []
    for b, n in enumerate(lens):
        row = _prompt(1, n, seed=10 + b)
        ids[b, P - n :], mask[b, P - n :] = row[0], 1
        alone.append(generate(model, row, method=method, gen_length=12, block_length=8, steps=4))
    out = generate(model, ids, attention_mask=mask, method=method, gen_length=12, block_length=8,
                   steps=4)  # fmt: skip
    for b in range(3):
        assert torch.equal(out.responses[b], alone[b].responses[0]), b


@pytest.mark.parametrize("kind", ["llada2", "lladamoe"])
@pytest.mark.parametrize("name", methods.available())
def test_every_method_batch_two_left_padded(models, kind, name):
    model = models[kind, 2]
    cfg = model.config
    B, P, R = 2, 44, 8
    ids = _prompt(B, P, seed=6)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :10] = 0  # row 1: 34 real tokens
    method = methods.get(name, budget=6) if name not in ("fullcache", "nocache") else name
    method = methods.get(method) if isinstance(method, str) else method
    methods.profile._reset_missing_profile_warnings()
    with pytest.warns(methods.MissingProfileWarning) if name in (
        "maskkv", "squeezeattention"
    ) else contextlib.nullcontext():  # fmt: skip
        out = generate(model, ids, method=method, attention_mask=mask, gen_length=R,
                       block_length=8, steps=4)  # fmt: skip
    assert out.sequences.shape == (B, P + R)
    assert (out.sequences[:, P:] != cfg.mask_token_id).all(), "every mask is revealed"
    stats = out.stats
    if not method.caches_prompt:
        assert stats.kept_lengths is None
        return
    # LLaDA2 caches the complete prompt blocks (40 and 32 real tokens: head 40); LLaDA-MoE the
    # whole prompt.
    real = torch.tensor([40, 32]) if kind == "llada2" else torch.tensor([P, P - 10])
    Pc = int(real.max())
    kept = stats.kept_lengths  # [layers, B, Hkv]
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    assert kept.shape == (cfg.num_hidden_layers, B, Hkv)
    if method.evicts:
        budgets = torch.tensor(stats.layer_budgets)[:, None]
        assert torch.equal(kept.sum(-1).long(), Hkv * budgets.clamp_max(real[None]))
    else:
        assert torch.equal(kept, real[None, :, None].expand_as(kept).int())
    assert stats.prompt_kv_bytes_kept == int(kept.sum()) * 2 * D * 4
    assert stats.prompt_kv_bytes_full == cfg.num_hidden_layers * B * Hkv * Pc * 2 * D * 4


def test_llada2_threshold_reveals_more_per_step(models):
    model = models["llada2", 2]
    ids = _prompt(1, 33, 4)
    kw = dict(method="fullcache", gen_length=32, block_length=16, steps=16)
    strict = generate(model, ids, decoding=Threshold(1.0), **kw)
    loose = generate(model, ids, decoding=Threshold(0.01), **kw)
    assert strict.stats.mean_tokens_per_step == pytest.approx(1.0)
    assert loose.stats.nfe < strict.stats.nfe


def test_moe_grouped_backend_matches_the_loop(models, monkeypatch):
    ids = _prompt(2, 24, 5)
    for kind in ("llada2", "lladamoe"):
        model = models[kind, 2]
        with torch.no_grad():
            monkeypatch.setattr(_moe, "MOE_BACKEND", "loop")
            ref = model(ids).logits
            monkeypatch.setattr(_moe, "MOE_BACKEND", "grouped")
            out = model(ids).logits
            again = model(ids).logits  # the stacked weights are reused
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(out, again)
        # The experts' parameters became views of the stack: state_dict names are unchanged.
        experts = next(m for m in model.modules() if isinstance(m, _moe.ExpertList))
        assert experts._stack is not None
        assert experts[1].gate_proj.weight.data_ptr() == experts._stack[1][1].data_ptr()


def test_moe_models_are_graph_safe_only_with_the_grouped_backend(models):
    for kind in ("llada2", "lladamoe"):
        model = models[kind, 2]
        assert model.supports_cuda_graphs is False  # CPU fp32: the loop reads counts on the host


def test_bad_arguments(models):
    model = models["llada2", 2]
    ids = _prompt(1, 12)
    for kwargs, name in (
        (dict(block_length=0), "block_length"),
        (dict(steps=0), "steps"),
        (dict(zero_temperature="argmax"), "zero_temperature"),
        (dict(block_mask="soft"), "block_mask"),
        (dict(block_mask="additive", method="fullcache"), "block_mask"),
        (dict(minimal_topk=100), "minimal_topk"),
        (dict(editing_threshold=1.5), "editing_threshold"),
        (dict(max_post_steps=-1), "max_post_steps"),
        (dict(cfg_scale=1.0), "cfg_scale"),
        (dict(cache="dllm", method="fullcache"), "cache"),
        (dict(editing_threshold=0.9, decoding="fixed"), "decoding"),
    ):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            generate(model, ids, **{"method": "nocache", "gen_length": 8} | kwargs)


def test_lm_eval_model_on_llada2(tmp_path):
    """The lm-eval model on a LLaDA2 checkpoint: generate_until (two ragged prompts, on the
    serving engine) equals ``maskkv.generate`` on each prompt alone; a one-token likelihood is the exact
    log-probability of the block-causal forward over [context, MASK]."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from maskkv.eval_harness import MaskKVLM

    path = tiny_checkpoint("llada2", tmp_path / "ckpt")
    lm = MaskKVLM(pretrained=str(path), method="fullcache", gen_length=8, batch_size=2,
                  block_length=8, steps=4, mc_num=4)  # fmt: skip
    contexts = ["the quick brown fox jumps", "a b c d e f g h i j k l m n o p q r s"]
    requests = [
        Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 8}), i)
        for i, c in enumerate(contexts)
    ]
    outs = lm.generate_until(requests, disable_tqdm=True)
    assert lm._engine_obj is not None  # served by the continuous-batching engine
    for context, text in zip(contexts, outs):
        ids = torch.tensor([lm._encode(context)])
        resp = generate(lm.model, ids, method="fullcache", gen_length=8, block_length=8,
                        steps=4).responses[0].tolist()  # fmt: skip
        assert text == lm._decode_response(resp, [])
    got, _ = lm.loglikelihood([Instance("loglikelihood", {}, (contexts[0], "x"), 0)],
                              disable_tqdm=True)[0]  # fmt: skip
    ctx, cont = lm._encode_pair(contexts[0], "x")
    with torch.no_grad():
        ids = torch.tensor([ctx + [lm.model.config.mask_token_id]])
        logp = torch.log_softmax(lm.model(ids, block_length=8).logits[0, -1], -1)
    assert len(cont) == 1 and got == pytest.approx(float(logp[cont[0]]), abs=1e-4)


@pytest.mark.parametrize("kind", ["llada2", "lladamoe"])
def test_grouped_moe_reads_no_value_on_the_host(kind, monkeypatch):
    """Meta tensors carry no values: an MoE layer that runs on them never reads one on the host
    (no device sync), so a CUDA step that routes tokens can be captured as a graph. The loop
    backend reads the per-expert counts and fails there."""
    from maskkv.models import LLaDA2MoeModelLM, LLaDAMoEModelLM
    from maskkv.testing import tiny_config_dict

    cls = LLaDA2MoeModelLM if kind == "llada2" else LLaDAMoEModelLM
    with torch.device("meta"):
        model = cls(cls.config_class(**tiny_config_dict(kind))).to(torch.bfloat16)
        x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(_moe, "MOE_BACKEND", "grouped")
        assert model.layers[1].mlp_block(x).shape == (2, 5, 64)
        monkeypatch.setattr(_moe, "MOE_BACKEND", "loop")
        with pytest.raises((RuntimeError, NotImplementedError)):
            model.layers[1].mlp_block(x)


# ------------------------------------------------------------------------------------------------
# CUDA: the grouped MoE backend and CUDA-graph replay of later steps
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llada2", "lladamoe"])
def test_cuda_grouped_moe_and_graph_replay(tmp_path, kind, monkeypatch):
    path = tiny_checkpoint(kind, tmp_path / kind, hidden_size=128, moe_intermediate_size=64,
                           expert_intermediate_size=64)  # fmt: skip
    model = load_checkpoint(path, dtype=torch.bfloat16, device="cuda").eval()
    assert model.supports_cuda_graphs  # bf16 on CUDA: the grouped backend, no host sync
    ids = _prompt(2, 40).cuda()
    with torch.no_grad():
        monkeypatch.setattr(_moe, "MOE_BACKEND", "loop")
        ref = model(ids).logits.float()
        monkeypatch.setattr(_moe, "MOE_BACKEND", "auto")
        out = model(ids).logits.float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # bf16, other summation order
    kw = dict(method="fullcache", gen_length=16, block_length=8, steps=4)
    eager = generate(model, ids, cuda_graphs=False, **kw)
    graphed = generate(model, ids, cuda_graphs=True, **kw)
    assert torch.equal(eager.sequences, graphed.sequences)


def test_calibrate_both_families(models):
    from maskkv.calibrate import calibrate

    prompts = [_prompt(1, 40, s)[0] for s in range(2)]
    for key in (("llada2", 3), ("lladamoe", 2)):
        profile = calibrate(models[key], prompts, gen_length=8)
        assert len(profile.importance) == key[1]
        assert all(0 <= x <= 2 for x in profile.importance)


def test_bench_presets_have_the_official_sizes():
    from maskkv.bench.presets import PRESETS, model_config
    from maskkv.models import LLaDA2MoeModelLM, LLaDAMoEModelLM

    for name, cls, billions in (
        ("llada2-mini", LLaDA2MoeModelLM, 16.26),
        ("llada-moe-7b", LLaDAMoEModelLM, 7.36),
    ):
        with torch.device("meta"):
            model = cls(model_config(name))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
        assert PRESETS[name].device == "cuda" and PRESETS[name].dtype == "bfloat16"


def test_cli_generate_on_both_families(tmp_path, capsys):
    from maskkv.cli import main

    for kind in ("llada2", "lladamoe"):
        path = tiny_checkpoint(kind, tmp_path / kind)
        argv = ["generate", "--model", str(path), "--prompt", "a b c d e f g", "--method",
                "maskkv", "--budget", "4", "--gen-length", "16", "--block-length", "8"]  # fmt: skip
        if kind == "llada2":
            argv += ["--editing-threshold", "0.9", "--eos-early-stop"]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "MaskKV" in err and "later steps" in err


@pytest.mark.parametrize(
    ("kind", "overrides", "field"),
    [
        ("llada2", {"num_key_value_heads": 3}, "num_key_value_heads"),
        ("llada2", {"moe_intermediate_size": None}, "moe_intermediate_size"),
        ("llada2", {"n_group": 3}, "n_group"),
        ("llada2", {"topk_group": 5}, "topk_group"),
        ("llada2", {"num_experts_per_tok": 8}, "num_experts_per_tok"),
        ("llada2", {"rotary_dim": 16}, "rotary_dim"),
        ("llada2", {"score_function": "softmax"}, "score_function"),
        ("llada2", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("lladamoe", {"hidden_size": -1}, "hidden_size"),
        ("lladamoe", {"moe_layer_freq": [1]}, "moe_layer_freq"),
        ("lladamoe", {"expert_intermediate_size": -1}, "expert_intermediate_size"),
        ("lladamoe", {"partial_rotary_factor": -1}, "partial_rotary_factor"),
    ],
)
def test_bad_config_is_named(tmp_path, kind, overrides, field):
    from maskkv.testing import tiny_config_dict

    config = tiny_config_dict(kind, **overrides)
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises((ValueError, NotImplementedError), match=field):
        load_checkpoint(tmp_path)


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llada3_moe"}')
    with pytest.raises(ValueError, match=r"^model_type: unsupported 'llada3_moe'"):
        load_checkpoint(tmp_path)


def test_lladamoe_block_length_must_divide(models):
    with pytest.raises(ValueError, match=r"^block_length: expected a divisor of gen_length"):
        generate(models["lladamoe", 2], _prompt(1, 12), method="nocache", gen_length=12,
                 block_length=8)  # fmt: skip
