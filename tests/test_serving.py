"""The serving engine (maskkv.serving): batch invariance against ``maskkv.generate`` on the
shipped models (LLaDA, Dream, block-causal LLaDA2) and a tiny LLaDA-MoE, admission by KV bytes,
exact accounting, chunked prompt passes, faults. CUDA-graph buckets: tests/test_serving_graphs.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import maskkv
from maskkv import methods
from maskkv.cli_common import ASSETS
from maskkv.generation import DualCache, Factor, FixedSteps, PrefixCache, PromptCache, Threshold
from maskkv.models import load_checkpoint
from maskkv.serving import Engine, FinishReason, RequestTooLarge, SamplingParams
from maskkv.testing import tiny_checkpoint

warnings.filterwarnings("ignore", category=methods.MissingProfileWarning)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {k: load_checkpoint(ASSETS / f"tiny-{k}-kv").eval() for k in ("llada", "dream", "llada2")}
    path = tiny_checkpoint("lladamoe", tmp_path_factory.mktemp("lladamoe"), num_hidden_layers=2,
                           moe_layer_freq=[0, 1])  # fmt: skip
    out["lladamoe"] = load_checkpoint(path).eval()
    return out


def _workload(n: int, seed: int, rules: bool = True):
    """n requests of different prompt lengths (40-230 tokens), generation lengths, blocks,
    decoding rules and seeds."""
    g = torch.Generator().manual_seed(seed)
    prompts, params = [], []
    shapes = [(8, 4), (16, 8), (12, 4), (24, 8), (8, 8), (16, 4)]
    for i in range(n):
        P = int(torch.randint(40, 230, (1,), generator=g))
        prompts.append(torch.randint(0, 256, (P,), generator=g))
        gen, block = shapes[i % len(shapes)]
        decoding = [None, Threshold(0.7), Factor(1.0)][i % 3] if rules else None
        steps = gen if i % 4 else gen // 2  # two tokens per step for some
        params.append(
            SamplingParams(
                gen_length=gen, block_length=block, steps=steps, decoding=decoding, seed=i
            )
        )
    return prompts, params


def _llada2_workload(n: int, seed: int):
    """n LLaDA2 requests: prompts of 40-200 tokens (blocks counted from their first token),
    generation lengths not multiples of the block, blocks of 2-8, the official threshold rule and
    the others, greedy and sampled (top-k, top-p), the 2.1 editing loop, EOS early stop."""
    g = torch.Generator().manual_seed(seed)
    prompts, params = [], []
    shapes = [(10, 4, 4), (13, 2, 2), (7, 8, 4), (16, 4, 2), (12, 8, 8), (9, 2, 1)]
    for i in range(n):
        P = int(torch.randint(40, 200, (1,), generator=g))
        prompts.append(torch.randint(0, 250, (P,), generator=g))
        gen, block, steps = shapes[i % len(shapes)]
        opts = dict(gen_length=gen, block_length=block, steps=steps, seed=i)
        opts["decoding"] = [None, Threshold(0.6), Factor(1.0), FixedSteps()][i % 4]
        if i % 3 == 1:
            opts.update(temperature=0.8, top_k=40) if i % 2 else opts.update(temperature=0.7,
                                                                            top_p=0.9)  # fmt: skip
        if i % 5 == 2:
            opts.update(editing_threshold=0.9, max_post_steps=2, decoding=Threshold(0.5))
        if i % 7 == 3:
            opts.update(eos_early_stop=True)
        params.append(SamplingParams(**opts))
    return prompts, params


def _alone(model, method, cache, prompt, p: SamplingParams) -> list[int]:
    """``maskkv.generate`` on one request with the request's options."""
    options = {name: getattr(p, name) for name in p.__dataclass_fields__ if name != "stop_at_eos"}
    out = maskkv.generate(model, prompt[None], method=method, cache=cache, **options)
    return out.responses[0].tolist()


