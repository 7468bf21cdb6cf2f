"""ragged_attention against the eager reference (dense attention over each head's concatenated keys).

On CPU the Triton kernel runs under TRITON_INTERPRET=1 with tiny shapes; with CUDA the `gpu`
tests run real shapes. Tolerances are per dtype; bf16 Triton outputs under the interpreter get one
extra bf16 ulp because the interpreter's fp32->bf16 cast truncates.
"""

from __future__ import annotations

import os

import pytest
import torch

import maskkv_kernels as mk
from maskkv_kernels import reference as ref
from maskkv_kernels.attention import RaggedAttention, torch_impl

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

CPU = torch.device("cpu")
DEV = torch.device("cuda") if HAS_CUDA else CPU
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (HAS_CUDA or INTERPRET),
    reason="Triton backend needs CUDA or TRITON_INTERPRET=1",
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

# (atol, rtol) on outputs; outputs are convex combinations of N(0, 1) values.
OUT_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LSE_TOL = 1e-4


def make_cache(lengths, D, dtype, device=CPU, *, extra_max=0, seed=0) -> mk.RaggedKV:
    """RaggedKV with random keys/values; ``lengths`` is a [B][Hkv] nested list."""
    gen = torch.Generator().manual_seed(seed)
    flat = [n for row in lengths for n in row]
    N = sum(flat)
    cu = torch.tensor(
        [0, *torch.tensor(flat, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32
    )
    positions = (
        torch.cat([torch.arange(n, dtype=torch.int32) for n in flat])
        if N
        else torch.zeros(0, dtype=torch.int32)
    )
    k = torch.randn(N, D, generator=gen).to(dtype)
    v = torch.randn(N, D, generator=gen).to(dtype)
    return mk.RaggedKV(
        k.to(device),
        v.to(device),
        cu.to(device),
        positions.to(device),
        max(flat) + extra_max,
        len(lengths[0]),
    )


def make_inputs(lengths, G, Lq, Lt, D, dtype, device=CPU, seed=1, **kw):
    B, Hkv = len(lengths), len(lengths[0])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Lq, D, generator=gen).to(dtype).to(device)
    kt = torch.randn(B, Hkv, Lt, D, generator=gen).to(dtype).to(device)
    vt = torch.randn(B, Hkv, Lt, D, generator=gen).to(dtype).to(device)
    return q, make_cache(lengths, D, dtype, device, **kw), kt, vt


def check_against_reference(q, cache, kt, vt, run, *, bf16_ulp=False):
    """Compare ``run(q, cache, kt, vt) -> (out, lse)`` with the reference (computed on CPU)."""
    ref_cache = cache.to("cpu")
    kt_c = None if kt is None else kt.cpu()
    vt_c = None if vt is None else vt.cpu()
    r_out, r_lse = ref.ragged_attention(q.cpu(), ref_cache, kt_c, vt_c, return_lse=True)
    out, lse = run(q, cache, kt, vt)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    atol, rtol = OUT_TOL[q.dtype]
    if bf16_ulp and q.dtype == torch.bfloat16:
        atol, rtol = atol + 2**-7, rtol + 2**-7
    torch.testing.assert_close(out.cpu().float(), r_out.float(), atol=atol, rtol=rtol)
    if lse is not None:
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        torch.testing.assert_close(lse.cpu(), r_lse, atol=LSE_TOL, rtol=1e-5)
    return out, lse


def triton_run(num_splits=None, return_lse=True, max_seqlen=None, planner=None):
    from maskkv_kernels.attention.triton_ragged import ragged_attention_triton

    def run(q, cache, kt, vt):
        D = q.shape[-1]
        Lt = kt.shape[2] if kt is not None else 0
        bound = cache.max_seqlen if max_seqlen is None else max_seqlen
        return ragged_attention_triton(
            q,
            cache.k,
            cache.v,
            cache.cu_seqlens,
            bound,
            cache.num_kv_heads,
            kt if Lt else None,
            vt if Lt else None,
            D**-0.5,
            return_lse,
            num_splits=num_splits,
            planner=planner,
        )

    return run


def api_run(backend, return_lse=True):
    def run(q, cache, kt, vt):
        res = mk.ragged_attention(q, cache, kt, vt, return_lse=return_lse, backend=backend)
        return res if return_lse else (res, None)

    return run


# Skewed and empty segments, [B][Hkv] kept lengths.
SKEWED = [[0, 37, 5, 64]]
SKEWED_B2 = [[13, 0], [64, 1]]

# ----------------------------------------------------------------------------- Triton (interpreter)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 7, 8])
def test_triton_dtypes_groups(dtype, G):
    q, cache, kt, vt = make_inputs([[19, 0]], G, 2, 5, 16, dtype, DEV)
    check_against_reference(q, cache, kt, vt, triton_run(), bf16_ulp=INTERPRET)


@needs_triton
@pytest.mark.parametrize(
    "lengths, G, Lq, Lt, D",
    [
        (SKEWED, 1, 16, 7, 64),  # skewed + empty segment, D 64
        (SKEWED_B2, 4, 3, 0, 16),  # batch 2, empty tail
        (SKEWED_B2, 7, 1, 9, 16),  # Lq 1
        ([[0, 0]], 2, 4, 0, 16),  # no key at all: out 0, lse -inf
        ([[0, 0]], 2, 4, 3, 16),  # tail only
        ([[40, 3]], 1, 5, 20, 48),  # D not a power of two (masked head dim)
        ([[30, 2]], 16, 9, 5, 16),  # 144 packed rows: two row tiles per KV head
    ],
)
def test_triton_shapes(lengths, G, Lq, Lt, D):
    q, cache, kt, vt = make_inputs(lengths, G, Lq, Lt, D, torch.float16, DEV)
    out, lse = check_against_reference(q, cache, kt, vt, triton_run())
    empty = cache.lengths().cpu().repeat_interleave(G, 1) + Lt == 0  # [B, Hq]
    assert (out.cpu()[empty] == 0).all() and torch.isneginf(lse.cpu()[empty]).all()


PLANNERS = ["worklist", "grid"]


@needs_triton
@pytest.mark.parametrize("planner", PLANNERS)
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_split_k(num_splits, dtype, planner):
    # Chunks cross the segment/tail boundary; empty segments make empty chunks; max_seqlen is a
    # loose bound (and the last split must still reach the end of every segment).
    q, cache, kt, vt = make_inputs(SKEWED_B2, 4, 2, 11, 16, dtype, DEV, extra_max=9)
    run = triton_run(num_splits, planner=planner)
    check_against_reference(q, cache, kt, vt, run, bf16_ulp=INTERPRET)
    # without LSE too
    out, _ = triton_run(num_splits, return_lse=False, planner=planner)(q, cache, kt, vt)
    torch.testing.assert_close(
        out,
        triton_run(1, return_lse=False)(q, cache, kt, vt)[0],
        atol=OUT_TOL[dtype][0] + (2**-7 if dtype == torch.bfloat16 else 0),
        rtol=OUT_TOL[dtype][1],
    )


@needs_triton
@pytest.mark.parametrize("planner", PLANNERS)
def test_triton_split_k_row_tiles(planner):
    # Split-K with two row tiles per KV head (rows 144 > BLOCK_M 128) and batch 2.
    q, cache, kt, vt = make_inputs([[30, 0], [7, 50]], 16, 9, 6, 16, torch.float16, DEV)
    check_against_reference(q, cache, kt, vt, triton_run(num_splits=3, planner=planner))


@needs_triton
@pytest.mark.parametrize("planner", PLANNERS)
def test_triton_split_k_short_max_seqlen(planner):
    # A stale max_seqlen bound (here 4 for segments of up to 64) cannot drop keys: the grid
    # planner's last split owns everything past (splits - 1) * chunk, and the work list is
    # built from the real lengths.
    q, cache, kt, vt = make_inputs(SKEWED, 1, 3, 2, 16, torch.float32, DEV)
    run = triton_run(num_splits=3, max_seqlen=4, planner=planner)
    check_against_reference(q, cache, kt, vt, run)


@needs_triton
@pytest.mark.parametrize(
    "lengths, Lt",
    [
        ([[0] * 7 + [40]], 0),  # many empty segments, no tail: one-item segments with no key
        ([[0, 0, 0, 0], [0, 0, 3, 0]], 2),  # many empty segments, tail only
        ([[2, 90, 1, 0]], 3),  # one huge segment among short ones: only it gets many items
        ([[5, 30], [0, 12], [17, 1], [40, 3], [8, 8], [0, 0], [25, 2], [1, 33]], 4),  # B 8, skew
    ],
)
def test_triton_worklist_planning(lengths, Lt):
    q, cache, kt, vt = make_inputs(lengths, 2, 3, Lt, 16, torch.float32, DEV)
    for num_splits in (2, 4):  # chunks of ceil((max_seqlen + Lt) / num_splits) keys
        run = triton_run(num_splits=num_splits, planner="worklist")
        check_against_reference(q, cache, kt, vt, run)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_split_chunk_is_fixed(monkeypatch):
    """Split-K work items have a fixed size on a GPU, whatever the batch (batch invariance);
    ``num_splits`` derives it from the longest segment, ``split_chunk`` forces it."""
    from maskkv_kernels.attention import triton_ragged as tr

    q = torch.empty(1, 1, 1, 16)
    monkeypatch.setattr(tr, "_plans_splits", lambda t: True)
    C = tr.SPLIT_CHUNK
    assert C % 128 == 0  # every autotuned BLOCK_N divides it: items start on a tile boundary
    for max_keys in (C + 1, 4 * C, 32768 + 256):
        assert tr._split_chunk(None, None, q, max_keys) == C
    assert tr._split_chunk(None, None, q, C) is None  # no segment can exceed one item
    assert tr._split_chunk(3, None, q, 300) == 100
    assert tr._split_chunk(1, None, q, 300) is None
    assert tr._split_chunk(None, 64, q, 300) == 64
    assert tr._split_chunk(None, 64, q, 64) is None
    monkeypatch.setattr(tr, "_plans_splits", lambda t: False)  # the interpreter: one program
    assert tr._split_chunk(None, None, q, 4 * C) is None  # at a time, splitting gains nothing


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_every_variant_launches_the_first_tuned_config(monkeypatch):
    """The autotuner keys its cache on every tensor argument's dtype, which differs between the
    kernel variants; ``_launch_fwd`` keeps one config per (row tile, head dim, dtype), so a
    request alone (dense, no LSE) and in a batch (varlen, split-K, LSE) tile its keys alike."""
    import triton

    from maskkv_kernels.attention import triton_ragged as tr

    launches = []

    class Tuner:  # stands in for the autotuner: another choice at every tuning launch
        def __init__(self):
            self.tunings = 0

        def __getitem__(self, grid):
            def launch(*args, **meta):
                self.tunings += 1
                self.best_config = triton.Config({"BLOCK_N": 16 * self.tunings}, num_warps=4)
                launches.append(("tuned", self.best_config.kwargs["BLOCK_N"]))

            return launch

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(("fixed", meta["BLOCK_N"]))

    monkeypatch.setattr(tr, "_CHOSEN", {})
    monkeypatch.setattr(tr, "_ragged_attn_fwd", Kernel())
    tuner, gpu = Tuner(), torch.device("cuda", 0)
    meta = dict(BLOCK_M=64, BLOCK_D=128, UPCAST=False, PRECISION="tf32")
    dense = dict(SPLIT=False, WORKLIST=False, STORE_LSE=False, VARLEN=False)
    batch = dict(SPLIT=True, WORKLIST=True, STORE_LSE=True, VARLEN=True)
    tr._launch_fwd(tuner, (1,), (), {**meta, **dense}, gpu)
    tr._launch_fwd(tuner, (1,), (), {**meta, **batch}, gpu)
    tr._launch_fwd(tuner, (1,), (), {**meta, **batch, "BLOCK_D": 64}, gpu)  # another head dim
    assert launches == [("tuned", 16), ("fixed", 16), ("tuned", 32)]


@needs_triton
def test_triton_public_api_strided_q():
    # q as model code produces it: [B, Lq, Hq, D].transpose(1, 2); no LSE requested.
    q, cache, kt, vt = make_inputs(SKEWED_B2, 2, 3, 4, 16, torch.float16, DEV)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_strided.is_contiguous()
    check_against_reference(q_strided, cache, kt, vt, api_run("triton", return_lse=False))


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("return_lse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 7, 8])
def test_torch_dtypes_groups(dtype, G, return_lse):
    q, cache, kt, vt = make_inputs([[19, 0, 64], [3, 3, 40]], G, 3, 5, 16, dtype)
    check_against_reference(q, cache, kt, vt, api_run("torch", return_lse))


@pytest.mark.parametrize("return_lse", [True, False])
@pytest.mark.parametrize(
    "lengths, G, Lq, Lt, D",
    [
        (SKEWED, 1, 16, 7, 64),
        (SKEWED_B2, 4, 3, 0, 16),
        (SKEWED_B2, 7, 1, 9, 16),
        ([[0, 0]], 2, 4, 0, 16),
        ([[0, 0]], 2, 4, 3, 16),
        ([[5, 5, 5, 5]], 2, 4, 3, 16),  # equal lengths: one unpadded bucket
    ],
)
def test_torch_shapes(lengths, G, Lq, Lt, D, return_lse):
    q, cache, kt, vt = make_inputs(lengths, G, Lq, Lt, D, torch.float32)
    out, _ = check_against_reference(q, cache, kt, vt, api_run("torch", return_lse))
    empty = cache.lengths().repeat_interleave(G, 1) + Lt == 0
    assert (out[empty] == 0).all()


def test_torch_many_lengths_and_chunking(monkeypatch):
    # 60 distinct lengths (quantised before the bucketing DP) and chunks of a few scores, so that
    # both the per-segment and the per-row chunk loops run.
    lengths = [[(7 * i) % 61 + (i % 3) * 97 for i in range(30)], [i * 11 % 53 for i in range(30)]]
    q, cache, kt, vt = make_inputs(lengths, 1, 6, 2, 16, torch.float32)
    for limit in (1 << 25, 2000, 50):
        monkeypatch.setattr(torch_impl, "MAX_CHUNK_ELEMS", limit)
        for return_lse in (True, False):
            check_against_reference(q, cache, kt, vt, api_run("torch", return_lse))


def test_plan_buckets_cost_model():
    # Equal lengths: one bucket, no padding. Two far-apart groups with many rows: two buckets.
    assert torch_impl.plan_buckets([8, 8, 8], rows=4, Lt=0, D=16) == [([0, 1, 2], 8)]
    plan = torch_impl.plan_buckets([4096, 16, 16, 16], rows=1024, Lt=0, D=128)
    assert plan == [([1, 2, 3], 16), ([0], 4096)]
    # Tiny problems: the per-call overhead wins, everything in one padded bucket.
    assert torch_impl.plan_buckets([1, 50, 3], rows=1, Lt=0, D=16) == [([0, 1, 2], 50)]
    segs = sorted(s for b, _ in torch_impl.plan_buckets(list(range(200)), 64, 8, 64) for s in b)
    assert segs == list(range(200))


def test_backends_agree_and_module():
    q, cache, kt, vt = make_inputs(SKEWED_B2, 4, 3, 2, 16, torch.float32)
    layer = RaggedAttention(backend="torch")
    assert "torch" in repr(layer)
    out, lse = layer(q, cache, kt, vt, return_lse=True)
    r_out, r_lse = mk.ragged_attention(q, cache, kt, vt, backend="reference", return_lse=True)
    torch.testing.assert_close(out, r_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, r_lse, atol=LSE_TOL, rtol=1e-5)
    # auto on CPU is the torch path; custom scale is honoured
    out2 = mk.ragged_attention(q, cache, kt, vt, scale=0.3)
    torch.testing.assert_close(
        out2, ref.ragged_attention(q, cache, kt, vt, scale=0.3), atol=2e-5, rtol=2e-5
    )
    # empty tail tensors behave like no tail; Lq = 0 gives empty outputs
    none_tail = mk.ragged_attention(q, cache, backend="torch")
    empty_tail = mk.ragged_attention(q, cache, kt[:, :, :0], vt[:, :, :0], backend="torch")
    torch.testing.assert_close(none_tail, empty_tail)
    o0, l0 = mk.ragged_attention(q[:, :, :0], cache, kt, vt, backend="torch", return_lse=True)
    assert o0.shape == (2, 8, 0, 16) and l0.shape == (2, 8, 0)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, cache, kt, vt = make_inputs(SKEWED_B2, 4, 3, 2, 16, torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq = mode.from_tensor(q)
        out, lse = torch.ops.maskkv.ragged_attention(
            fq,
            mode.from_tensor(cache.k),
            mode.from_tensor(cache.v),
            mode.from_tensor(cache.cu_seqlens),
            cache.max_seqlen,
            2,
            mode.from_tensor(kt),
            mode.from_tensor(vt),
            0.25,
            True,
            "torch",
        )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.library.opcheck(
        torch.ops.maskkv.ragged_attention.default,
        (q, cache.k, cache.v, cache.cu_seqlens, cache.max_seqlen, 2, kt, vt, 0.25, False, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    q, cache, kt, vt = make_inputs(SKEWED_B2, 4, 3, 2, 16, torch.float32)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(q, cache, kt, vt):
        return mk.ragged_attention(q * 2, cache, kt, vt, backend="torch") + 1

    torch.testing.assert_close(
        step(q, cache, kt, vt), ref.ragged_attention(q * 2, cache, kt, vt) + 1, atol=2e-5, rtol=2e-5
    )


# ----------------------------------------------------------------------------- bad inputs


def _bad(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        mk.ragged_attention(*args, **kwargs)


def test_bad_inputs():
    q, cache, kt, vt = make_inputs(SKEWED_B2, 4, 3, 2, 16, torch.float32)
    _bad(r"q: expected a 4-D tensor \[B, Hq, Lq, D\]", q[0], cache)
    _bad(r"cache: expected a RaggedKV", q, (cache.k, cache.v))
    _bad(r"cache: expected a RaggedKV with B=1 rows", q[:1], cache)
    _bad(r"cache: expected a RaggedKV with B=2 rows and Hkv dividing Hq=7", q[:, :7], cache)
    _bad(r"cache: expected head dim D=8", q[..., :8], cache)
    _bad(r"cache.k: expected the dtype of q", q.half(), cache)
    _bad(r"v_tail: expected given together with its pair", q, cache, kt, None)
    _bad(r"k_tail: expected \[B=2, Hkv=2, Lt, D=16\]", q, cache, kt[:, :1], vt[:, :1])
    _bad(r"v_tail: expected k_tail's shape", q, cache, kt, vt[:, :, :1])
    _bad(r"k_tail: expected the dtype of q", q, cache, kt.half(), vt.half())
    _bad(r"scale: expected a finite positive float", q, cache, scale=-1.0)
    _bad(r"return_lse: expected a bool", q, cache, return_lse="yes")
    _bad(r"backend: expected one of", q, cache, backend="cuda")
    if not INTERPRET and not HAS_CUDA:
        _bad(r"backend: expected 'triton' only for CUDA tensors", q, cache, backend="triton")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        RaggedAttention(backend="flash")


@needs_triton
def test_bad_head_dim_triton():
    q, cache, kt, vt = make_inputs([[1]], 1, 1, 0, 264, torch.float16, DEV)
    _bad(
        r"q: expected \[B, Hq, Lq, D\] with D <= 256 for backend='triton'",
        q,
        cache,
        backend="triton",
    )


# ----------------------------------------------------------------------------- CUDA, real shapes


def skewed_lengths(S: int, mean: int, skew: float, seed: int = 0) -> list[int]:
    """S lengths with the given mean and max/mean (geometric profile, shuffled)."""
    if skew <= 1:
        return [mean] * S
    top = skew * mean
    lo, hi = 0.0, 1.0
    for _ in range(60):  # ratio r of the geometric profile top * r^i with the right sum
        r = (lo + hi) / 2
        total = sum(top * r**i for i in range(S))
        lo, hi = (r, hi) if total < S * mean else (lo, r)
    lengths = [max(0, round(top * r**i)) for i in range(S)]
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(seed)).tolist()
    return [lengths[p] for p in perm]


CUDA_CASES = [
    (1, 32, 1, 256, 256, 8),  # LLaDA layer, skewed budgets
    (2, 4, 7, 256, 256, 4),  # Dream layer (GQA 7), batch 2
    (1, 32, 1, 1, 256, 8),  # one query row per head: split-K by the heuristic
    (1, 8, 1, 64, 32768, 1),  # no eviction at 32k: split-K by the heuristic
    (1, 4, 8, 1024, 256, 2),  # many rows per KV head: no split
]


def _cuda_inputs(B, Hkv, G, Lq, mean, skew, dtype):
    lengths = skewed_lengths(B * Hkv, mean, skew)
    lengths = [lengths[b * Hkv : (b + 1) * Hkv] for b in range(B)]
    lengths[0][0] = 0  # an evicted-to-nothing head
    return make_inputs(lengths, G, Lq, Lq, 128, dtype, DEV)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_real_shapes(case, dtype, backend):
    if dtype == torch.float32 and case[4] > 4096:
        pytest.skip("fp32 at 32k adds nothing over the fp16/bf16 runs")
    q, cache, kt, vt = _cuda_inputs(*case, dtype)
    check_against_reference(q, cache, kt, vt, api_run(backend))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_cuda_forced_splits(num_splits):
    q, cache, kt, vt = _cuda_inputs(1, 32, 1, 16, 256, 8, torch.bfloat16)
    check_against_reference(q, cache, kt, vt, triton_run(num_splits))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_no_host_sync():
    # The Triton path must not synchronise (no .item()/.tolist() on device tensors).
    q, cache, kt, vt = _cuda_inputs(1, 32, 1, 64, 256, 8, torch.bfloat16)
    for lse in (False, True):  # compile + autotune (which syncs) both variants first
        mk.ragged_attention(q, cache, kt, vt, backend="triton", return_lse=lse)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mk.ragged_attention(q, cache, kt, vt, backend="triton", return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_triton
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_wide_row_tile(monkeypatch, num_splits):
    """``ROW_TILE = 128``: 128 packed GQA rows per program (G * Lq = 7 * 20 = 140: one full tile
    and a masked one), with and without split-K."""
    from maskkv_kernels.attention import triton_ragged

    monkeypatch.setattr(triton_ragged, "ROW_TILE", 128)
    q, cache, kt, vt = make_inputs([[30, 0], [5, 41]], 7, 20, 6, 16, torch.bfloat16, seed=31)
    check_against_reference(q, cache, kt, vt, triton_run(num_splits), bf16_ulp=True)
