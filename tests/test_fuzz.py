"""Property suite (hypothesis) for both public ops, every backend, on adversarial inputs.

Shapes, modes, dtypes, left padding, GQA, budgets and special values (NaN, +-inf, -0.0, ties) are
generated; every property compares a backend with the reference, the backends with each other,
checks a structural invariant, or checks a metamorphic relation (something that must not change
the output). The Triton backend runs under ``TRITON_INTERPRET=1`` on tiny shapes.

Profiles (``MASKKV_FUZZ``):

- ``ci`` (default): a few hundred examples per torch-backend property, fewer for the
  Triton-interpreter ones (each interpreted launch costs ~10 ms per program); derandomised, so CI
  is reproducible, and sized to keep ``make test`` within its budget.
- ``long``: >= 10,000 examples per op (see README, "Testing"), random seeds.

"Equal" means: scores within rtol 1e-4 of the fp32 reference (same infinities), and the kept
rows exactly what the reference ranking and allocation give on the backend's own scores (so a
near-tie rounded differently by two correct implementations can never fail a test, while a wrong
position, total, order or row always does); K/V rows bitwise copies of the source.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import maskkv_kernels as mk
from maskkv_kernels import _cpp
from maskkv_kernels import reference as R
from maskkv_kernels._dispatch import interpreting, triton_available

FUZZ = os.environ.get("MASKKV_FUZZ", "ci")
if FUZZ not in ("ci", "long"):
    raise ValueError(f"MASKKV_FUZZ: expected 'ci' or 'long', got {FUZZ!r}")
LONG = FUZZ == "long"
HAS_TRITON = triton_available() and interpreting()
HAS_CPP = _cpp._find_compiler() is not None  # then the C++ backend must build (else: errors)
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler for the 'cpp' backend")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton on CPU needs TRITON_INTERPRET=1")


def fuzz(ci: int, long: int):
    """Hypothesis settings of one property: ``ci`` examples by default, ``long`` under
    MASKKV_FUZZ=long."""
    return settings(
        max_examples=long if LONG else ci,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Examples per property. The long profile gives each op >= 10,000 examples in all.
N_TORCH = (200, 4000)
N_TRITON = (25, 300)
N_META = (120, 1000)
N_META_ATTENTION = (120, 3000)
N_INVARIANCE = (150, 3000)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2 + 2**-7}
SPECIALS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0]

# ----------------------------------------------------------------------------- select cases


@st.composite
def select_cases(draw, *, max_p: int = 24, ties: bool = True, empty: bool = False):
    """Keyword arguments of one ``select_and_gather`` call (tensors on the CPU). ``empty``: mask
    mode with zero-element tensors (an empty prompt, often no response, or no mask query)."""
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 3, 4, 8, 16]))
    score = "mask" if empty else draw(st.sampled_from(["mask", "window"]))
    if empty:
        P = draw(st.sampled_from([0, 0, max_p]))
        L = P + draw(st.sampled_from([0, 0, 2]))
        M = draw(st.integers(0, 3)) if P == 0 else 0
    else:
        P = draw(st.integers(1 if score == "window" else 0, max_p))
        L = P + draw(st.integers(0, 6))
        M = draw(st.integers(1, P)) if score == "window" else draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if ties and draw(st.booleans()):  # few distinct values: many exactly tied scores
        q = torch.randint(-1, 2, (B, G * Hkv, M, D), generator=g).float()
        k = torch.randint(-1, 2, (B, Hkv, L, D), generator=g).float()
    else:
        q = torch.randn(B, G * Hkv, M, D, generator=g) * draw(st.sampled_from([0.5, 2.0, 8.0]))
        k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    prompt_lens = None
    if draw(st.booleans()):  # left padding (window queries may be padding too)
        prompt_lens = torch.randint(0, P + 1, (B,), generator=g)
        prompt_lens[0] = draw(st.sampled_from([0, P, int(prompt_lens[0])]))  # the edges
    head_budget = draw(
        st.sampled_from(["uniform", "adakv"] + (["prompt_preference"] if score == "mask" else []))
    )
    lens = [P] * B if prompt_lens is None else prompt_lens.tolist()
    if draw(st.integers(0, 4)) == 0:  # explicit per-head budgets
        budget = torch.stack([torch.randint(0, n + 1, (Hkv,), generator=g) for n in lens]).to(
            draw(st.sampled_from([torch.int32, torch.int64]))
        )
    else:
        budget = draw(st.integers(0, P + 2))
    kw = dict(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        budget=budget,
        prompt_len=P,
        prompt_lens=prompt_lens,
        score=score,
        head_budget=head_budget,
        alpha=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
    )
    if score == "window":
        kw["pool"] = draw(st.sampled_from(["max", "avg", "none"]))
        # Every width: narrow ones, and ones wider than the pooled range [0, P - W).
        kw["pool_kernel"] = draw(
            st.sampled_from([1, 3, 5]) | st.integers(0, P + 2).map(lambda n: 2 * n + 1)
        )
    if draw(st.integers(0, 3)) == 0:
        kw["scale"] = draw(st.sampled_from([0.05, 0.5, 1.0, 3.0]))
    if score == "mask" and draw(st.integers(0, 2)) == 0:
        kw["lse"] = true_lse(kw)
    return kw


def true_lse(kw) -> torch.Tensor:
    """fp32 [B, Hq, M] natural-log LSE of the mask queries over every valid key (-inf: none)."""
    q, k, P = kw["q"].double(), kw["k"].double(), kw["prompt_len"]
    B, Hq, M, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = kw.get("scale") or D**-0.5
    logits = torch.einsum("bhmd,bhld->bhml", q, k.repeat_interleave(Hq // Hkv, 1)) * scale
    if kw["prompt_lens"] is not None:
        first = P - kw["prompt_lens"]
        pad = torch.arange(L)[None] < first[:, None]
        logits = logits.masked_fill(pad[:, None, None], -math.inf)
    return torch.logsumexp(logits, -1).float()


def run_select(kw, backend, **extra):
    args = {**kw, **extra}
    return mk.select_and_gather(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("budget"), backend=backend, **args
    )


def first_real(kw) -> list[int]:
    P = kw["prompt_len"]
    lens = [P] * kw["q"].shape[0] if kw["prompt_lens"] is None else kw["prompt_lens"].tolist()
    return [P - n for n in lens]


def assert_scores_close(got, want, rtol=1e-4, atol=1e-6):
    """fp32 scores: same NaN and inf positions, finite values within rtol of the largest."""
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "inf positions differ"
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)]), "inf signs differ"
    fin = torch.isfinite(want)
    top = want[fin].abs().max().item() if fin.any() else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=atol + rtol * top)


def assert_cache_equal(a: mk.RaggedKV, b: mk.RaggedKV):
    """Same segments, positions and bitwise-equal rows."""
    assert a.num_kv_heads == b.num_kv_heads
    assert torch.equal(a.cu_seqlens.cpu(), b.cu_seqlens.cpu())
    assert torch.equal(a.positions.cpu(), b.positions.cpu())
    assert a.k.dtype == b.k.dtype and a.k.shape == b.k.shape
    assert torch.equal(bits(a.k), bits(b.k)) and torch.equal(bits(a.v), bits(b.v))


def bits(x: torch.Tensor) -> torch.Tensor:
    """Same-size integer view: bitwise comparisons that also hold for NaN rows."""
    return x.cpu().contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def expected_from_scores(kw, scores, backend) -> mk.RaggedKV:
    """What the backend must keep given its own scores: the reference allocator and ranking."""
    budget = kw["budget"]
    if not isinstance(budget, torch.Tensor):
        mass = None
        if kw["head_budget"] == "prompt_preference":
            sc, mass = mk.mask_scores(
                kw["q"], kw["k"], prompt_len=kw["prompt_len"], prompt_lens=kw["prompt_lens"],
                lse=kw.get("lse"), scale=kw.get("scale"), backend=backend,
            )  # fmt: skip
            assert torch.equal(bits(sc), bits(scores)), "mask_scores differs from the fused op"
        budget = R.allocate_head_budgets(
            scores, budget, kw["head_budget"], mask_mass=mass, alpha=kw["alpha"],
            prompt_lens=kw["prompt_lens"],
        )  # fmt: skip
    return R.topk_gather(scores, kw["k"], kw["v"], budget, prompt_lens=kw["prompt_lens"])


def check_against_reference(kw, backend):
    cache, scores = run_select(kw, backend, return_scores=True)
    _, want_scores = R.select_and_gather(
        **{k: v for k, v in kw.items() if k not in ("q", "k", "v", "budget")},
        q=kw["q"], k=kw["k"], v=kw["v"], budget=kw["budget"], return_scores=True,
    )  # fmt: skip
    assert_scores_close(scores, want_scores)
    assert_cache_equal(cache, expected_from_scores(kw, scores, backend))
    return cache, scores


def check_structure(kw, cache: mk.RaggedKV):
    """Totals, ascending unique positions, no padding, window kept, rows copied bit for bit."""
    B, Hkv = kw["k"].shape[:2]
    P = kw["prompt_len"]
    firsts = first_real(kw)
    lens = cache.lengths()
    budget = kw["budget"]
    if isinstance(budget, torch.Tensor):
        assert torch.equal(lens.long(), budget.long())
    else:
        for b in range(B):
            assert int(lens[b].sum()) == Hkv * min(budget, P - firsts[b])
    assert cache.max_seqlen >= int(lens.max())
    cu = cache.cu_seqlens.tolist()
    for b in range(B):
        for g in range(Hkv):
            s = b * Hkv + g
            pos = cache.positions[cu[s] : cu[s + 1]].long()
            assert (pos[1:] > pos[:-1]).all(), "positions not strictly ascending"
            assert ((pos >= firsts[b]) & (pos < P)).all(), "padding or non-prompt position kept"
            assert torch.equal(bits(cache.k[cu[s] : cu[s + 1]]), bits(kw["k"][b, g, pos]))
            assert torch.equal(bits(cache.v[cu[s] : cu[s + 1]]), bits(kw["v"][b, g, pos]))
            if kw["score"] == "window":  # +inf window scores: kept first, inside the budget
                window = [p for p in range(P - kw["q"].shape[2], P) if p >= firsts[b]]
                kept = pos.tolist()
                if len(kept) >= len(window):
                    assert set(window) <= set(kept), "window position dropped"
                else:  # ties among the +inf window: the lowest positions
                    assert kept == window[: len(kept)], "budget below the window"


# ----------------------------------------------------------------------------- select properties


@fuzz(*N_TORCH)
@given(kw=select_cases())
def test_select_torch_matches_reference(kw):
    cache, _ = check_against_reference(kw, "torch")
    check_structure(kw, cache)


@needs_triton
@fuzz(*N_TRITON)
@given(kw=select_cases(max_p=12))
def test_select_triton_matches_reference_and_torch(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy on -inf rows in the interpreter
        cache, scores = check_against_reference(kw, "triton")
    check_structure(kw, cache)
    t_cache, t_scores = run_select(kw, "torch", return_scores=True)
    assert_scores_close(scores, t_scores)
    if torch.equal(bits(scores), bits(t_scores)):  # same scores: exactly the same cache
        assert_cache_equal(cache, t_cache)


@needs_cpp
@fuzz(*N_META)
@given(kw=select_cases())
def test_select_cpp_matches_reference_and_torch(kw):
    cache, scores = check_against_reference(kw, "cpp")
    check_structure(kw, cache)
    t_cache, t_scores = run_select(kw, "torch", return_scores=True)
    assert_scores_close(scores, t_scores)
    if torch.equal(bits(scores), bits(t_scores)):  # same scores: exactly the same cache
        assert_cache_equal(cache, t_cache)


def _every_backend() -> list[str]:
    """Backends of a property that must hold on each: the interpreted Triton one (~50x slower
    per example) one draw in eight."""
    cpp = ["cpp", "cpp", "cpp"] if HAS_CPP else []
    return ["torch", "torch", "reference", *cpp] + (["triton"] if HAS_TRITON else [])


@st.composite
def nonfinite_key_cases(draw):
    """``select_cases`` with NaN / +-inf components in real keys (prompt or response) and
    sometimes in a query; a given ``lse`` is the attention forward's over the poisoned keys."""
    kw = draw(select_cases())
    k, q = kw["k"].clone(), kw["q"].clone()
    B, Hkv, L, D = k.shape
    assume(L > 0)
    firsts = first_real(kw)
    for _ in range(draw(st.integers(1, 3))):
        b = draw(st.integers(0, B - 1))
        assume(firsts[b] < L)
        j = draw(st.integers(firsts[b], L - 1))
        d = slice(None) if draw(st.integers(0, 3)) == 0 else draw(st.integers(0, D - 1))
        k[b, draw(st.integers(0, Hkv - 1)), j, d] = draw(st.sampled_from(SPECIALS[:3]))
    if q.shape[2] and draw(st.integers(0, 3)) == 0:
        q[draw(st.integers(0, B - 1)), 0, -1, 0] = draw(st.sampled_from(SPECIALS[:3]))
    kw = {**kw, "k": k, "q": q}
    if kw.get("lse") is not None:
        kw["lse"] = true_lse(kw)
    return kw


