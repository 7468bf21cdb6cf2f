"""The varlen form of ragged_attention (``cu_seqlens_q``, per-request tails) and pool views
(``RaggedKV.seg_starts``, ``tail_starts``), every backend against the eager reference.

Metamorphic checks on top: one request equals the dense 4-D call; a batch of requests equals a
loop of per-request 4-D calls; a pool view (segments and tails relocated, NaN garbage between
them) equals the packed layout bit for bit; NaN / inf in another request never reaches a
request's output. The Triton backend runs under ``TRITON_INTERPRET=1`` on tiny shapes.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import maskkv_kernels as mk
from maskkv_kernels import _cpp
from maskkv_kernels import reference as ref
from maskkv_kernels._dispatch import interpreting, triton_available

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
HAS_TRITON = triton_available() and (HAS_CUDA or interpreting())
HAS_CPP = _cpp._find_compiler() is not None and not HAS_CUDA

BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler / CUDA")),
    pytest.param(
        "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET")
    ),
]
OUT_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    # + one bf16 ulp: the Triton interpreter's fp32 -> bf16 cast truncates
    torch.bfloat16: (1.6e-2 + 2**-7, 1.6e-2 + 2**-7),
}
LSE_TOL = 1e-4


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make_case(q_lens, seg_lens, tail_lens, G, D, dtype=torch.float32, *, seed=0, device=DEV):
    """A varlen call: request b has ``q_lens[b]`` queries, ``seg_lens[b][g]`` kept keys per KV
    head and ``tail_lens[b]`` tail rows (``tail_lens=None``: no tail).

    Returns (q [Nq, Hq, D], cache, k_tail, v_tail, varlen kwargs)."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = len(seg_lens[0])
    flat = [n for row in seg_lens for n in row]
    N = sum(flat)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    cache = mk.RaggedKV(
        rnd(N, D),
        rnd(N, D),
        _cu(flat).to(device),
        torch.cat([torch.arange(n, dtype=torch.int32) for n in flat]).to(device),
        max(flat),
        Hkv,
    )
    q = rnd(sum(q_lens), Hkv * G, D)
    kw = dict(cu_seqlens_q=_cu(q_lens).to(device), max_seqlen_q=max(q_lens))
    kt = vt = None
    if tail_lens is not None:
        kt, vt = rnd(sum(tail_lens), Hkv, D), rnd(sum(tail_lens), Hkv, D)
        kw.update(cu_seqlens_tail=_cu(tail_lens).to(device), max_seqlen_tail=max(tail_lens))
    return q, cache, kt, vt, kw