CASES = [
    ("llada", "maskkv", PromptCache()),
    ("llada", "snapkv", DualCache()),
    ("llada", "fullcache", PrefixCache(refresh_prompt=True)),
    ("dream", "adakv", PromptCache()),
    ("dream", "maskkv", DualCache()),
]


@pytest.mark.parametrize(
    ("kind", "method_name", "cache"), CASES, ids=lambda c: getattr(c, "name", c)
)
def test_batch_invariance_staggered_arrivals(models, kind, method_name, cache):
    """18 requests of different prompt / generation lengths and decoding rules arrive over
    several iterations into an engine whose KV budget holds only some of them at once: each
    request's tokens equal ``maskkv.generate`` on it alone (same method, budget, policy, rule,
    seed); the pool is empty at the end and never held more than its budget."""
    method = methods.get(method_name, **({} if method_name == "fullcache" else {"budget": 16}))
    _check_invariance(models[kind], method, cache, seed=sum(map(ord, kind + method_name)))


MOE_CASES = [
    ("llada2", "maskkv", DualCache()),
    ("llada2", "fullcache", PromptCache()),
    ("llada2", "snapkv", PrefixCache(refresh_prompt=True)),
    ("llada2", "nocache", DualCache()),
    ("lladamoe", "maskkv", DualCache()),
    ("lladamoe", "adakv", PromptCache()),
]


@pytest.mark.parametrize(
    ("kind", "method_name", "cache"), MOE_CASES, ids=lambda c: getattr(c, "name", c)
)
def test_moe_families_batch_invariance(models, kind, method_name, cache):
    """The same contract on the MoE families: LLaDA2 (block-causal; the shipped
    tiny-llada2-kv) decodes block by block with its own sampler, its committed blocks' KV in the
    pool (dual / prefix), every block recomputed (prompt), the window recomputed at each block
    (refresh_prompt), or the window every step (NoCache); LLaDA-MoE runs LLaDA's sampler. Expert
    rows per call depend on the batch, the tokens do not."""
    method = methods.get(
        method_name, **({} if method_name in ("fullcache", "nocache") else {"budget": 16})
    )
    workload = _llada2_workload if kind == "llada2" else _workload
    _check_invariance(models[kind], method, cache, seed=sum(map(ord, kind + method_name)),
                      workload=workload, n=12)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache", [PromptCache(), DualCache()], ids=["prompt", "dual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariance_on_cuda(models, cache, dtype):
    """The same contract on a GPU (cuBLAS picks kernels by shape; the invariant linear's fixed
    chunks must hide that; ``maskkv.generate`` replays CUDA graphs, the engine runs eagerly)."""
    model = load_checkpoint(ASSETS / "tiny-llada-kv", dtype=dtype, device="cuda").eval()
    _check_invariance(model, methods.get("maskkv", budget=16), cache, seed=5)


def _check_invariance(model, method, cache, seed: int, workload=_workload, n: int = 18,
                      **engine_kw) -> Engine:  # fmt: skip
    device = next(model.parameters()).device
    prompts, params = workload(n, seed=seed)
    prompts = [p.to(device) for p in prompts]
    probe = Engine(model, method=method, cache=cache, kv_budget=1 << 26)
    rows = [
        probe.runner.footprint(len(p), sp.resolved(model)).rows for p, sp in zip(prompts, params)
    ]
    # a handful at a time: admission queues (NoCache holds no rows)
    budget = max(6 * max(rows) * probe.pool.row_bytes, 1 << 16)
    engine = Engine(model, method=method, cache=cache, kv_budget=budget, prefill_tokens=300,
                    **engine_kw)  # fmt: skip
    reqs, peak, arrivals = [], 0, iter(range(len(prompts)))
    for it in range(10_000):
        for _ in range(3 if it % 2 == 0 else 0):  # three new requests every other iteration
            i = next(arrivals, None)
            if i is not None:
                reqs.append(engine.add_request(prompts[i], params[i]))
        engine.step()
        peak = max(peak, engine.kv_bytes_in_use)
        if len(reqs) == len(prompts) and not engine.has_unfinished():
            break
    assert peak <= engine.pool.capacity_bytes
    assert engine.kv_bytes_in_use == 0
    assert max(len(r.token_ids) for r in reqs) == max(p.gen_length for p in params)
    for req, prompt, p in zip(reqs, prompts, params):
        assert req.finish_reason is FinishReason.LENGTH
        assert req.token_ids == _alone(model, method, cache, prompt, p), req.request_id
    return engine


