"""The C++ CPU backend (``backend="cpp"``, ``csrc/``) against the eager reference and the torch
backend.

The kernels are built once per test session (``maskkv_kernels._cpp`` caches the build per process
and on disk under ``$TORCH_EXTENSIONS_DIR/maskkv`` or ``~/.cache/maskkv``; concurrent xdist
workers wait on the build's file lock). Without a C++ compiler the module is skipped; with one, a
failed build is an error, not a skip.

The reference comparisons are the torch backend's (same cases, same helpers, imported from
``test_select_and_gather`` / ``test_ragged_attention``); on top: the DESIGN ranking rule on an
independent oracle, bitwise-equal selections to the torch backend on fp32 inputs, bitwise-equal
scores of identical keys, non-finite isolation between segments, the build/fallback paths and the
``TORCH_CHECK`` messages of direct ``torch.ops.maskkv_cpp`` calls.
"""

from __future__ import annotations

import math
import warnings

import pytest
import test_fuzz as fz
import test_ragged_attention as ra
import test_select_and_gather as sg
import torch

import maskkv_kernels as mk
from maskkv_kernels import _cpp, _dispatch
from maskkv_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    _cpp._find_compiler() is None, reason="no C++ compiler: the 'cpp' backend cannot be built"
)


@pytest.fixture(scope="module", autouse=True)
def built():
    _cpp.load()  # raises CppBackendUnavailable (an error, not a skip) when the build fails


# ----------------------------------------------------------------------------- select: reference


@pytest.mark.parametrize("case", sg.MASK_CASES, ids=lambda c: f"{str(c[0])[6:]}-G{c[2] // c[3]}")
def test_mask_scores(case):
    sg.test_mask_scores("cpp", case)


@pytest.mark.parametrize("case", sg.WINDOW_CASES, ids=lambda c: f"{c[1]}{c[2]}-G{c[3]}")
def test_window_scores(case):
    sg.test_window_scores("cpp", case)


@pytest.mark.parametrize(
    "case", sg.SELECT_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2])[6:]}-G{c[4] // c[5]}"
)
def test_select_and_gather(case):
    sg.test_select_and_gather("cpp", case)


def test_select_with_lse_and_explicit_budgets():
    sg.test_select_with_lse_and_explicit_budgets("cpp")


@pytest.mark.parametrize("budget", [0, 500])
def test_budget_zero_and_beyond_prompt(budget):
    sg.test_budget_zero_and_beyond_prompt("cpp", budget)


def test_strided_inputs():
    sg.test_strided_inputs("cpp")


def test_tiles_and_key_blocks():
    """More scoring rows than one row tile (256) and more keys than one key block (512), padding
    inside the first block, lse given and not."""
    B, Hq, Hkv, M, D, P = 2, 6, 2, 100, 16, 1100
    q, k, v = sg.make_inputs(B, Hq, Hkv, M, D, P, M, torch.bfloat16, seed=21)
    lens = torch.tensor([P, 700])
    for lse in (None, sg.natural_lse(q, k, P, lens)):
        got, mass = mk.mask_scores(q, k, prompt_len=P, prompt_lens=lens, lse=lse, backend="cpp")
        want, want_mass = ref.mask_scores(q, k, prompt_len=P, prompt_lens=lens, lse=lse)
        sg.assert_scores_close(got, want)
        torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-5)
    got = mk.window_scores(q, k, prompt_len=P, prompt_lens=lens, backend="cpp")
    sg.assert_scores_close(got, ref.window_scores(q, k, prompt_len=P, prompt_lens=lens))


def test_empty_prompt_rows():
    """A row with no real prompt token keeps nothing; its mask queries still see the response."""
    B, Hq, Hkv, M, D, P = 2, 2, 1, 3, 16, 30
    q, k, v = sg.make_inputs(B, Hq, Hkv, M, D, P, M, torch.float32, seed=22)
    lens = torch.tensor([0, 30])
    cache, scores = mk.select_and_gather(
        q, k, v, 5, prompt_len=P, prompt_lens=lens, return_scores=True, backend="cpp"
    )
    want, want_scores = ref.select_and_gather(
        q, k, v, 5, prompt_len=P, prompt_lens=lens, return_scores=True
    )
    sg.assert_scores_close(scores, want_scores)
    sg.assert_cache_equal(cache, want, k, v)
    assert cache.lengths().tolist() == [[0], [5]]