@fuzz(*N_META)
@given(kw=nonfinite_key_cases(), data=st.data())
def test_select_nonfinite_keys_match_reference(kw, data):
    """NaN / +-inf in real keys and queries, both score modes, every pooling width: each
    backend's scores equal the reference's (NaN and inf positions included), its kept rows are
    the ranking rule on its own scores, and window mode keeps its window (+inf) positions."""
    backend = data.draw(st.sampled_from(_every_backend()))
    assume(backend != "triton" or kw["prompt_len"] <= 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cache, scores = check_against_reference(kw, backend)
    check_structure(kw, cache)
    if kw["score"] == "window":  # only the window is +inf: no other score can tie with it
        assert torch.isfinite(scores[..., : kw["prompt_len"] - kw["q"].shape[2]]).all()


@fuzz(*N_META)
@given(kw=select_cases(max_p=6, empty=True), data=st.data())
def test_select_empty_and_strided_match_reference(kw, data):
    """Zero-element inputs (an empty prompt, no response, no mask query), each tensor
    contiguous or a strided view along any dim, the last included: every backend returns the
    reference's result, never an error."""
    backend = data.draw(st.sampled_from(_every_backend()))
    for name in ("q", "k", "v"):
        if data.draw(st.integers(0, 2)):  # the head dim most often: its stride is the odd one
            kw[name] = _strided(kw[name], data.draw(st.sampled_from([0, 1, 2, 3, 3, 3])))
    cache, _ = check_against_reference(kw, backend)
    check_structure(kw, cache)


@st.composite
def score_tensors(draw, max_p: int = 40):
    """(scores, k, v, budgets, prompt_lens) for topk_gather, with special values and ties."""
    B, Hkv, P = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, max_p))
    L = P + draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    big, tiny = torch.finfo(torch.float32).max, torch.finfo(torch.float32).smallest_normal
    pool = torch.tensor(SPECIALS + [2.0, -1.0, big, -big, tiny, 1e-45])
    kind = draw(st.sampled_from(["specials", "extremes", "ties", "random"]))
    if kind == "extremes":  # where NaN vs -inf and inf vs FLT_MAX decide the budget boundary
        pool = torch.tensor([math.nan, -math.inf, math.inf, big])
    if kind in ("specials", "extremes"):
        scores = pool[torch.randint(0, len(pool), (B, Hkv, P), generator=g)]
    elif kind == "ties":
        scores = torch.randint(0, 3, (B, Hkv, P), generator=g).float()
    else:
        scores = torch.randn(B, Hkv, P, generator=g)
    prompt_lens = torch.randint(0, P + 1, (B,), generator=g) if draw(st.booleans()) else None
    lens = [P] * B if prompt_lens is None else prompt_lens.tolist()
    budgets = torch.stack([torch.randint(0, n + 1, (Hkv,), generator=g) for n in lens])
    dtype = draw(st.sampled_from(DTYPES))
    k = torch.randn(B, Hkv, L, 4, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, 4, generator=g).to(dtype)
    return scores, k, v, budgets, prompt_lens