def run(backend, q, cache, kt, vt, kw, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cpp -> torch fallback warning
        return mk.ragged_attention(
            q, cache, kt, vt, **kw, **extra, return_lse=True, backend=backend
        )


def assert_close(got, want, dtype):
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(got[0].cpu().float(), want[0].cpu().float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=LSE_TOL, rtol=1e-5)


def assert_bitwise(got, want):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        a, b = (t.cpu().contiguous().view(-1).view(torch.uint8) for t in (a, b))
        assert torch.equal(a, b)


def to_pool(cache: mk.RaggedKV, *, gap=2, garbage=math.nan, seed=0) -> mk.RaggedKV:
    """The same cache as a pool view: segments in shuffled order, ``gap`` garbage rows before
    and between them."""
    cu = cache.cu_seqlens.cpu().tolist()
    S, D = len(cu) - 1, cache.head_dim
    order = torch.randperm(S, generator=torch.Generator().manual_seed(seed)).tolist()
    starts, row = [0] * S, gap
    for s in order:
        starts[s] = row
        row += cu[s + 1] - cu[s] + gap
    k = cache.k.new_full((row, D), garbage)
    v = cache.v.new_full((row, D), garbage)
    pos = cache.positions.new_full((row,), -1)
    for s in range(S):
        n = cu[s + 1] - cu[s]
        k[starts[s] : starts[s] + n] = cache.k[cu[s] : cu[s + 1]]
        v[starts[s] : starts[s] + n] = cache.v[cu[s] : cu[s + 1]]
        pos[starts[s] : starts[s] + n] = cache.positions[cu[s] : cu[s + 1]]
    seg_starts = torch.tensor(starts, dtype=torch.int64, device=k.device)
    return mk.RaggedKV(
        k, v, cache.cu_seqlens, pos, cache.max_seqlen, cache.num_kv_heads, seg_starts
    )


def tails_to_pool(kt, vt, cu_t, *, gap=3, garbage=math.inf, seed=1):
    """Packed tails [Nt, Hkv, D] -> a pool with the requests' tails shuffled, garbage between,
    and the ``tail_starts`` that address them."""
    cu = cu_t.cpu().tolist()
    B = len(cu) - 1
    order = torch.randperm(B, generator=torch.Generator().manual_seed(seed)).tolist()
    starts, row = [0] * B, gap
    for b in order:
        starts[b] = row
        row += cu[b + 1] - cu[b] + gap
    k_pool = kt.new_full((row, *kt.shape[1:]), garbage)
    v_pool = vt.new_full((row, *vt.shape[1:]), -garbage)
    for b in range(B):
        n = cu[b + 1] - cu[b]
        k_pool[starts[b] : starts[b] + n] = kt[cu[b] : cu[b + 1]]
        v_pool[starts[b] : starts[b] + n] = vt[cu[b] : cu[b + 1]]
    return k_pool, v_pool, torch.tensor(starts, dtype=torch.int64, device=kt.device)


def request_alone(b, q, cache, kt, vt, kw):
    """Request b of a varlen call as a dense 4-D call: (q [1, Hq, nq, D], cache, k_tail, v_tail)."""
    cu_q = kw["cu_seqlens_q"].cpu().tolist()
    Hkv = cache.num_kv_heads
    cu = cache.cu_seqlens.cpu().tolist()
    lo, hi = cu[b * Hkv], cu[(b + 1) * Hkv]
    one = mk.RaggedKV(
        cache.k[lo:hi],
        cache.v[lo:hi],
        (cache.cu_seqlens[b * Hkv : (b + 1) * Hkv + 1] - lo).to(torch.int32),
        cache.positions[lo:hi],
        cache.max_seqlen,
        Hkv,
    )
    q_b = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)[None]
    if kt is None:
        return q_b, one, None, None
    cu_t = kw["cu_seqlens_tail"].cpu().tolist()
    tail = slice(cu_t[b], cu_t[b + 1])
    return q_b, one, kt[tail].transpose(0, 1)[None], vt[tail].transpose(0, 1)[None]


