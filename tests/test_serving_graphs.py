"""The engine's batched steps by bucket (maskkv.serving.graphs): a step padded to its bucket (more
rows, empty requests, looser host bounds) computes the unpadded step's logits bit for bit and
writes no K/V outside the requests' own slots (and the scratch token); an engine running every
step padded keeps batch invariance. On the CPU the padded steps run eagerly (``"padded"``); the
CUDA tests capture and replay graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_serving import _check_invariance, _llada2_workload, _workload

from maskkv import methods
from maskkv.cli_common import ASSETS
from maskkv.generation import DualCache, PromptCache
from maskkv.generation.batch_invariant import batch_invariant
from maskkv.models import load_checkpoint
from maskkv.serving import Engine, SamplingParams
from maskkv.serving.graphs import StepBatch, StepGraphs, bucket

warnings.filterwarnings("ignore", category=methods.MissingProfileWarning)


@pytest.fixture(scope="module")
def models():
    return {k: load_checkpoint(ASSETS / f"tiny-{k}-kv").eval() for k in ("llada", "llada2")}


def test_bucket_and_padding_are_inert():
    assert [bucket(n, 16) for n in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    L = 3
    batch = StepBatch(
        ids=torch.tensor([5, 6, 7, 8, 9]), positions=torch.tensor([10, 11, 3, 4, 5]),
        cu_q=torch.tensor([0, 2, 5], dtype=torch.int32), max_q=3,
        cache_cu=torch.tensor([[0, 1, 3, 4, 6]] * L, dtype=torch.int32),
        cache_starts=torch.tensor([[40, 41, 8, 9]] * L), max_kv=[2, 2, 1],
        logit_rows=torch.tensor([1, 4]), cu_t=torch.tensor([0, 7, 10], dtype=torch.int32),
        tail_starts=torch.tensor([[3, 20]] * L), dest=torch.tensor([[3, 4, 20, 21, 22]] * L),
        max_t=7,
    )  # fmt: skip
    key = batch.key()
    assert key == (16, 2, 16, 4, 16, 16)
    big = (32, 4, 16, 4, 16, 16)
    p = batch.padded(big, scratch_token=99)
    assert p.ids.tolist() == [5, 6, 7, 8, 9] + [0] * 27
    assert p.cu_q.tolist() == [0, 2, 5, 5, 5]  # empty requests own no query row
    assert p.cache_cu[0].tolist() == [0, 1, 3, 4, 6, 6, 6, 6, 6]  # nor keys
    assert p.cu_t.tolist() == [0, 7, 10, 10, 10]  # nor tail rows
    assert p.dest[1, 5:].eq(99).all() and p.dest[1, :5].tolist() == [3, 4, 20, 21, 22]
    assert p.max_kv == [16] * L and (p.max_q, p.max_t) == (4, 16)
    assert p.logit_rows.tolist()[:2] == [1, 4] and p.num_logits == 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (an integer view of the same width)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _running_batch(model, method, cache, n: int, workload, seed: int):
    """An engine with ``n`` requests past their prompt pass, all planning a tail pass."""
    prompts, params = workload(n, seed=seed)
    engine = Engine(model, method=method, cache=cache, kv_budget=1 << 24, cuda_graphs=False)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(50):
        engine.step()
        if all(r.plan is not None and r.plan.kind != "full" for r in reqs if not r.finished):
            break
    batch = [r for r in engine.scheduler.tail_batch() if not r.finished]
    assert len(batch) >= 3
    return engine, batch


@pytest.mark.parametrize(
    ("kind", "cache"),
    [("llada", DualCache()), ("llada", PromptCache()), ("llada2", DualCache())],
    ids=["llada-dual", "llada-prompt", "llada2-dual"],
)
def test_padded_step_equals_the_step(models, kind, cache):
    """One batched step padded to its bucket, through the static buffers of ``StepGraphs``:
    the same logits, bit for bit, as the step run as it is; the stored K/V it writes are the
    step's own (the rest of the pool is untouched but for the scratch token)."""
    workload = _llada2_workload if kind == "llada2" else _workload
    engine, reqs = _running_batch(
        models[kind], methods.get("maskkv", budget=16), cache, 7, workload, seed=11
    )
    runner = engine.runner
    assert runner.attention == "varlen"  # C++ on this CPU: exact, padded bounds included
    batch, _, counts = runner._pack(reqs)
    pool_k = engine.pool.k.clone()
    with batch_invariant():  # as the engine's step runs
        eager = runner.forward(batch.to(runner.device))
        after_eager = engine.pool.k.clone()
        graphs = StepGraphs(runner.forward, engine.pool.scratch_token, runner.device, "padded")
        padded = graphs.run(batch)
        again = graphs.run(batch)
    key = batch.key()
    assert key[0] > batch.rows or key[1] > batch.requests  # really padded
    assert torch.equal(padded, eager)
    H = engine.pool.num_kv_heads
    scratch = slice(engine.pool.scratch_token * H, (engine.pool.scratch_token + 1) * H)
    # Bits, not values: the pool is torch.empty, its unwritten rows may hold NaN.
    changed = (_bits(engine.pool.k) != _bits(after_eager)).any(1)
    changed[scratch] = False
    assert not changed.any()  # the padded step wrote what the step wrote, plus the scratch
    if runner.stored:
        assert not torch.equal(after_eager[: engine.pool.capacity], pool_k[: engine.pool.capacity])
    # Another step of the same bucket reuses the static buffers.
    assert torch.equal(again, eager) and len(graphs) == 1
    assert sum(counts) == eager.shape[0]