def check_ranking_rule(cache: mk.RaggedKV, case):
    """Independent oracle of DESIGN.md's rule (also guards the reference): among real
    positions, numbers by descending value then ascending position, then every NaN (NaN ranks
    below -inf), ascending position; the first budgets[b, g] are kept."""
    scores, _, _, budgets, prompt_lens = case
    B, Hkv, P = scores.shape
    cu = cache.cu_seqlens.tolist()
    for b in range(B):
        first = 0 if prompt_lens is None else P - int(prompt_lens[b])
        for g in range(Hkv):
            vals = scores[b, g].tolist()
            numbers = sorted(
                (p for p in range(first, P) if not math.isnan(vals[p])), key=lambda p: -vals[p]
            )
            nans = [p for p in range(first, P) if math.isnan(vals[p])]
            want = sorted((numbers + nans)[: int(budgets[b, g])])
            s = b * Hkv + g
            assert cache.positions[cu[s] : cu[s + 1]].tolist() == want, (b, g, vals)


@fuzz(*N_TORCH)
@given(case=score_tensors())
def test_topk_gather_special_scores_torch(case):
    """NaN below -inf, +inf above FLT_MAX, -0.0 == 0.0, ties to the lower position: the torch
    backend keeps exactly what the reference keeps."""
    scores, k, v, budgets, prompt_lens = case
    want = R.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens, backend="torch")
    assert_cache_equal(got, want)
    check_ranking_rule(got, case)


@needs_triton
@fuzz(2 * N_TRITON[0], N_TRITON[1])
@given(case=score_tensors(max_p=20))
def test_topk_gather_special_scores_triton(case):
    scores, k, v, budgets, prompt_lens = case
    want = R.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens, backend="triton")
    assert_cache_equal(got, want)
    check_ranking_rule(got, case)


@needs_cpp
@fuzz(*N_META)
@given(case=score_tensors())
def test_topk_gather_special_scores_cpp(case):
    scores, k, v, budgets, prompt_lens = case
    want = R.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens, backend="cpp")
    assert_cache_equal(got, want)
    check_ranking_rule(got, case)