# Requests: (q_lens, seg_lens [B][Hkv], tail_lens) with a request of no query, an empty
# segment, an empty tail, a request with no key at all.
CASES = {
    "mixed": ([3, 0, 5, 1], [[4, 0], [2, 7], [9, 3], [0, 0]], [2, 4, 0, 0]),
    "no_tail": ([2, 6], [[5, 1], [0, 8]], None),
    "one_request": ([7], [[6, 11]], [3]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_varlen_matches_reference(backend, dtype, G, name):
    q, cache, kt, vt, kw = make_case(*CASES[name], G, 16, dtype)
    got = run(backend, q, cache, kt, vt, kw)
    assert got[0].shape == q.shape and got[0].dtype == dtype and got[1].shape == q.shape[:2]
    want = ref.ragged_attention(
        q.cpu(), cache.to("cpu"), *(None if t is None else t.cpu() for t in (kt, vt)),
        **{a: (x.cpu() if isinstance(x, torch.Tensor) else x) for a, x in kw.items()},
        return_lse=True,
    )  # fmt: skip
    assert_close(got, want, dtype)
    # A query with no key at all: 0 and -inf.
    if name == "mixed":
        last = slice(8, 9)  # request 3: no kept key, no tail
        assert (got[0][last] == 0).all() and torch.isneginf(got[1][last]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_request_equals_dense_call(backend):
    q, cache, kt, vt, kw = make_case([5], [[7, 0, 12]], [4], 2, 16)
    got = run(backend, q, cache, kt, vt, kw)
    q4, _, kt4, vt4 = request_alone(0, q, cache, kt, vt, kw)
    out4, lse4 = mk.ragged_attention(q4, cache, kt4, vt4, return_lse=True, backend=backend)
    assert_close(got, (out4[0].transpose(0, 1), lse4[0].T), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_requests_equal_per_request_dense_calls(backend, dtype):
    """Batch invariance: every request's rows bitwise its dense call's (the torch backend on a
    GPU pads all requests into one bucket: there only within tolerance)."""
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, dtype, seed=3)
    out, lse = run(backend, q, cache, kt, vt, kw)
    for rows, alone in per_request_dense_calls(backend, q, cache, kt, vt, kw):
        if backend == "torch" and HAS_CUDA:
            assert_close((out[rows], lse[rows]), alone, dtype)
        else:
            assert_bitwise((out[rows], lse[rows]), alone)


def per_request_dense_calls(backend, q, cache, kt, vt, kw):
    """(its rows of the varlen output, (out, lse) of its dense call laid out as those rows) for
    every request."""
    cu_q = kw["cu_seqlens_q"].cpu().tolist()
    for b in range(len(cu_q) - 1):
        q4, one, kt4, vt4 = request_alone(b, q, cache, kt, vt, kw)
        o4, l4 = mk.ragged_attention(q4, one, kt4, vt4, return_lse=True, backend=backend)
        yield slice(cu_q[b], cu_q[b + 1]), (o4[0].transpose(0, 1), l4[0].T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [math.nan, math.inf])
def test_pool_view_equals_packed(backend, garbage):
    """Segments and tails relocated into pools with garbage between them: bitwise equal."""
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, torch.float32, seed=5)
    want = run(backend, q, cache, kt, vt, kw)
    pool = to_pool(cache, garbage=garbage)
    kp, vp, starts = tails_to_pool(kt, vt, kw["cu_seqlens_tail"], garbage=garbage)
    assert_bitwise(run(backend, q, pool, kt, vt, kw), want)
    assert_bitwise(run(backend, q, pool, kp, vp, kw, tail_starts=starts), want)
    # A pool view in the dense 4-D form too.
    q4, cache4, kt4, vt4 = request_alone(2, q, cache, kt, vt, kw)
    want4 = mk.ragged_attention(q4, cache4, kt4, vt4, return_lse=True, backend=backend)
    got4 = mk.ragged_attention(
        q4, to_pool(cache4, garbage=garbage), kt4, vt4, return_lse=True, backend=backend
    )
    assert_bitwise(got4, want4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_in_other_request_changes_nothing(backend):
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, torch.float32, seed=7)
    want = run(backend, q, cache, kt, vt, kw)
    # Poison request 1: its keys, values, tail and queries.
    Hkv = cache.num_kv_heads
    cu = cache.cu_seqlens.cpu().tolist()
    k, v = cache.k.clone(), cache.v.clone()
    k[cu[Hkv] : cu[2 * Hkv]] = math.nan
    v[cu[Hkv] : cu[2 * Hkv]] = math.inf
    poisoned = mk.RaggedKV(k, v, cache.cu_seqlens, cache.positions, cache.max_seqlen, Hkv)
    cu_t, cu_q = kw["cu_seqlens_tail"].tolist(), kw["cu_seqlens_q"].tolist()
    kt2, vt2, q2 = kt.clone(), vt.clone(), q.clone()
    kt2[cu_t[1] : cu_t[2]] = -math.inf
    vt2[cu_t[1] : cu_t[2]] = math.nan
    q2[cu_q[1] : cu_q[2]] = math.nan  # request 1 has no query: its neighbours' rows must hold
    q2[cu_q[2] : cu_q[2] + 1, :1] = math.inf  # one row of request 2: changes only that row
    got = run(backend, q2, poisoned, kt2, vt2, kw)
    keep = torch.ones(q.shape[:2], dtype=torch.bool)
    keep[cu_q[2], :1] = False
    for a, b in zip(got, want):
        assert torch.equal(a[keep].cpu(), b[keep].cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_the_last_request_are_zero(backend):
    """Nq padded past cu_seqlens_q[-1] (a bucketed shape): the spare rows are 0 / -inf and the
    others are as without padding."""
    q, cache, kt, vt, kw = make_case([2, 3], [[3, 1], [0, 5]], [1, 2], 1, 8)
    want = run(backend, q, cache, kt, vt, kw)
    q_pad = torch.cat([q, torch.full_like(q[:3], math.nan)])
    out, lse = run(backend, q_pad, cache, kt, vt, kw)
    assert_bitwise((out[:5], lse[:5]), want)
    assert (out[5:] == 0).all() and torch.isneginf(lse[5:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_q_and_tails(backend):
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, torch.float32, seed=9)
    want = run(backend, q, cache, kt, vt, kw)
    wide = lambda x: torch.cat([x, torch.full_like(x, math.nan)], 1)[:, : x.shape[1]]  # noqa: E731
    q_s, kt_s, vt_s = wide(q), wide(kt), wide(vt)
    assert not q_s.is_contiguous() and not kt_s.is_contiguous()
    assert_close(run(backend, q_s, cache, kt_s, vt_s, kw), want, torch.float32)


def test_zero_queries_and_empty_tail_tensor():
    q, cache, kt, vt, kw = make_case([0, 0], [[3, 1], [0, 5]], [0, 0], 2, 8)
    for backend in ("reference", "torch"):
        out, lse = run(backend, q, cache, kt, vt, kw)
        assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


# ----------------------------------------------------------------------------- RaggedKV pools


def test_pool_view_methods():
    _, cache, *_ = make_case([1, 1], [[3, 0], [2, 5]], None, 1, 4, device="cpu")
    pool = to_pool(cache)
    assert torch.equal(pool.lengths(), cache.lengths())
    for a, b in zip(pool.to_padded(), cache.to_padded()):
        assert torch.equal(a, b)
    packed = pool.compact()
    assert packed.seg_starts is None and torch.equal(packed.k, cache.k)
    assert torch.equal(packed.positions, cache.positions) and cache.compact() is cache
    assert torch.equal(pool.starts(), pool.seg_starts)
    assert torch.equal(cache.starts(), cache.cu_seqlens[:-1].long())
    assert pool.to("cpu").seg_starts is not None
    # nbytes: the rows the segments cover (not the pool), plus the offsets.
    row = 2 * 4 * 4 + 4  # K + V fp32 rows of D=4, int32 position
    assert cache.nbytes == 10 * row + 5 * 4
    assert pool.nbytes == 10 * row + 5 * 4 + 4 * 8
    assert pool.k.shape[0] > 10


def test_pool_view_bad_starts():
    _, cache, *_ = make_case([1], [[3, 2]], None, 1, 4, device="cpu")
    k = torch.zeros(8, 4)
    pos = torch.zeros(8, dtype=torch.int32)

    def pool(starts, dtype=torch.int64):
        return mk.RaggedKV(k, k, cache.cu_seqlens, pos, 3, 2, torch.tensor(starts, dtype=dtype))

    assert pool([5, 0]).seg_starts is not None  # any order, holes allowed
    with pytest.raises(ValueError, match=r"seg_starts must be None or int64 \[B \* Hkv=2\]"):
        pool([0, 3], torch.int32)
    with pytest.raises(ValueError, match=r"seg_starts must be None or int64 \[B \* Hkv=2\]"):
        pool([0, 3, 6])
    with pytest.raises(
        ValueError, match=r"inside the N=8 rows of k, got segment 1 at rows \[7, 9\)"
    ):
        pool([0, 7])
    with pytest.raises(ValueError, match=r"inside the N=8 rows"):
        pool([-1, 4])
    with pytest.raises(ValueError, match=r"disjoint rows, got segments 1 \[1, 3\) and 0 \[2, 5\)"):
        pool([2, 1])
    with pytest.raises(ValueError, match=r"end at N=8"):  # packed: cu_seqlens must end at N
        mk.RaggedKV(k, k, cache.cu_seqlens, pos, 3, 2)


# ----------------------------------------------------------------------------- bad input


def _bad(match, q, cache, kt=None, vt=None, **kw):
    with pytest.raises(ValueError, match=match):
        mk.ragged_attention(q, cache, kt, vt, **kw)


def test_bad_varlen_inputs():
    q, cache, kt, vt, kw = make_case([2, 3], [[3, 1], [0, 5]], [1, 2], 2, 8, device="cpu")
    cu_q, cu_t = kw["cu_seqlens_q"], kw["cu_seqlens_tail"]
    ok = dict(kw)

    def bad(match, **change):
        _bad(match, change.pop("q", q), change.pop("cache", cache), change.pop("kt", kt),
             change.pop("vt", vt), **{**ok, **change})  # fmt: skip

    bad(r"q: expected a 3-D tensor \[Nq, Hq, D\]", q=q[None])
    bad(r"q: expected a 4-D tensor \[B, Hq, Lq, D\] \(or \[Nq, Hq, D\] with cu_seqlens_q\)",
        cu_seqlens_q=None, max_seqlen_q=None, cu_seqlens_tail=None, max_seqlen_tail=None,
        kt=None, vt=None)  # fmt: skip
    bad(r"max_seqlen_q: expected None without cu_seqlens_q", cu_seqlens_q=None, q=q[None])
    bad(r"cu_seqlens_q: expected an int32 tensor \[B \+ 1 = 3\]", cu_seqlens_q=cu_q.long())
    bad(r"cache: expected a RaggedKV over B=1 requests", cu_seqlens_q=cu_q[:2])
    bad(r"cu_seqlens_q: expected 0 first, non-decreasing, last <= Nq=5", cu_seqlens_q=cu_q + 1)
    bad(r"cu_seqlens_q: expected 0 first, non-decreasing", cu_seqlens_q=cu_q[[0, 2, 1]])
    bad(r"max_seqlen_q: expected an int >= the longest request's queries \(3\)", max_seqlen_q=2)
    bad(r"max_seqlen_q: expected an int >= 0", max_seqlen_q=None)
    bad(r"max_seqlen_q: expected an int >= 0", max_seqlen_q=2.5)
    bad(r"cache: expected head dim D=4", q=q[..., :4])
    bad(r"cache.k: expected the dtype of q", q=q.half())
    bad(r"cache: expected a RaggedKV over B=2 requests \(len\(cu_seqlens_q\) - 1\) with Hkv dividing Hq=3",
        q=q[:, :3])  # fmt: skip
    bad(r"v_tail: expected given together with its pair", vt=None)
    bad(r"cu_seqlens_tail: expected None without k_tail", kt=None, vt=None)
    bad(r"tail_starts: expected None without k_tail", kt=None, vt=None, cu_seqlens_tail=None,
        max_seqlen_tail=None, tail_starts=torch.zeros(2, dtype=torch.int64))  # fmt: skip
    bad(r"k_tail: expected a 3-D tensor \[Nt, Hkv, D\]", kt=kt[None], vt=vt[None])
    bad(r"k_tail: expected \[Nt, Hkv=2, D=8\]", kt=kt[:, :1], vt=vt[:, :1])
    bad(r"v_tail: expected k_tail's shape", vt=vt[:1])
    bad(r"k_tail: expected the dtype of q", kt=kt.half(), vt=vt.half())
    bad(
        r"cu_seqlens_tail: expected an int32 tensor \[B \+ 1 = 3\] with k_tail",
        cu_seqlens_tail=None,
    )
    bad(r"cu_seqlens_tail: expected an int32 tensor \[B \+ 1 = 3\]", cu_seqlens_tail=cu_t[:2])
    bad(
        r"cu_seqlens_tail: expected 0 first, non-decreasing, last <= Nt=3", cu_seqlens_tail=cu_t * 2
    )
    bad(r"max_seqlen_tail: expected an int >= the longest request's tail \(2\)", max_seqlen_tail=1)
    bad(
        r"tail_starts: expected an int64 tensor \[B=2\]",
        tail_starts=torch.zeros(2, dtype=torch.int32),
    )
    bad(r"tail_starts: expected values keeping every tail inside the Nt=3 rows of k_tail, got "
        r"request 1 at rows \[2, 4\)", tail_starts=torch.tensor([0, 2]))  # fmt: skip
    bad(
        r"tail_starts: expected values keeping every tail inside", tail_starts=torch.tensor([-1, 0])
    )
    bad(r"scale: expected a finite positive float", scale=0.0)
    bad(r"return_lse: expected a bool", return_lse=1)
    bad(r"max_seqlen_q: expected an int >= the longest", max_seqlen_q=1, backend="reference")


# ----------------------------------------------------------------------------- op plumbing


def _op_args(q, cache, kt, vt, kw, return_lse=True):
    return (
        q, cache.k, cache.v, cache.cu_seqlens, cache.seg_starts, cache.max_seqlen,
        cache.num_kv_heads, kw["cu_seqlens_q"], kw["max_seqlen_q"], kt, vt,
        kw["cu_seqlens_tail"], kw.get("tail_starts"), kw["max_seqlen_tail"], 0.3, return_lse,
        "torch",
    )  # fmt: skip


def test_fake_impl_and_opcheck():
    q, cache, kt, vt, kw = make_case([2, 3], [[3, 1], [0, 5]], [1, 2], 2, 8, device="cpu")
    pool = to_pool(cache)
    kp, vp, starts = tails_to_pool(kt, vt, kw["cu_seqlens_tail"])
    for args in (
        _op_args(q, cache, kt, vt, kw),
        _op_args(q, pool, kp, vp, {**kw, "tail_starts": starts}, return_lse=False),
    ):
        torch.library.opcheck(
            torch.ops.maskkv.ragged_attention_varlen.default,
            args,
            test_utils=("test_schema", "test_faketensor"),
        )


def test_module_passes_varlen_arguments():
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, device="cpu")
    layer = mk.RaggedAttention(backend="torch")
    got = layer(q, cache, kt, vt, return_lse=True, **kw)
    assert_bitwise(got, run("torch", q, cache, kt, vt, kw))


def test_unchecked_path_matches():
    q, cache, kt, vt, kw = make_case(*CASES["mixed"], 2, 16, device="cpu")
    pool = to_pool(cache)
    want = run("torch", q, pool, kt, vt, kw)
    fast = mk.ragged_attention(
        q, pool, kt, vt, **kw, return_lse=True, backend="torch", check_inputs=False
    )
    assert_bitwise(fast, want)


@pytest.mark.slow
def test_torch_compile_fullgraph_varlen():
    q, cache, kt, vt, kw = make_case([2, 3], [[3, 1], [0, 5]], [1, 2], 2, 8, device="cpu")
    pool = to_pool(cache)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(q, cache, kt, vt, cu_q, cu_t):
        out = mk.ragged_attention(
            q * 2, cache, kt, vt, cu_seqlens_q=cu_q, max_seqlen_q=3, cu_seqlens_tail=cu_t,
            max_seqlen_tail=2, backend="torch",
        )  # fmt: skip
        return out + 1

    want = ref.ragged_attention(q * 2, cache, kt, vt, **kw) + 1
    got = step(q, pool, kt, vt, kw["cu_seqlens_q"], kw["cu_seqlens_tail"])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_benchmark_tiny_preset(tmp_path):
    """The benchmark script runs (tiny preset) and writes consistent rows."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_varlen", bench_dir / "bench_ragged_varlen.py"
        )
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.main(["--preset", "tiny", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(bench_dir))
    result = json.loads((tmp_path / "bench_ragged_varlen.json").read_text())
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"B3 mixed", "B2 full"}
    assert {r["impl"] for r in rows} == {"varlen", "varlen_torch", "loop", "loop_torch",
                                         "padded_sdpa"}  # fmt: skip
    for r in rows:
        loop = next(x for x in rows if x["case"] == r["case"] and x["impl"] == "loop")
        assert r["ms"] > 0 and math.isclose(r["speedup_vs_loop"], loop["ms"] / r["ms"])
    assert result["env"]["torch"] and (tmp_path / "bench_ragged_varlen.png").exists()


# ----------------------------------------------------------------------------- C++ kernel


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler (or CUDA tensors)")
def test_cpp_row_tiles_and_key_blocks():
    """More packed rows than one row tile (256, whole queries per tile) and more keys than one
    key block (512), with GQA 3 (85 queries per tile), bf16."""
    q, cache, kt, vt, kw = make_case([120, 1, 0], [[530, 7], [0, 3], [2, 2]], [40, 600, 1], 3, 8,
                                     torch.bfloat16, seed=11, device="cpu")  # fmt: skip
    got = run("cpp", q, cache, kt, vt, kw)
    assert_close(got, ref.ragged_attention(q, cache, kt, vt, **kw, return_lse=True), q.dtype)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler (or CUDA tensors)")
def test_cpp_direct_call_checks():
    """Direct torch.ops.maskkv_cpp calls skip the Python checks: the kernel's own checks stop
    every out-of-bounds read."""
    _cpp.load()
    op = torch.ops.maskkv_cpp.ragged_attention_varlen
    q, cache, kt, vt, kw = make_case([2, 3], [[3, 1], [0, 5]], [1, 2], 2, 8, device="cpu")
    cu_q, cu_t = kw["cu_seqlens_q"], kw["cu_seqlens_tail"]

    def call(**change):
        args = dict(q=q, k=cache.k, v=cache.v, cu_seqlens=cache.cu_seqlens, seg_starts=None,
                    num_kv_heads=2, cu_seqlens_q=cu_q, k_tail=kt, v_tail=vt,
                    cu_seqlens_tail=cu_t, tail_starts=None, scale=0.3, return_lse=True)  # fmt: skip
        return op(*{**args, **change}.values())

    assert_close(call(), run("reference", q, cache, kt, vt, kw, scale=0.3), torch.float32)
    short_cu = cache.cu_seqlens.clone()
    short_cu[-1] -= 1  # packed segments that do not fill k
    for match, change in [
        ("cu_seqlens_q: expected to end at most at Nq=5", dict(cu_seqlens_q=cu_q * 2)),
        ("cu_seqlens_q: expected non-decreasing", dict(cu_seqlens_q=cu_q[[0, 2, 1]])),
        ("cu_seqlens_q: expected dtype int32", dict(cu_seqlens_q=cu_q.long())),
        ("cu_seqlens: expected to start at 0 and end at N", dict(cu_seqlens=short_cu)),
        ("cu_seqlens_tail: expected to end at most at Nt=3", dict(cu_seqlens_tail=cu_t * 2)),
        ("cu_seqlens_tail: expected an int32 tensor", dict(cu_seqlens_tail=None)),
        ("tail_starts: expected rows inside", dict(tail_starts=torch.tensor([0, 2]))),
        ("seg_starts: expected rows inside", dict(seg_starts=torch.tensor([0, 3, 4, 5]))),
        ("seg_starts: expected a contiguous int64", dict(seg_starts=torch.zeros(3).long())),
        ("k_tail: expected \\[Nt, Hkv=2", dict(k_tail=kt[:, :1], v_tail=vt[:, :1])),
        ("k_tail, v_tail: expected both or neither", dict(v_tail=None)),
        ("num_kv_heads: expected a positive divisor", dict(num_kv_heads=3)),
    ]:
        with pytest.raises(RuntimeError, match=match):
            call(**change)


# ----------------------------------------------------------------------------- Triton kernel


def triton_varlen(q, cache, kt, vt, kw, num_splits, tail_starts=None):
    from maskkv_kernels.attention.triton_ragged import ragged_attention_varlen_triton

    return ragged_attention_varlen_triton(
        q, cache.k, cache.v, cache.cu_seqlens, cache.seg_starts, cache.max_seqlen,
        cache.num_kv_heads, kw["cu_seqlens_q"], kw["max_seqlen_q"], kt, vt,
        kw.get("cu_seqlens_tail"), tail_starts, kw.get("max_seqlen_tail", 0), 0.25, True,
        num_splits=num_splits,
    )  # fmt: skip


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_tiles_and_split_k(num_splits, dtype):
    """Requests with more packed rows than one row tile next to requests with one row (idle row
    tiles), split-K work items crossing the segment / tail boundary, a pool view."""
    q, cache, kt, vt, kw = make_case(
        [40, 1, 0, 3], [[9, 0], [30, 2], [5, 5], [0, 0]], [6, 0, 2, 4], 1, 16, dtype, seed=13
    )
    want = ref.ragged_attention(q.cpu(), cache.to("cpu"), kt.cpu(), vt.cpu(), scale=0.25,
                                return_lse=True, **{a: x.cpu() if isinstance(x, torch.Tensor) else x
                                                    for a, x in kw.items()})  # fmt: skip
    got = triton_varlen(q, cache, kt, vt, kw, num_splits)
    assert_close(got, want, dtype)
    kp, vp, starts = tails_to_pool(kt, vt, kw["cu_seqlens_tail"])
    assert_bitwise(triton_varlen(q, to_pool(cache), kp, vp, kw, num_splits, starts), got)


# ----------------------------------------------------------------------------- CUDA, real shapes


def _cuda_case(dtype, seed=0):
    """LLaDA-8B heads (32/32, D 128): 6 requests at different positions, per-head kept lengths
    skewed 8x around 256, one request keeping a whole 4096-token prompt."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = 6, 32
    seg = torch.randint(0, 512, (B, Hkv), generator=gen)
    seg[0, :4] = 2048
    seg[1, 0] = 0
    seg[5] = 4096
    q_lens = [32, 1, 64, 0, 17, 32]
    t_lens = [256, 0, 300, 5, 32, 64]
    return make_case(q_lens, seg.tolist(), t_lens, 1, 128, dtype, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_real_shapes(backend, dtype):
    q, cache, kt, vt, kw = _cuda_case(dtype)
    want = ref.ragged_attention(
        q.cpu(), cache.to("cpu"), kt.cpu(), vt.cpu(), return_lse=True,
        **{a: x.cpu() if isinstance(x, torch.Tensor) else x for a, x in kw.items()},
    )  # fmt: skip
    assert_close(run(backend, q, cache, kt, vt, kw), want, dtype)
    kp, vp, starts = tails_to_pool(kt, vt, kw["cu_seqlens_tail"])
    got = run(backend, q, to_pool(cache), kp, vp, kw, tail_starts=starts)
    assert_close(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_splits", [2, 16])
def test_cuda_forced_splits(num_splits):
    q, cache, kt, vt, kw = _cuda_case(torch.bfloat16, seed=1)
    want = run("reference", q.cpu(), cache.to("cpu"), kt.cpu(), vt.cpu(),
               {a: x.cpu() if isinstance(x, torch.Tensor) else x for a, x in kw.items()},
               scale=0.25)  # fmt: skip
    assert_close(triton_varlen(q, cache, kt, vt, kw, num_splits), want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_triton_batch_invariant(dtype):
    """Autotuned Triton on the GPU: every request's rows bitwise its dense call's, including the
    requests whose segments split-K cuts into work items (4096 and 2048 + 256 keys) and the
    launches without LSE (another kernel variant, the same config)."""
    q, cache, kt, vt, kw = _cuda_case(dtype, seed=3)
    kp, vp, starts = tails_to_pool(kt, vt, kw["cu_seqlens_tail"])
    out, lse = run("triton", q, to_pool(cache), kp, vp, kw, tail_starts=starts)
    no_lse = mk.ragged_attention(q, cache, kt, vt, **kw, backend="triton")
    assert_bitwise((no_lse,), (out,))
    for rows, alone in per_request_dense_calls("triton", q, cache, kt, vt, kw):
        assert_bitwise((out[rows], lse[rows]), alone)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_splits", [None, 4])
def test_cuda_triton_nonfinite_follows_reference(num_splits):
    """NaN / inf on the GPU (whose ``tl.max`` drops NaN, unlike the interpreter's): a NaN key,
    a +inf query component, an inf value, each in its own request, give the reference's NaN /
    inf positions, the other values within tolerance."""
    q, cache, kt, vt, kw = _cuda_case(torch.float32, seed=4)
    cu, Hkv = cache.cu_seqlens.tolist(), cache.num_kv_heads
    cache.k[cu[2 * Hkv] + 3, 5] = math.nan  # request 2, KV head 0
    q[kw["cu_seqlens_q"][4], 1, 0] = math.inf  # request 4, one query of head 1
    cache.v[cu[5 * Hkv + 7] + 1, 2] = -math.inf  # request 5, KV head 7
    want = run("reference", q.cpu(), cache.to("cpu"), kt.cpu(), vt.cpu(),
               {a: x.cpu() if isinstance(x, torch.Tensor) else x for a, x in kw.items()})  # fmt: skip
    got = triton_varlen(q, cache, kt, vt, kw, num_splits)
    for a, b in zip(got, want):
        assert a.isnan().any() and a.isinf().any()  # (out: -inf from the value, lse: +inf)
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=1e-4, rtol=1e-4, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_no_host_sync_and_graph_replay():
    """The Triton varlen path never synchronises and replays from a CUDA graph with new values
    (other lengths, same shapes: a bucketed serving step)."""
    q, cache, kt, vt, kw = _cuda_case(torch.bfloat16, seed=2)
    pool = to_pool(cache)
    for lse in (False, True):  # compile + autotune (which syncs) both variants first
        mk.ragged_attention(q, pool, kt, vt, **kw, backend="triton", return_lse=lse)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mk.ragged_attention(q, pool, kt, vt, **kw, backend="triton", return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cu_q = kw["cu_seqlens_q"].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.ragged_attention(q, pool, kt, vt, **{**kw, "cu_seqlens_q": cu_q},
                                  backend="triton", check_inputs=False)  # fmt: skip
    # New query split, same shapes: requests 0 and 1 trade 16 queries.
    cu_q.copy_(torch.tensor([0, 16, 33, 97, 97, 114, 146], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = mk.ragged_attention(q, pool, kt, vt, **{**kw, "cu_seqlens_q": cu_q}, backend="torch")
    atol, rtol = OUT_TOL[torch.bfloat16]
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