def test_generate_keeps_input_order_and_stops_at_eos(models):
    """``Engine.generate``: outputs in input order; ``stop_at_eos`` ends a request at the block
    holding EOS, its tokens a prefix of the full run."""
    model = models["llada"]
    engine = Engine(model, method=methods.get("maskkv", budget=16), kv_budget=1 << 24)
    prompts, params = _workload(6, seed=7, rules=False)
    outs = engine.generate(prompts, params, progress=False)
    assert [len(o.token_ids) for o in outs] == [p.gen_length for p in params]
    for o, prompt in zip(outs, prompts):
        assert o.prompt_ids == prompt.tolist()
    stopped = engine.generate(
        prompts, [p.replace(stop_at_eos=True) for p in params], progress=False
    )
    eos = model.config.eos_token_id
    assert any(o.finish_reason is FinishReason.STOP for o in stopped)
    for full, short in zip(outs, stopped):
        assert short.token_ids == full.token_ids[: len(short.token_ids)]
        if short.finish_reason is FinishReason.STOP:
            assert eos in short.token_ids and len(short.token_ids) < len(full.token_ids)


def test_kv_bytes_are_exact_and_fifo_admission(models):
    """Reserved rows = the selection's kept rows + the stored response, to the byte; a large
    request at the head of the queue is not overtaken by smaller ones; one that can never fit
    is refused with the sizes in the message."""
    model = models["dream"]
    method = methods.get("snapkv", budget=16)
    probe = Engine(model, method=method, cache="dual", kv_budget=1 << 24)
    small = probe.runner.footprint(60, SamplingParams(gen_length=8).resolved(model))
    large = probe.runner.footprint(200, SamplingParams(gen_length=32).resolved(model))
    engine = Engine(
        model,
        method=method,
        cache="dual",
        kv_budget=(small.rows + large.rows) * probe.pool.row_bytes,
    )
    g = torch.Generator().manual_seed(0)
    p_small = torch.randint(0, 256, (60,), generator=g)
    p_large = torch.randint(0, 256, (200,), generator=g)
    a = engine.add_request(p_small, SamplingParams(gen_length=8, block_length=4, steps=8, seed=0))
    engine.step()  # a is admitted and runs its prompt pass
    H, D = 2, 32
    layers = len(model.layers)
    kept = sum(int(cu[-1]) for cu in a.cu_seqlens)  # rows the selection actually kept
    assert kept == sum(small.prompt_rows)
    tail = 8 + 1  # the response and Dream's last prompt position, per layer and KV head
    assert engine.kv_bytes_in_use == (kept + layers * tail * H) * (2 * D * 4 + 4)
    b = engine.add_request(p_large, SamplingParams(gen_length=32, block_length=8, steps=16, seed=1))
    b2 = engine.add_request(
        p_large, SamplingParams(gen_length=32, block_length=8, steps=16, seed=2)
    )
    c = engine.add_request(p_small, SamplingParams(gen_length=8, block_length=4, steps=8, seed=3))
    engine.step()
    # b fits beside a, b2 does not: c (which would fit) waits behind b2
    assert b.pool_range is not None and b2.pool_range is None and c.pool_range is None
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_bytes_in_use == 0
    assert all(r.finish_reason is FinishReason.LENGTH for r in (a, b, b2, c))
    with pytest.raises(RequestTooLarge, match=r"prompt: .* bytes of KV cache .* can never run"):
        engine.add_request(
            torch.randint(0, 256, (900,), generator=g), SamplingParams(gen_length=64)
        )