def _backends():
    """Backends of a metamorphic property: mostly torch, the C++ one two examples in ten; the
    interpreted Triton one is ~50x slower per example, so it gets one example in ten."""
    return ["torch"] * 7 + (["cpp"] * 2 if HAS_CPP else []) + (["triton"] if HAS_TRITON else [])


@fuzz(*N_META)
@given(kw=select_cases(), data=st.data())
def test_select_nonfinite_padding_changes_nothing(kw, data):
    """NaN / inf in left padding (keys, values, window queries) changes nothing at all."""
    backend = data.draw(st.sampled_from(_backends()))
    assume(backend != "triton" or kw["prompt_len"] <= 12)
    assume(kw["prompt_lens"] is not None)
    P, firsts = kw["prompt_len"], first_real(kw)
    assume(max(firsts) > 0)
    bad = {name: kw[name].clone() for name in ("q", "k", "v")}
    special = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    for b, f in enumerate(firsts):
        bad["k"][b, :, :f] = special
        bad["v"][b, :, :f] = special
        if kw["score"] == "window":  # window queries at padding positions
            n_pad_q = max(0, f - (P - kw["q"].shape[2]))
            bad["q"][b, :, :n_pad_q] = special
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want, want_scores = run_select(kw, backend, return_scores=True)
        got, got_scores = run_select({**kw, **bad}, backend, return_scores=True)
    assert torch.equal(bits(got_scores), bits(want_scores))
    assert_cache_equal(got, want)


@fuzz(*N_META)
@given(kw=select_cases(), data=st.data())
def test_select_row_and_head_alone_equal_batch(kw, data):
    """A batch row run alone (and, with per-head budgets, a KV head alone) equals its part of
    the batched run, bit for bit; a NaN / inf in another row changes nothing."""
    backend = data.draw(st.sampled_from(_backends()))
    assume(backend != "triton" or kw["prompt_len"] <= 12)
    B, Hkv = kw["k"].shape[:2]
    G = kw["q"].shape[1] // Hkv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full, full_scores = run_select(kw, backend, return_scores=True)
        b = data.draw(st.integers(0, B - 1))
        row = {
            **kw,
            **{n: kw[n][b : b + 1] for n in ("q", "k", "v")},
            "prompt_lens": None if kw["prompt_lens"] is None else kw["prompt_lens"][b : b + 1],
            "lse": None if kw.get("lse") is None else kw["lse"][b : b + 1],
            "budget": kw["budget"][b : b + 1]
            if isinstance(kw["budget"], torch.Tensor)
            else kw["budget"],
        }
        alone, alone_scores = run_select(row, backend, return_scores=True)
        assert torch.equal(bits(alone_scores), bits(full_scores[b : b + 1]))
        s0, s1 = b * Hkv, (b + 1) * Hkv
        cu = full.cu_seqlens.tolist()
        assert torch.equal(alone.lengths(), full.lengths()[b : b + 1])
        assert torch.equal(alone.positions, full.positions[cu[s0] : cu[s1]])
        assert torch.equal(bits(alone.k), bits(full.k[cu[s0] : cu[s1]]))
        if B > 1:  # poison every other row: this row's output must not move
            poisoned = {n: kw[n].clone() for n in ("q", "k", "v")}
            special = data.draw(st.sampled_from([math.nan, math.inf]))
            for other in range(B):
                if other != b:
                    for n in ("q", "k", "v"):
                        poisoned[n][other] = special
            got, got_scores = run_select(
                {**kw, **poisoned, "budget": full.lengths()}, backend, return_scores=True
            )
            assert torch.equal(bits(got_scores[b]), bits(full_scores[b]))
            assert torch.equal(got.positions[cu[s0] : cu[s1]], full.positions[cu[s0] : cu[s1]])
        if kw["head_budget"] == "uniform" or isinstance(kw["budget"], torch.Tensor):
            g = data.draw(st.integers(0, Hkv - 1))
            head = {
                **kw,
                "q": kw["q"][:, g * G : (g + 1) * G],
                "k": kw["k"][:, g : g + 1],
                "v": kw["v"][:, g : g + 1],
                "lse": None if kw.get("lse") is None else kw["lse"][:, g * G : (g + 1) * G],
                "budget": kw["budget"][:, g : g + 1]
                if isinstance(kw["budget"], torch.Tensor)
                else kw["budget"],
            }
            one, one_scores = run_select(head, backend, return_scores=True)
            assert torch.equal(bits(one_scores), bits(full_scores[:, g : g + 1]))
            segs = [b_ * Hkv + g for b_ in range(B)]
            pos = torch.cat([full.positions[cu[s] : cu[s + 1]] for s in segs])
            assert torch.equal(one.positions, pos)