# ----------------------------------------------------------------------------- ranking rule


def rule_topk(scores: torch.Tensor, budgets, prompt_lens=None) -> list[list[list[int]]]:
    """DESIGN.md's rule, written independently: per (b, g), the k best real positions (higher
    score first, NaN below -inf, ties to the lower position), ascending."""
    B, H, P = scores.shape
    lens = [P] * B if prompt_lens is None else [int(x) for x in prompt_lens]
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            s = scores[b, h].tolist()

            def key(j, s=s):
                return (1, 0.0, j) if math.isnan(s[j]) else (0, -s[j], j)

            best = sorted(range(P - lens[b], P), key=key)[: int(budgets[b][h])]
            row.append(sorted(best))
        out.append(row)
    return out


def kept(cache) -> list[list[list[int]]]:
    B, H = cache.batch_size, cache.num_kv_heads
    cu, pos = cache.cu_seqlens.tolist(), cache.positions.tolist()
    return [[pos[cu[b * H + h] : cu[b * H + h + 1]] for h in range(H)] for b in range(B)]


@pytest.mark.parametrize("P", [37, 150, 1200])
def test_topk_rule_nan_inf_ties(P):
    """Ties, NaN, +-inf, -0.0/+0.0 and padding, against the independent oracle."""
    B, H, D = 2, 3, 16
    scores = sg.tricky_scores(B, H, P, seed=P)
    scores[0, 1, :4] = torch.tensor([3.4028235e38, math.inf, -3.4028235e38, -math.inf])
    _, k, v = sg.make_inputs(B, H, H, 1, D, P, 2, torch.bfloat16, seed=8)
    lens = torch.tensor([P, P - 11])
    budgets = torch.tensor([[0, 5, P], [P - 11, 1, 17]])
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=lens, backend="cpp")
    assert kept(got) == rule_topk(scores, budgets.tolist(), lens.tolist())
    sg.assert_rows_are_source(got, k, v)
    assert got.max_seqlen == P