def test_long_prompt_pass_is_chunked_between_steps(models):
    """With a small prefill budget a long prompt's pass spans several iterations, one layer at
    a time, while an already running request keeps taking a step every iteration."""
    model = models["llada"]
    engine = Engine(model, method=methods.get("maskkv", budget=16), kv_budget=1 << 24,
                    prefill_tokens=64)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    short = engine.add_request(
        torch.randint(0, 256, (40,), generator=g), SamplingParams(gen_length=32)
    )
    while short.passes < 2:  # its own prompt pass (72 tokens) took 4 iterations
        engine.step()
    long = engine.add_request(
        torch.randint(0, 256, (600,), generator=g), SamplingParams(gen_length=8)
    )
    layers_seen, short_passes = [], []
    while long.passes == 0:
        before = short.passes
        engine.step()
        layers_seen.append(None if long.full_pass is None else long.full_pass.layer)
        short_passes.append(short.passes - before)
    assert layers_seen[:3] == [1, 2, 3]  # one layer per iteration
    assert all(n == 1 for n in short_passes)  # the short request never stalled


def test_one_failing_request_fails_alone(models, monkeypatch):
    """An exception in one request's forward or sampler step fails that request only; the
    others finish with the tokens they get alone, and the pool is empty at the end."""
    model = models["llada"]
    method = methods.get("maskkv", budget=16)
    engine = Engine(model, method=method, kv_budget=1 << 24)
    prompts, params = _workload(5, seed=3, rules=False)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    bad_forward = reqs[1].request_id
    runner_forward = engine.runner.tail_forward

    def faulty_forward(batch):
        if any(r.request_id == bad_forward for r in batch) and batch[0].passes >= 2:
            raise RuntimeError("injected fault")
        return runner_forward(batch)

    monkeypatch.setattr(engine.runner, "tail_forward", faulty_forward)

    def faulty_sampler(logits):
        raise ValueError("sampler fault")

    reqs[3].advance = faulty_sampler
    while engine.has_unfinished():
        engine.step()
    assert reqs[1].finish_reason is FinishReason.ERROR and "injected fault" in reqs[1].error
    assert reqs[3].finish_reason is FinishReason.ERROR and "sampler fault" in reqs[3].error
    for i in (0, 2, 4):
        assert reqs[i].token_ids == _alone(model, method, None, prompts[i], params[i])
    assert engine.kv_bytes_in_use == 0


def test_abort_frees_the_cache_at_once(models):
    model = models["dream"]
    engine = Engine(model, method=methods.get("maskkv", budget=16), cache="dual", kv_budget=1 << 24)
    g = torch.Generator().manual_seed(2)
    keep = engine.add_request(
        torch.randint(0, 256, (80,), generator=g), SamplingParams(gen_length=16, steps=16)
    )
    gone = engine.add_request(
        torch.randint(0, 256, (120,), generator=g), SamplingParams(gen_length=32, steps=32)
    )
    engine.step()
    both = engine.kv_bytes_in_use
    engine.abort(gone.request_id)
    engine.step()
    assert gone.finish_reason is FinishReason.ABORT and gone.pool_range is None
    assert engine.kv_bytes_in_use == keep.footprint.rows * engine.pool.row_bytes < both
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_bytes_in_use == 0 and keep.finish_reason is FinishReason.LENGTH