@pytest.mark.parametrize(
    ("kind", "cache"), [("llada", DualCache()), ("llada2", DualCache())], ids=["llada", "llada2"]
)
def test_engine_with_padded_steps_keeps_batch_invariance(models, kind, cache):
    """Every batched step through the bucketed, padded path: each request still gets the
    tokens ``maskkv.generate`` gives it alone."""
    workload = _llada2_workload if kind == "llada2" else _workload
    engine = _check_invariance(models[kind], methods.get("maskkv", budget=16), cache, seed=21,
                               workload=workload, n=10, cuda_graphs="padded")  # fmt: skip
    assert engine.runner.graphs is not None and len(engine.runner.graphs) >= 2


def test_graph_options_are_checked(models):
    with pytest.raises(ValueError, match="cuda_graphs: expected True, False or 'padded'"):
        Engine(models["llada"], kv_budget=1 << 20, cuda_graphs="yes")
    engine = Engine(models["llada"], kv_budget=1 << 20)
    assert engine.runner.graphs is None  # on by default on CUDA only
    per_request = Engine(models["llada"], kv_budget=1 << 20, attention="per_request",
                         cuda_graphs="padded")  # fmt: skip
    assert per_request.runner.graphs is None  # per-request calls have no bucketed shape


# ------------------------------------------------------------------------------------------------
# CUDA: captured graphs
# ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llada", "llada2"])
def test_cuda_graph_replay_equals_eager(kind, dtype):
    """On a GPU, a replayed bucket gives the eager step's logits bit for bit (the varlen call,
    the invariant linears and, for LLaDA2 in bf16, the grouped experts inside the graph)."""
    model = load_checkpoint(ASSETS / f"tiny-{kind}-kv", dtype=dtype, device="cuda").eval()
    workload = _llada2_workload if kind == "llada2" else _workload
    engine, reqs = _running_batch(
        model, methods.get("maskkv", budget=16), DualCache(), 7, workload, seed=11
    )
    runner = engine.runner
    if runner.attention != "varlen":
        pytest.skip("varlen ragged_attention is not exact on this backend: no graphs")
    batch, _, _ = runner._pack(reqs)
    with batch_invariant():
        eager = runner.forward(batch.to(runner.device))
        graphs = StepGraphs(runner.forward, engine.pool.scratch_token, runner.device, "cuda")
        first = graphs.run(batch).clone()  # capture + replay
        second = graphs.run(batch).clone()  # replay
    assert graphs.captures == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["llada", "llada2"])
def test_batch_invariance_under_cuda_graphs(kind):
    """The engine's contract with graphs on (the default on CUDA): staggered requests each get
    ``maskkv.generate``'s tokens alone, and the steps were replayed."""
    model = load_checkpoint(ASSETS / f"tiny-{kind}-kv", dtype=torch.bfloat16, device="cuda")
    workload = _llada2_workload if kind == "llada2" else _workload
    engine = _check_invariance(model.eval(), methods.get("maskkv", budget=16), DualCache(),
                               seed=5, workload=workload, n=12)  # fmt: skip
    graphs = engine.runner.graphs
    if engine.runner.attention == "varlen" and model.supports_cuda_graphs:
        assert graphs is not None and graphs.captures >= 1


def test_params_for_graph_tests_resolve(models):
    """The workloads above are valid for both families (guards the GPU tests' inputs)."""
    for kind, workload in (("llada", _workload), ("llada2", _llada2_workload)):
        for p in workload(6, seed=0)[1]:
            assert isinstance(p.resolved(models[kind]), SamplingParams)


@pytest.mark.gpu
@cuda
def test_cuda_grouped_experts_are_batch_invariant():
    """bf16 on a GPU: the grouped experts (``torch._grouped_mm``, whose tile follows the rows per
    expert) give one request's rows the same bits alone and beside 2000 other tokens (more than
    ``GROUPED_ROWS_PER_EXPERT`` rows per expert: the calls are cut)."""
    from maskkv.generation.batch_invariant import GROUPED_ROWS_PER_EXPERT
    from maskkv.models import _moe

    model = load_checkpoint(ASSETS / "tiny-llada2-kv", dtype=torch.bfloat16, device="cuda")
    layer = model.eval().layers[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    d = layer.mlp.gate.weight.shape[1]
    mine = torch.randn(1, 7, d, generator=g, device="cuda", dtype=torch.bfloat16)
    others = torch.randn(1, 2000, d, generator=g, device="cuda", dtype=torch.bfloat16)
    assert _moe.moe_backend_for(mine) == "grouped"
    slots = 2007 * layer.mlp.top_k
    assert slots > GROUPED_ROWS_PER_EXPERT * (len(layer.mlp.experts) + 1)
    with torch.no_grad(), batch_invariant():
        alone = layer.mlp_block(mine)
        packed = layer.mlp_block(torch.cat([others[:, :900], mine, others[:, 900:]], 1))
    assert torch.equal(packed[:, 900:907], alone)