@pytest.mark.parametrize(
    "scores, budget",
    [
        pytest.param([math.nan, -math.inf, 0.0, 0.0], 3, id="nan-below-neg-inf"),
        pytest.param([3.4028235e38, math.inf, 0.0, 0.0], 1, id="inf-above-flt-max"),
    ],
)
def test_topk_special_values_vs_torch_backend(scores, budget):
    """NaN below -inf and +inf above FLT_MAX (DESIGN.md), as the independent oracle and the
    torch backend keep them."""
    s = torch.tensor([[scores]])
    _, k, v = sg.make_inputs(1, 1, 1, 1, 8, 4, 0, torch.float32)
    b = torch.tensor([[budget]])
    got = mk.topk_gather(s, k, v, b, backend="cpp")
    assert kept(got) == rule_topk(s, b.tolist())
    assert kept(got) == kept(mk.topk_gather(s, k, v, b, backend="torch"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_bitwise_equal_to_torch(seed):
    """Finite scores with many exact ties (and -0.0 / +0.0): the same kept rows as torch."""
    g = torch.Generator().manual_seed(seed)
    B, H, P = 2, 3, 300
    scores = torch.randint(-4, 5, (B, H, P), generator=g).float() * 0.25
    scores[scores == 0] = torch.where(
        torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0
    )
    _, k, v = sg.make_inputs(B, H, H, 1, 16, P, 0, torch.float32, seed=seed)
    lens = torch.tensor([P, 123])
    budgets = torch.tensor([[1, 150, P], [0, 60, 123]])
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=lens, backend="cpp")
    want = mk.topk_gather(scores, k, v, budgets, prompt_lens=lens, backend="torch")
    sg.assert_cache_equal(got, want, k, v)


@pytest.mark.parametrize("score", ["mask", "window"])
@pytest.mark.parametrize("head_budget", ["uniform", "prompt_preference", "adakv"])
def test_selection_bitwise_equal_to_torch_fp32(score, head_budget):
    """fp32 inputs: same cu_seqlens, positions and K/V bits as the torch backend."""
    if score == "window" and head_budget == "prompt_preference":
        pytest.skip("prompt_preference needs mask mass")
    B, Hq, Hkv, M, D, P = 2, 8, 2, 6, 32, 300
    q, k, v = sg.make_inputs(B, Hq, Hkv, M, D, P, M, torch.float32, seed=23)
    lens = torch.tensor([P, 211])
    kw = dict(prompt_len=P, prompt_lens=lens, score=score, head_budget=head_budget)
    want, want_scores = mk.select_and_gather(q, k, v, 20, return_scores=True, backend="torch", **kw)
    sg.assert_no_near_ties(want_scores, want.lengths(), lens)
    got, scores = mk.select_and_gather(q, k, v, 20, return_scores=True, backend="cpp", **kw)
    sg.assert_scores_close(scores, want_scores)
    sg.assert_cache_equal(got, want, k, v)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


@pytest.mark.parametrize("score", ["mask", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: AMX tiles where present
def test_identical_keys_identical_scores(score, dtype):
    """Bitwise-identical keys score bitwise identically (also across key blocks and SIMD lanes),
    so ties go to the lower position: 40 copies of one key, budget 1 keeps the first copy."""
    B, Hq, Hkv, M, D, P = 1, 4, 2, 4, 32, 1100
    q, k, v = sg.make_inputs(B, Hq, Hkv, M, D, P, M, dtype, seed=24, spread=0.1)
    copies = [3, *range(495, 530), 1030, 1031, 1032, 1033]
    G = Hq // Hkv
    for g in range(Hkv):  # the copies point along the head's mean query: they win every softmax
        mean_q = q[0, g * G : (g + 1) * G].sum((0, 1))
        k[0, g, copies] = mean_q / mean_q.norm() * 50.0
    cache, scores = mk.select_and_gather(
        q, k, v, 1, prompt_len=P, score=score, pool="none", return_scores=True, backend="cpp"
    )
    for g in range(Hkv):
        s = scores[0, g, copies]
        assert torch.equal(s, s[:1].expand_as(s)), "identical keys scored differently"
    if score == "mask":
        assert kept(cache) == [[[3], [3]]]


@pytest.mark.parametrize(
    "seed, B, G, M, D, n, gap, first",
    [
        (70, 1, 1, 1, 128, 34, 1, 273),
        (117, 1, 1, 1, 16, 24, 1, 154),
        (134, 1, 1, 1, 16, 30, 129, 136),
        (205, 1, 1, 1, 128, 7, 129, 194),
        (539, 2, 3, 1, 64, 5, 1, 3),
        (689, 2, 2, 1, 64, 11, 1, 1),
        (1989, 1, 1, 2, 64, 29, 37, 1),
        (2508, 1, 1, 3, 8, 75, 7, 0),
    ],
)
def test_identical_keys_few_scoring_rows(seed, B, G, M, D, n, gap, first):
    """1-3 scoring rows per KV head (fp32): BLAS takes other kernels for such skinny products (a
    GEMV for one row), which rounded these copies apart by their position, query-major (the
    one-row cases) and key-major (the others) alike; the C++ product kernel rounds every key
    alike. The budget that reaches the copies keeps the first of them."""
    copies = first + gap * torch.arange(n)
    q, k, _ = fz.copies_of_one_key(seed, B, G, M, D, copies)
    P = k.shape[2] - 2
    _, scores = mk.select_and_gather(q, k, k, 1, prompt_len=P, return_scores=True, backend="cpp")
    for b in range(B):
        s = scores[b, 0, copies]
        assert torch.equal(s, s[:1].expand_as(s)), "identical keys scored differently"
        better = int((scores[b, 0] > s[0]).sum())  # keys that outrank the copies
        cache = mk.select_and_gather(
            q[b : b + 1], k[b : b + 1], k[b : b + 1], better + 1, prompt_len=P, backend="cpp"
        )
        assert first in kept(cache)[0][0]
        assert not set(copies[1:].tolist()) & set(kept(cache)[0][0])


# ----------------------------------------------------------------------------- ragged attention


@pytest.mark.parametrize("return_lse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 7])
def test_ragged_dtypes_groups(dtype, G, return_lse):
    q, cache, kt, vt = ra.make_inputs([[19, 0, 64], [3, 3, 40]], G, 3, 5, 16, dtype)
    ra.check_against_reference(q, cache, kt, vt, ra.api_run("cpp", return_lse))


@pytest.mark.parametrize(
    "lengths, G, Lq, Lt, D",
    [
        (ra.SKEWED, 1, 16, 7, 64),
        (ra.SKEWED_B2, 4, 3, 0, 16),
        (ra.SKEWED_B2, 7, 1, 9, 16),
        ([[0, 0]], 2, 4, 0, 16),  # no key at all: 0 and lse -inf
        ([[0, 0]], 2, 4, 3, 16),
        ([[700, 3]], 3, 100, 600, 16),  # 300 rows (two row tiles), keys over several blocks
    ],
)
def test_ragged_shapes(lengths, G, Lq, Lt, D):
    q, cache, kt, vt = ra.make_inputs(lengths, G, Lq, Lt, D, torch.float32)
    out, lse = ra.check_against_reference(q, cache, kt, vt, ra.api_run("cpp", True))
    empty = cache.lengths().repeat_interleave(G, 1) + Lt == 0
    assert (out[empty] == 0).all() and (lse[empty] == -math.inf).all()


def test_ragged_strided_and_unchecked():
    q, cache, kt, vt = ra.make_inputs(ra.SKEWED_B2, 4, 3, 2, 16, torch.bfloat16)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    kts = kt.transpose(1, 2).contiguous().transpose(1, 2)
    vts = vt.transpose(1, 2).contiguous().transpose(1, 2)
    want = mk.ragged_attention(q, cache, kt, vt, backend="cpp")
    assert torch.equal(mk.ragged_attention(qs, cache, kts, vts, backend="cpp"), want)
    fast = mk.ragged_attention(q, cache, kt, vt, backend="cpp", check_inputs=False)
    assert torch.equal(fast, want)


def test_ragged_nonfinite_stays_in_its_segment():
    """An inf value or a NaN key in one segment never touches another segment's output."""
    q, cache, kt, vt = ra.make_inputs([[5, 6], [7, 8]], 2, 3, 4, 16, torch.float32)
    clean = mk.ragged_attention(q, cache, kt, vt, backend="cpp")
    cache.v[0, 0] = math.inf  # segment (0, 0)
    cache.k[20, 3] = math.nan  # segment (1, 1)
    out = mk.ragged_attention(q, cache, kt, vt, backend="cpp")
    assert torch.equal(out[0, 2:], clean[0, 2:]) and torch.equal(out[1, :2], clean[1, :2])


# ----------------------------------------------------------------------------- dispatch, build


def test_auto_resolves_to_cpp_on_cpu():
    assert mk.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert mk.resolve_backend("cpp", torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError, match="backend: expected 'cpp' only for CPU tensors"):
        mk.resolve_backend("cpp", torch.device("meta"))


def test_fallback_without_compiler(monkeypatch):
    """No compiler: "auto" warns once and uses torch; "cpp" raises naming the compiler."""
    monkeypatch.setattr(_cpp.shutil, "which", lambda name: None)
    with pytest.raises(_cpp.CppBackendUnavailable, match=r"no C\+\+ compiler found"):
        _cpp._jit_build()
    reason = "no C++ compiler found (looked for $CXX, c++, g++, clang++)"
    monkeypatch.setattr(_cpp, "_reason", reason)  # as if this process's build attempt failed
    monkeypatch.setattr(_cpp, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
        assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert len(caught) == 1 and "no C++ compiler" in str(caught[0].message)
    with pytest.raises(_cpp.CppBackendUnavailable, match=r"no C\+\+ compiler"):
        _dispatch.resolve_backend("cpp", torch.device("cpu"))


def test_direct_op_calls_check_arguments():
    """torch.ops.maskkv_cpp.* bypass the Python checks; TORCH_CHECK names the argument."""
    ops = torch.ops.maskkv_cpp
    q, k, v = sg.make_inputs(1, 4, 2, 3, 16, 24, 3, torch.float32)
    first = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="prompt_len: expected"):
        ops.score_keys(q, k, first, None, 99, False, 0.25, True)
    with pytest.raises(RuntimeError, match="first: expected values"):
        ops.score_keys(q, k, torch.tensor([30], dtype=torch.int32), None, 24, False, 0.25, True)
    with pytest.raises(RuntimeError, match="k: expected q's dtype"):
        ops.score_keys(q, k.half(), first, None, 24, False, 0.25, True)
    with pytest.raises(RuntimeError, match="lse: expected shape"):
        ops.score_keys(q, k, first, torch.zeros(1, 4, 2), 24, False, 0.25, True)
    with pytest.raises(RuntimeError, match="k: expected the last"):
        ops.score_keys(q, k.mT.contiguous().mT, first, None, 24, False, 0.25, True)
    s = torch.rand(1, 2, 24, generator=torch.Generator().manual_seed(0))
    budgets = torch.tensor([[3, 30]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 33], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="budgets: expected values"):
        ops.topk_gather(s, k, v, budgets, first, cu, 33)
    budgets = torch.tensor([[3, 4]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens: expected"):
        ops.topk_gather(s, k, v, budgets, first, torch.tensor([0, 3, 9], dtype=torch.int32), 9)
    with pytest.raises(RuntimeError, match="budgets: expected dtype int32"):
        ops.topk_gather(s, k, v, budgets.long(), first, torch.tensor([0, 3, 7]).int(), 7)
    _, cache, kt, vt = ra.make_inputs(ra.SKEWED_B2, 4, 3, 2, 16, torch.float32)
    qa = torch.randn(2, 8, 3, 16, generator=torch.Generator().manual_seed(0))
    bad_cu = cache.cu_seqlens.clone()
    bad_cu[-1] += 5
    with pytest.raises(RuntimeError, match="cu_seqlens: expected to start at 0 and end at N"):
        ops.ragged_attention(qa, cache.k, cache.v, bad_cu, 2, kt, vt, 0.25, False)
    with pytest.raises(RuntimeError, match="k_tail, v_tail: expected both or neither"):
        ops.ragged_attention(qa, cache.k, cache.v, cache.cu_seqlens, 2, kt, None, 0.25, False)
    with pytest.raises(RuntimeError, match="num_kv_heads: expected"):
        ops.ragged_attention(qa, cache.k, cache.v, cache.cu_seqlens, 3, kt, vt, 0.25, False)


def test_custom_ops_with_cpp_backend_opcheck():
    q, k, v = sg.make_inputs(1, 4, 2, 3, 16, 24, 3, torch.float32, seed=11)
    first = torch.zeros(1, dtype=torch.int32)
    utils = ("test_schema", "test_faketensor")
    args = (q, k, v, first, None, 5, 24, "mask", "adakv", "max", 7, 0.2, None, 0.25, 10, "cpp")
    torch.library.opcheck(torch.ops.maskkv.select_and_gather, args, test_utils=utils)
    qa, cache, kt, vt = ra.make_inputs(ra.SKEWED_B2, 4, 3, 2, 16, torch.float16)
    torch.library.opcheck(
        torch.ops.maskkv.ragged_attention.default,
        (qa, cache.k, cache.v, cache.cu_seqlens, cache.max_seqlen, 2, kt, vt, 0.25, True, "cpp"),
        test_utils=utils,
    )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """The custom ops (whose CPU path calls the C++ kernels) trace into one graph."""
    q, k, v = sg.make_inputs(1, 4, 2, 3, 16, 40, 3, torch.float32, seed=12)
    first = torch.zeros(1, dtype=torch.int32)

    def select(q, k, v, first):
        return torch.ops.maskkv.select_and_gather(
            q, k, v, first, None, 6, 40, "mask", "prompt_preference", "max", 7, 0.1, None,
            0.25, 12, "cpp",
        )  # fmt: skip

    compiled = torch.compile(select, fullgraph=True, backend="inductor")
    for a, b in zip(compiled(q, k, v, first), select(q, k, v, first)):
        assert torch.equal(a, b)
    qa, cache, kt, vt = ra.make_inputs(ra.SKEWED_B2, 4, 3, 2, 16, torch.float32)

    @torch.compile(fullgraph=True, backend="inductor")
    def step(q, cache, kt, vt):
        return mk.ragged_attention(q * 2, cache, kt, vt, backend="cpp") + 1

    torch.testing.assert_close(
        step(qa, cache, kt, vt), ref.ragged_attention(qa * 2, cache, kt, vt) + 1, atol=2e-5,
        rtol=2e-5,
    )  # fmt: skip