def test_bad_input_names_the_field(models):
    model = models["llada"]
    engine = Engine(model, method="fullcache", kv_budget=1 << 22, max_gen_length=256)
    with pytest.raises(ValueError, match="cache: DLLMCache is not supported"):
        Engine(model, cache="dllm", kv_budget=1 << 20)
    with pytest.raises(ValueError, match="kv_budget"):
        Engine(model, kv_budget=0)
    cases = [
        ([1, 2, 3], dict(gen_length=512), "gen_length: expected at most 256"),
        ([5] * 1000, dict(gen_length=64), "prompt: 1000 tokens .* context of 1024"),
        ([1, 2, 999], dict(), r"prompt: token ids must be in \[0, 320\)"),
        ([], dict(), "prompt: expected at least one token"),
        ("text", dict(), "prompt: text needs an engine with a tokenizer"),
        ([1.5, 2], dict(), "prompt: expected a string or a list of int"),
        ([1, 2], dict(gen_length=8, block_length=3), "block_length: expected a divisor of"),
        ([1, 2], dict(editing_threshold=0.9), "editing_threshold: a LLaDA2 option"),
    ]
    for prompt, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.add_request(prompt, SamplingParams(**kw))
    for kw, msg in [
        (dict(gen_length=0), "gen_length: expected a positive int"),
        (dict(temperature=-1.0), "temperature"),
        (dict(seed=-1), "seed"),
        (dict(decoding="greedy"), "decoding"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: expected at least one token"):
        engine.generate([[1, 2], []], progress=False)
    assert engine.kv_bytes_in_use == 0 and not engine.has_unfinished()


def test_moe_expert_rows_are_batch_invariant(models, monkeypatch):
    """An MoE layer's output rows for one request's tokens do not depend on the other tokens
    routed beside them (each expert's row count does): the loop backend's per-expert linears
    and the grouped backend's calls (cut at ``GROUPED_ROWS_PER_EXPERT`` rows per expert, checked
    here against one call) under ``batch_invariant``."""
    from maskkv.generation import batch_invariant as bi
    from maskkv.models import _moe

    layer = models["llada2"].layers[1]  # layer 0 is dense
    g = torch.Generator().manual_seed(0)
    mine = torch.randn(1, 7, layer.mlp.gate.weight.shape[1], generator=g)
    others = torch.randn(1, 61, mine.shape[2], generator=g)
    monkeypatch.setattr(_moe, "MOE_BACKEND", "loop")
    with torch.no_grad(), bi.batch_invariant():
        alone = layer.mlp_block(mine)
        packed = layer.mlp_block(torch.cat([others[:, :30], mine, others[:, 30:]], 1))
    assert torch.equal(packed[:, 30:37], alone)
    E = len(layer.mlp.experts)
    a, w = torch.randn(50, 16, generator=g), torch.randn(E, 16, 8, generator=g)
    offs = torch.linspace(0, 50, E + 1)[1:].round().to(torch.int32)
    offs[E // 2] = offs[E // 2 - 1]  # an empty group
    whole = torch._grouped_mm(a, w, offs=offs)
    monkeypatch.setattr(bi, "GROUPED_ROWS_PER_EXPERT", 1)  # calls of E rows
    with bi.batch_invariant():
        cut = torch._grouped_mm(a, w, offs=offs)
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [8, 200])
def test_router_sigmoid_rows_are_batch_invariant(width):
    """PyTorch's CPU sigmoid runs a contiguous tensor's last ``numel % 32`` elements through its
    scalar path, so a narrow row (LLaDA2's router over 8 experts) rounds by its place in the
    batch; under ``batch_invariant`` every row keeps the bits it has alone, whatever the rows
    before it and however many."""
    from maskkv.generation import batch_invariant as bi

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, width, generator=g) * 4  # 200: several blocks of rows
    with bi.batch_invariant():
        alone = torch.cat([torch.sigmoid(x[i : i + 1]) for i in range(x.shape[0])])
        for M in (1, 2, 3, 22, 31, 257, 300):
            assert torch.equal(torch.sigmoid(x[:M]), alone[:M]), M
            assert torch.equal(x[-M:].sigmoid(), alone[-M:]), M
    torch.testing.assert_close(alone, torch.sigmoid(x), rtol=0, atol=1e-6)