def _strided(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The same values, non-contiguous: every other element along ``dim`` of a NaN buffer."""
    shape = list(x.shape)
    shape[dim] *= 2
    wide = torch.full(shape, math.nan, dtype=x.dtype)
    index = [slice(None)] * x.dim()
    index[dim] = slice(0, None, 2)
    view = wide[tuple(index)]
    view.copy_(x)
    return view


@fuzz(*N_META)
@given(kw=select_cases(), data=st.data())
def test_select_noncontiguous_explicit_budgets_and_reruns(kw, data):
    """Non-contiguous q/k/v equal contiguous ones; the allocator's own budgets passed explicitly
    equal the implicit ones; two runs are bitwise equal."""
    backend = data.draw(st.sampled_from(_backends()))
    assume(backend != "triton" or kw["prompt_len"] <= 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want, want_scores = run_select(kw, backend, return_scores=True)
        again, again_scores = run_select(kw, backend, return_scores=True)
        assert torch.equal(bits(again_scores), bits(want_scores))
        assert_cache_equal(again, want)
        strided = {n: _strided(kw[n], data.draw(st.integers(0, 3))) for n in ("q", "k", "v")}
        assert all(torch.equal(bits(strided[n]), bits(kw[n])) for n in strided)
        got, got_scores = run_select({**kw, **strided}, backend, return_scores=True)
        assert torch.equal(bits(got_scores), bits(want_scores))
        assert_cache_equal(got, want)
        if not isinstance(kw["budget"], torch.Tensor):
            explicit = want.lengths().to(data.draw(st.sampled_from([torch.int32, torch.int64])))
            got = run_select({**kw, "budget": explicit}, backend)
            assert_cache_equal(got, want)


def copies_of_one_key(seed: int, B: int, G: int, M: int, D: int, copies: torch.Tensor):
    """(q [B, G, M, D], k [B, 1, P + 2, D], the generator) with N(0, 1) values, P = the last copy
    + 1, and the keys at ``copies`` bitwise copies of the first of them."""
    g = torch.Generator().manual_seed(seed)
    P = int(copies[-1]) + 1
    q = torch.randn(B, G, M, D, generator=g)
    k = torch.randn(B, 1, P + 2, D, generator=g)
    k[:, :, copies] = k[:, :, int(copies[0]) : int(copies[0]) + 1].clone()
    return q, k, g


@fuzz(*N_META)
@given(
    n_copies=st.integers(2, 80),
    offset=st.integers(0, 5),
    gap=st.sampled_from([1, 1, 7, 37]),
    B=st.integers(1, 2),
    G=st.integers(1, 4),
    M=st.integers(1, 6),
    D=st.sampled_from([3, 8, 16, 64]),
    budget=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    explicit=st.booleans(),
)
def test_identical_keys_identical_scores(n_copies, offset, gap, B, G, M, D, budget, seed, explicit):
    """Bitwise-identical keys get bitwise-identical scores on the torch and C++ backends,
    wherever they sit (``gap`` 37 spreads 80 copies over ~3000 keys, across the C++ kernel's key
    blocks), so ties go to the lower position (with an implicit or an explicit budget)."""
    copies = offset + gap * torch.arange(n_copies)
    q, k, g = copies_of_one_key(seed, B, G, M, D, copies)
    P = k.shape[2] - 2
    v = torch.randn(B, 1, P + 2, D, generator=g)
    budget = min(budget, P)
    budget_arg = torch.full((B, 1), budget) if explicit else budget
    for backend in ["torch", "cpp"] if HAS_CPP else ["torch"]:
        cache, scores = mk.select_and_gather(
            q, k, v, budget_arg, prompt_len=P, backend=backend, return_scores=True
        )
        same = scores[:, 0, copies]
        assert (same == same[:, :1]).all(), f"identical keys scored differently ({backend})"
        want = R.topk_gather(scores, k, v, cache.lengths())
        assert_cache_equal(cache, want)


# ----------------------------------------------------------------------------- attention cases


@st.composite
def attention_cases(draw, max_len: int = 8, empty: bool = False):
    """(q, cache, k_tail, v_tail, scale): empty segments, a loose max_seqlen, GQA, dtypes.
    ``empty`` (with ``max_len=0``): zero-element tensors, the cache's, often the tails' and
    sometimes q's."""
    B, Hkv, G = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 4, 8, 16]))
    Lq = draw(st.integers(0 if empty else 1, 4))
    Lt = draw(st.sampled_from([0, 0, 1, 3]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(0, max_len + 1, (B * Hkv,), generator=g)
    if draw(st.booleans()):
        lengths[torch.randint(0, B * Hkv, (1,), generator=g)] = 0
    N = int(lengths.sum())
    cu = torch.zeros(B * Hkv + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cache = mk.RaggedKV(
        k=torch.randn(N, D, generator=g).to(dtype),
        v=torch.randn(N, D, generator=g).to(dtype),
        cu_seqlens=cu,
        positions=torch.arange(N, dtype=torch.int32),
        max_seqlen=int(lengths.max()) + draw(st.sampled_from([0, 0, 3])),
        num_kv_heads=Hkv,
    )
    q = (torch.randn(B, G * Hkv, Lq, D, generator=g) * draw(st.sampled_from([0.5, 3.0]))).to(dtype)
    kt = vt = None
    if Lt or draw(st.booleans()):
        kt = torch.randn(B, Hkv, Lt, D, generator=g).to(dtype)
        vt = torch.randn(B, Hkv, Lt, D, generator=g).to(dtype)
    scale = draw(st.sampled_from([None, None, 0.3, 2.0]))
    return q, cache, kt, vt, scale


def run_attention(case, backend):
    q, cache, kt, vt, scale = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return mk.ragged_attention(q, cache, kt, vt, scale=scale, return_lse=True, backend=backend)


def assert_attention_close(got, want, dtype):
    """Outputs and LSEs within tolerance, NaN and inf at the same places."""
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol, equal_nan=True)
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5, equal_nan=True)


@fuzz(*N_TORCH)
@given(case=attention_cases())
def test_attention_torch_matches_reference(case):
    got = run_attention(case, "torch")
    assert got[0].dtype == case[0].dtype and got[0].shape == case[0].shape
    assert_attention_close(got, run_attention(case, "reference"), case[0].dtype)


@needs_triton
@fuzz(*N_TRITON)
@given(case=attention_cases(max_len=6))
def test_attention_triton_matches_reference_and_torch(case):
    got = run_attention(case, "triton")
    assert_attention_close(got, run_attention(case, "reference"), case[0].dtype)
    assert_attention_close(got, run_attention(case, "torch"), case[0].dtype)


@needs_cpp
@fuzz(*N_META)
@given(case=attention_cases(max_len=40))
def test_attention_cpp_matches_reference_and_torch(case):
    got = run_attention(case, "cpp")
    assert got[0].dtype == case[0].dtype and got[0].shape == case[0].shape
    assert_attention_close(got, run_attention(case, "reference"), case[0].dtype)
    assert_attention_close(got, run_attention(case, "torch"), case[0].dtype)


@fuzz(*N_META)
@given(case=attention_cases(max_len=0, empty=True), data=st.data())
def test_attention_empty_and_strided_match_reference(case, data):
    """Only empty segments (N = 0), empty tails or no query, each tensor contiguous or a
    strided view along any dim, the last included: every backend returns the reference's
    output and LSE, never an error."""
    backend = data.draw(st.sampled_from(_every_backend()))
    q, cache, kt, vt, scale = case

    def maybe_strided(x):
        if x is None or not data.draw(st.integers(0, 2)):
            return x
        return _strided(x, data.draw(st.sampled_from([*range(x.dim()), x.dim() - 1])))

    cache = mk.RaggedKV(
        maybe_strided(cache.k), maybe_strided(cache.v), cache.cu_seqlens, cache.positions,
        cache.max_seqlen, cache.num_kv_heads,
    )  # fmt: skip
    case = (maybe_strided(q), cache, maybe_strided(kt), maybe_strided(vt), scale)
    got = run_attention(case, backend)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    assert_attention_close(got, run_attention(case, "reference"), q.dtype)


@fuzz(*N_META_ATTENTION)
@given(case=attention_cases(), data=st.data())
def test_attention_nonfinite_in_other_segment_changes_nothing(case, data):
    """An inf / NaN in the keys or values of one segment (or its tail) leaves every other
    segment's output and LSE bitwise unchanged."""
    backend = data.draw(st.sampled_from(_backends() + ["reference"]))
    q, cache, kt, vt, scale = case
    B, Hkv = cache.batch_size, cache.num_kv_heads
    want = run_attention(case, backend)
    s = data.draw(st.integers(0, B * Hkv - 1))
    special = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    k, v = cache.k.clone(), cache.v.clone()
    lo, hi = cache.cu_seqlens[s].item(), cache.cu_seqlens[s + 1].item()
    k[lo:hi, : data.draw(st.integers(1, k.shape[1]))] = special
    v[lo:hi] = special
    poisoned = mk.RaggedKV(k, v, cache.cu_seqlens, cache.positions, cache.max_seqlen, Hkv)
    if kt is not None:
        kt, vt = kt.clone(), vt.clone()
        kt[s // Hkv, s % Hkv] = special
        vt[s // Hkv, s % Hkv] = special
    got = run_attention((q, poisoned, kt, vt, scale), backend)
    G = q.shape[1] // Hkv
    other = torch.ones(B, Hkv, dtype=torch.bool)
    other[s // Hkv, s % Hkv] = False
    other = other.repeat_interleave(G, 1)  # [B, Hq]
    assert torch.equal(bits(got[0][other]), bits(want[0][other]))
    assert torch.equal(bits(got[1][other]), bits(want[1][other]))


@fuzz(*N_META_ATTENTION)
@given(case=attention_cases(), data=st.data())
def test_attention_row_alone_noncontiguous_and_reruns(case, data):
    """A batch row alone equals its rows in the batch; non-contiguous q and tails equal
    contiguous ones; two runs are bitwise equal."""
    backend = data.draw(st.sampled_from(_backends()))
    q, cache, kt, vt, scale = case
    want = run_attention(case, backend)
    again = run_attention(case, backend)
    assert torch.equal(bits(again[0]), bits(want[0])) and torch.equal(again[1], want[1])
    strided = (
        _strided(q, data.draw(st.integers(0, 3))),
        cache,
        None if kt is None else _strided(kt, 2),
        None if vt is None else _strided(vt, 3),
        scale,
    )
    got = run_attention(strided, backend)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1])
    b = data.draw(st.integers(0, cache.batch_size - 1))
    Hkv = cache.num_kv_heads
    cu = cache.cu_seqlens
    lo, hi = cu[b * Hkv].item(), cu[(b + 1) * Hkv].item()
    row_cache = mk.RaggedKV(
        cache.k[lo:hi],
        cache.v[lo:hi],
        (cu[b * Hkv : (b + 1) * Hkv + 1] - lo).to(torch.int32),
        cache.positions[lo:hi],
        cache.max_seqlen,
        Hkv,
    )
    tail = (None, None) if kt is None else (kt[b : b + 1], vt[b : b + 1])
    alone = run_attention((q[b : b + 1], row_cache, *tail, scale), backend)
    if backend == "torch":  # its buckets mix batch rows: the rounding of another order at most
        assert_attention_close(
            (alone[0], alone[1]), (want[0][b : b + 1], want[1][b : b + 1]), q.dtype
        )
    else:  # C++ and Triton round a query row the same in any batch
        assert torch.equal(bits(alone[0]), bits(want[0][b : b + 1]))
        assert torch.equal(bits(alone[1]), bits(want[1][b : b + 1]))


# ----------------------------------------------------------------------------- varlen attention


@st.composite
def varlen_cases(draw, max_len: int = 8, dims=(1, 4, 8, 16)):
    """One varlen ``ragged_attention`` call: (q, cache, k_tail, v_tail, varlen kwargs, scale).

    Requests with no query, empty segments and tails, a request's queries padded past
    cu_seqlens_q[-1], loose host bounds, GQA (G = 1 is MHA), head dims ``dims``, dtypes."""
    B, Hkv, G = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    D = draw(st.sampled_from(dims))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    seg_lens = torch.randint(0, max_len + 1, (B * Hkv,), generator=g)
    if draw(st.booleans()):
        seg_lens[torch.randint(0, B * Hkv, (1,), generator=g)] = 0
    q_lens = torch.randint(0, 5, (B,), generator=g)
    if draw(st.booleans()):
        q_lens[torch.randint(0, B, (1,), generator=g)] = 0
    spare_rows = draw(st.sampled_from([0, 0, 2]))  # Nq padded past the last request
    N, Nq = int(seg_lens.sum()), int(q_lens.sum())

    def cu(lens):
        return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)

    cache = mk.RaggedKV(
        k=torch.randn(N, D, generator=g).to(dtype),
        v=torch.randn(N, D, generator=g).to(dtype),
        cu_seqlens=cu(seg_lens),
        positions=torch.arange(N, dtype=torch.int32),
        max_seqlen=int(seg_lens.max()) + draw(st.sampled_from([0, 0, 3])),
        num_kv_heads=Hkv,
    )
    q = torch.randn(Nq + spare_rows, G * Hkv, D, generator=g) * draw(st.sampled_from([0.5, 3.0]))
    kw = dict(
        cu_seqlens_q=cu(q_lens), max_seqlen_q=int(q_lens.max()) + draw(st.sampled_from([0, 2]))
    )
    kt = vt = None
    if draw(st.integers(0, 3)):
        t_lens = torch.randint(0, 4, (B,), generator=g)
        Nt = int(t_lens.sum())
        kt = torch.randn(Nt, Hkv, D, generator=g).to(dtype)
        vt = torch.randn(Nt, Hkv, D, generator=g).to(dtype)
        kw["cu_seqlens_tail"] = cu(t_lens)
        kw["max_seqlen_tail"] = draw(st.sampled_from([None, int(t_lens.max())]))
    scale = draw(st.sampled_from([None, None, 0.3, 2.0]))
    return q.to(dtype), cache, kt, vt, kw, scale


def run_varlen(case, backend, **extra):
    q, cache, kt, vt, kw, scale = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return mk.ragged_attention(
            q, cache, kt, vt, **{**kw, **extra}, scale=scale, return_lse=True, backend=backend
        )


@fuzz(*N_TORCH)
@given(case=varlen_cases())
def test_varlen_torch_matches_reference(case):
    got = run_varlen(case, "torch")
    assert got[0].dtype == case[0].dtype and got[0].shape == case[0].shape
    assert_attention_close(got, run_varlen(case, "reference"), case[0].dtype)


@needs_triton
@fuzz(*N_TRITON)
@given(case=varlen_cases(max_len=6), num_splits=st.sampled_from([None, None, 2, 3]))
def test_varlen_triton_matches_reference_and_torch(case, num_splits):
    """The public op (split-K off under the interpreter), and split-K work items forced."""
    want = run_varlen(case, "reference")
    assert_attention_close(run_varlen(case, "triton"), want, case[0].dtype)
    assert_attention_close(run_varlen(case, "torch"), want, case[0].dtype)
    if num_splits is not None:
        from maskkv_kernels.attention.triton_ragged import ragged_attention_varlen_triton

        q, cache, kt, vt, kw, scale = case
        max_t = kw.get("max_seqlen_tail") or (0 if kt is None else kt.shape[0])
        got = ragged_attention_varlen_triton(
            q, cache.k, cache.v, cache.cu_seqlens, None, cache.max_seqlen, cache.num_kv_heads,
            kw["cu_seqlens_q"], kw["max_seqlen_q"], kt, vt, kw.get("cu_seqlens_tail"), None,
            max_t, scale or q.shape[-1] ** -0.5, True, num_splits=num_splits,
        )  # fmt: skip
        assert_attention_close(got, want, q.dtype)


@needs_cpp
@fuzz(*N_META)
@given(case=varlen_cases(max_len=40))
def test_varlen_cpp_matches_reference_and_torch(case):
    got = run_varlen(case, "cpp")
    assert got[0].dtype == case[0].dtype and got[0].shape == case[0].shape
    assert_attention_close(got, run_varlen(case, "reference"), case[0].dtype)
    assert_attention_close(got, run_varlen(case, "torch"), case[0].dtype)


@fuzz(*N_META_ATTENTION)
@given(case=varlen_cases(), data=st.data())
def test_varlen_pool_view_poison_and_requests_alone(case, data):
    """A pool view (segments and tails relocated, NaN / inf garbage between them) is bitwise the
    packed call; NaN / inf in one request's keys, values, tail or queries leaves every other
    request bitwise unchanged; every request alone (the dense 4-D call) is bitwise its rows."""
    import test_ragged_varlen as tv

    backend = data.draw(st.sampled_from(_backends()))
    q, cache, kt, vt, kw, scale = case
    want = run_varlen(case, backend)
    special = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    pool = tv.to_pool(cache, gap=data.draw(st.integers(0, 2)), garbage=special)
    extra = {}
    if kt is not None:
        kt, vt, extra["tail_starts"] = tv.tails_to_pool(kt, vt, kw["cu_seqlens_tail"])
    got = run_varlen((q, pool, kt, vt, kw, scale), backend, **extra)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(bits(got[1]), bits(want[1]))

    q, cache, kt, vt, kw, scale = case
    B, Hkv = cache.batch_size, cache.num_kv_heads
    b = data.draw(st.integers(0, B - 1))
    cu, cu_q = cache.cu_seqlens.tolist(), kw["cu_seqlens_q"].tolist()
    k, v, q2 = cache.k.clone(), cache.v.clone(), q.clone()
    k[cu[b * Hkv] : cu[(b + 1) * Hkv]] = special
    v[cu[b * Hkv] : cu[(b + 1) * Hkv]] = special
    q2[cu_q[b] : cu_q[b + 1]] = special
    poisoned = mk.RaggedKV(k, v, cache.cu_seqlens, cache.positions, cache.max_seqlen, Hkv)
    kt2, vt2 = kt, vt
    if kt is not None:
        cu_t = kw["cu_seqlens_tail"].tolist()
        kt2, vt2 = kt.clone(), vt.clone()
        kt2[cu_t[b] : cu_t[b + 1]] = special
        vt2[cu_t[b] : cu_t[b + 1]] = special
    got = run_varlen((q2, poisoned, kt2, vt2, kw, scale), backend)
    other = torch.ones(q.shape[0], dtype=torch.bool)
    other[cu_q[b] : cu_q[b + 1]] = False
    assert torch.equal(bits(got[0][other]), bits(want[0][other]))
    assert torch.equal(bits(got[1][other]), bits(want[1][other]))

    assert_requests_alone_bitwise(case, want, backend)


def assert_requests_alone_bitwise(case, got, backend, **launch):
    """Every request's rows of the varlen result ``got`` are bitwise the dense 4-D call on that
    request alone (its segments packed, its tail contiguous). ``launch``: Triton launcher
    keywords (then the launchers are called directly, the same for both forms)."""
    import test_ragged_varlen as tv

    q, cache, kt, vt, kw, scale = case
    cu_q = kw["cu_seqlens_q"].tolist()
    for b in range(cache.batch_size):
        q4, one, kt4, vt4 = tv.request_alone(b, q, cache, kt, vt, kw)
        if launch:
            from maskkv_kernels.attention.triton_ragged import ragged_attention_triton

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                alone = ragged_attention_triton(
                    q4, one.k, one.v, one.cu_seqlens, one.max_seqlen, one.num_kv_heads,
                    None if kt4 is None or not kt4.shape[2] else kt4, vt4,
                    scale or q.shape[-1] ** -0.5, True, **launch,
                )  # fmt: skip
        else:
            alone = run_attention((q4, one, kt4, vt4, scale), backend)
        rows = slice(cu_q[b], cu_q[b + 1])
        assert torch.equal(bits(alone[0][0].transpose(0, 1)), bits(got[0][rows])), (backend, b)
        assert torch.equal(bits(alone[1][0].T), bits(got[1][rows])), (backend, b)


# Batch invariance over head dims that are and are not whole vectors (the C++ kernels' lanes).
INVARIANCE_DIMS = (1, 5, 8, 16, 24, 40, 64)


@fuzz(*N_INVARIANCE)
@given(case=varlen_cases(max_len=40, dims=INVARIANCE_DIMS), data=st.data())
def test_varlen_batch_invariant(case, data):
    """Batch invariance, what lets the serving engine run one varlen call per layer for all its
    requests: in a varlen call over pool views (segments and tails relocated, NaN / inf garbage
    between them), every request's output and LSE are bitwise those of the dense 4-D call on
    that request alone, on the torch, C++ and reference backends (Triton: the next property)."""
    import test_ragged_varlen as tv

    backend = data.draw(st.sampled_from(["torch", "reference"] + (["cpp"] * 2 if HAS_CPP else [])))
    q, cache, kt, vt, kw, scale = case
    garbage = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
    pool = tv.to_pool(cache, gap=data.draw(st.integers(0, 3)), garbage=garbage)
    extra = {}
    if kt is not None:
        kt_pool, vt_pool, extra["tail_starts"] = tv.tails_to_pool(
            kt, vt, kw["cu_seqlens_tail"], garbage=garbage
        )
    else:
        kt_pool = vt_pool = None
    got = run_varlen((q, pool, kt_pool, vt_pool, kw, scale), backend, **extra)
    assert_requests_alone_bitwise(case, got, backend)


@needs_triton
@fuzz(*N_TRITON)
@given(
    case=varlen_cases(max_len=12, dims=(4, 16, 24)),
    split_chunk=st.sampled_from([None, 16, 32]),
)
def test_varlen_triton_batch_invariant(case, split_chunk):
    """The same for Triton, also with split-K work items of a fixed size (``split_chunk``):
    a segment's items come from its own length, so a request whose segments fit one item runs
    the unsplit arithmetic alone and in a batch that splits other requests' segments."""
    from maskkv_kernels.attention.triton_ragged import ragged_attention_varlen_triton

    q, cache, kt, vt, kw, scale = case
    if split_chunk is None:
        assert_requests_alone_bitwise(case, run_varlen(case, "triton"), "triton")
        return
    max_t = kw.get("max_seqlen_tail") or (0 if kt is None else kt.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = ragged_attention_varlen_triton(
            q, cache.k, cache.v, cache.cu_seqlens, None, cache.max_seqlen, cache.num_kv_heads,
            kw["cu_seqlens_q"], kw["max_seqlen_q"], kt, vt, kw.get("cu_seqlens_tail"), None,
            max_t, scale or q.shape[-1] ** -0.5, True, split_chunk=split_chunk,
        )  # fmt: skip
    assert_attention_close(got, run_varlen(case, "reference"), q.dtype)
    assert_requests_alone_bitwise(case, got, "triton", split_chunk=split_chunk)


@fuzz(*N_META)
@given(case=varlen_cases(max_len=12, dims=(1, 4, 16, 24)), data=st.data())
def test_varlen_nonfinite_follows_reference(case, data):
    """NaN / +-inf in one request's queries, kept keys or values, or tail (single components or
    whole rows): every backend gives the reference's output and LSE (the softmax of IEEE logits:
    the same NaN and inf positions, the finite values close), in the varlen call and in the
    request's dense call."""
    import test_ragged_varlen as tv

    backend = data.draw(st.sampled_from(_every_backend()))
    q, cache, kt, vt, kw, _ = case
    # Small logits: no probability underflows to 0 (where 0 * inf = NaN would depend on exp).
    q = (q.float() * 0.3).to(q.dtype)
    k, v = cache.k.clone(), cache.v.clone()
    kt, vt = (None, None) if kt is None else (kt.clone(), vt.clone())
    B, Hkv = cache.batch_size, cache.num_kv_heads
    b = data.draw(st.integers(0, B - 1))
    cu, cu_q = cache.cu_seqlens.tolist(), kw["cu_seqlens_q"].tolist()
    targets = [("q", q, cu_q[b], cu_q[b + 1]), ("k", k, cu[b * Hkv], cu[(b + 1) * Hkv])]
    targets.append(("v", v, cu[b * Hkv], cu[(b + 1) * Hkv]))
    if kt is not None:
        cu_t = kw["cu_seqlens_tail"].tolist()
        targets += [("kt", kt, cu_t[b], cu_t[b + 1]), ("vt", vt, cu_t[b], cu_t[b + 1])]
    targets = [t for t in targets if t[3] > t[2]]
    assume(targets)
    for _ in range(data.draw(st.integers(1, 4))):
        _, x, lo, hi = data.draw(st.sampled_from(targets))
        row = x[data.draw(st.integers(lo, hi - 1))]  # [D] or [H, D]
        special = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if data.draw(st.booleans()):
            row[...] = special
        else:
            row[..., data.draw(st.integers(0, x.shape[-1] - 1))] = special
    poisoned = mk.RaggedKV(k, v, cache.cu_seqlens, cache.positions, cache.max_seqlen, Hkv)
    case = (q, poisoned, kt, vt, kw, None)
    assert_attention_close(run_varlen(case, backend), run_varlen(case, "reference"), q.dtype)
    q4, one, kt4, vt4 = tv.request_alone(b, q, poisoned, kt, vt, kw)
    dense = (q4, one, kt4, vt4, None)
    assert_attention_close(
        run_attention(dense, backend), run_attention(dense, "reference"), q.dtype
    )
