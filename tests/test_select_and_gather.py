"""select_and_gather and its steps against the eager reference.

CPU: the torch backend always; the Triton backend under ``TRITON_INTERPRET=1`` (tiny shapes: the
interpreter runs every program in NumPy). CUDA (``-m gpu``, skipped without a GPU): LLaDA / Dream
layer shapes, long prompts split across programs, the no-sync proof and CUDA-graph capture.

What "equal" means here: scores within rtol 1e-4 of the fp32 reference (bf16/fp16 inputs are
upcast after load by both); kept positions and cu_seqlens exactly equal (inputs are checked for
near-ties at every budget boundary first, so the comparison can only fail for a real bug); K/V rows
bitwise equal to the source rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskkv_kernels as mk
from maskkv_kernels import reference as ref
from maskkv_kernels._dispatch import interpreting, triton_available
from maskkv_kernels.select import MaskKVSelector

CUDA = torch.cuda.is_available()
HAS_TRITON_CPU = triton_available() and interpreting()
needs_triton_cpu = pytest.mark.skipif(
    not HAS_TRITON_CPU, reason="Triton on CPU needs TRITON_INTERPRET=1 (set before import)"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
CPU_BACKENDS = [
    "torch",
    pytest.param("triton", marks=needs_triton_cpu),
]


# ----------------------------------------------------------------------------- helpers


def make_inputs(B, Hq, Hkv, M, D, P, R, dtype, *, seed=0, device="cpu", spread=2.0):
    """q [B, Hq, M, D], k, v [B, Hkv, P + R, D]. ``spread`` scales q so that softmaxes are peaked
    enough for well-separated scores."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g) * spread
    k = torch.randn(B, Hkv, P + R, D, generator=g)
    v = torch.randn(B, Hkv, P + R, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def assert_scores_close(got, want, rtol=1e-4, atol=1e-6):
    """fp32 scores: same infinities, finite values within rtol (relative to the largest)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "inf positions differ"
    fin = torch.isfinite(want)
    scale = want[fin].abs().max().item() if fin.any() else 1.0
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=atol + rtol * 1e-2 * scale)


def assert_no_near_ties(scores, budgets, prompt_lens=None, rel=1e-4):
    """Every (b, g) with 0 < k < real length has a clear gap between its k-th and (k+1)-th best
    scores, so a 1e-6 difference between backends cannot flip the kept set."""
    B, H, P = scores.shape
    lens = [P] * B if prompt_lens is None else prompt_lens.tolist()
    for b in range(B):
        for h in range(H):
            kb = int(budgets[b, h])
            row = scores[b, h, P - lens[b] :].double().cpu().nan_to_num(nan=-math.inf)
            if not 0 < kb < row.numel():
                continue
            s = row.sort(descending=True).values
            lo, hi = s[kb], s[kb - 1]
            if torch.isinf(lo) or torch.isinf(hi) or lo == hi:
                continue  # exact in every backend (window +inf; max pooling repeats one value)
            assert hi - lo > rel * max(abs(hi.item()), 1e-12), (
                f"test inputs have a near-tie at (b={b}, g={h}, k={kb}): choose another seed"
            )


def assert_cache_equal(cache, want, k, v):
    """Same segments and positions as the reference; rows bitwise equal to the source rows."""
    assert cache.num_kv_heads == want.num_kv_heads
    assert cache.cu_seqlens.dtype == torch.int32 and cache.positions.dtype == torch.int32
    assert torch.equal(cache.cu_seqlens.cpu(), want.cu_seqlens.cpu()), "cu_seqlens differ"
    assert torch.equal(cache.positions.cpu(), want.positions.cpu()), "kept positions differ"
    assert cache.max_seqlen >= int(cache.lengths().max()) if cache.k.shape[0] else True
    assert_rows_are_source(cache, k, v)


def assert_rows_are_source(cache, k, v):
    lengths = cache.lengths().reshape(-1).long().cpu()
    Hkv = cache.num_kv_heads
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(k.device)
    pos = cache.positions.long()
    src_k = k[seg // Hkv, seg % Hkv, pos]
    src_v = v[seg // Hkv, seg % Hkv, pos]
    bits = {2: torch.int16, 4: torch.int32}[k.element_size()]
    assert cache.k.dtype == k.dtype and cache.v.dtype == v.dtype
    assert torch.equal(cache.k.view(bits), src_k.view(bits)), "K rows are not bit copies"
    assert torch.equal(cache.v.view(bits), src_v.view(bits)), "V rows are not bit copies"


def natural_lse(q, k, P, prompt_lens, scale=None):
    """fp32 [B, Hq, M] natural-log LSE over all valid keys, as an attention forward returns."""
    B, Hq, M, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    logits = (
        torch.einsum("bhmd,bhld->bhml", q.float(), k.float().repeat_interleave(Hq // Hkv, 1))
        * scale
    )
    if prompt_lens is not None:
        first = (P - prompt_lens.to(q.device).long())[:, None, None, None]
        logits = logits.masked_fill(torch.arange(L, device=q.device) < first, -math.inf)
    return torch.logsumexp(logits, -1)


# ----------------------------------------------------------------------------- scores

MASK_CASES = [
    # dtype, B, Hq, Hkv, M, D, P, R, padded, with_lse
    (torch.float32, 1, 2, 2, 8, 16, 80, 8, False, False),  # G = 1
    (torch.float16, 2, 8, 2, 5, 16, 96, 5, True, True),  # G = 4, left padding, lse given
    (torch.bfloat16, 2, 7, 1, 3, 64, 70, 3, True, False),  # G = 7, D = 64
    (torch.bfloat16, 1, 4, 1, 1, 16, 50, 1, False, True),  # M = 1
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"{str(c[0])[6:]}-G{c[2] // c[3]}")
def test_mask_scores(backend, case):
    dtype, B, Hq, Hkv, M, D, P, R, padded, with_lse = case
    q, k, _ = make_inputs(B, Hq, Hkv, M, D, P, R, dtype, seed=1)
    lens = torch.tensor([P, P // 2][:B]) if padded else None
    lse = natural_lse(q, k, P, lens) if with_lse else None
    scores, mass = mk.mask_scores(q, k, prompt_len=P, prompt_lens=lens, lse=lse, backend=backend)
    want, want_mass = ref.mask_scores(q, k, prompt_len=P, prompt_lens=lens, lse=lse)
    assert_scores_close(scores, want)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)
    if padded:  # padding positions score exactly 0
        assert scores[1, :, : P - P // 2].abs().max() == 0


@needs_triton_cpu
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_lse_split_across_programs(splits):
    """Pass 1 split over keys (flash-decoding style) and merged: same LSE, same scores."""
    from maskkv_kernels.select import triton_scores

    q, k, _ = make_inputs(2, 4, 2, 6, 16, 120, 6, torch.float32, seed=2)
    lens = torch.tensor([120, 33])
    first = (120 - lens).int()
    scores, mass = triton_scores.score_keys(
        q, k, first, prompt_len=120, window=False, lse=None, scale=0.3, need_mass=True,
        num_splits=splits,
    )  # fmt: skip
    want, want_mass = ref.mask_scores(q, k, prompt_len=120, prompt_lens=lens, scale=0.3)
    assert_scores_close(scores, want)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)


@needs_triton_cpu
@pytest.mark.parametrize("kernel", ["k_streaming", "key_resident"])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"{str(c[0])[6:]}-G{c[2] // c[3]}")
def test_triton_score_kernels(case, kernel):
    """Both pass-2 kernels, forced whatever "auto" would pick: the K-streaming one (Q resident,
    keys streamed, row tiles summed in order) and the key-resident one give the reference
    scores and mask mass."""
    from maskkv_kernels.select import triton_scores

    dtype, B, Hq, Hkv, M, D, P, R, padded, with_lse = case
    q, k, _ = make_inputs(B, Hq, Hkv, M, D, P, R, dtype, seed=1)
    lens = torch.tensor([P, P // 2][:B]) if padded else None
    lse = natural_lse(q, k, P, lens) if with_lse else None
    first = torch.zeros(B, dtype=torch.int32) if lens is None else (P - lens).int()
    want, want_mass = ref.mask_scores(q, k, prompt_len=P, prompt_lens=lens, lse=lse)
    for need_mass, splits in ((True, None), (False, None), (True, 3)):
        scores, mass = triton_scores.score_keys(
            q, k, first, prompt_len=P, window=False, lse=lse, scale=D**-0.5,
            need_mass=need_mass, kernel=kernel, num_splits=splits,
        )  # fmt: skip
        assert_scores_close(scores, want)
        if need_mass:
            torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)
        else:
            assert mass is None
    raw, _ = triton_scores.score_keys(
        q[:, :, : min(M, 4)], k, first, prompt_len=P, window=True, lse=None, scale=D**-0.5,
        need_mass=False, kernel=kernel,
    )  # fmt: skip
    want_raw, _ = torch_impl_scores(q[:, :, : min(M, 4)], k, first, P)
    assert_scores_close(raw, want_raw)


def torch_impl_scores(q, k, first, P):
    from maskkv_kernels.select import torch_impl

    return torch_impl.score_keys(
        q, k, first, prompt_len=P, window=True, lse=None, scale=q.shape[-1] ** -0.5,
        need_mass=False,
    )  # fmt: skip


@needs_triton_cpu
@pytest.mark.parametrize("chunk", [None, 32])
def test_select_and_gather_with_the_other_kernels(monkeypatch, chunk):
    """The non-default kernels end to end: key-resident score pass (which "auto" does not pick
    at these sizes) and the serial top-k compaction."""
    from maskkv_kernels.select import triton_scores, triton_topk

    monkeypatch.setattr(triton_scores, "SCORE_KERNEL", "key_resident")
    monkeypatch.setattr(triton_topk, "COMPACTION", "serial")
    if chunk is not None:  # several chunks per row
        monkeypatch.setattr(triton_topk, "_chunk_size", lambda *a: chunk)
    q, k, v = make_inputs(2, 4, 2, 6, 16, 90, 6, torch.float32, seed=5)
    lens = torch.tensor([90, 41])
    for head_budget in ("prompt_preference", "adakv"):
        cache, scores = mk.select_and_gather(
            q, k, v, 12, prompt_len=90, prompt_lens=lens, head_budget=head_budget,
            return_scores=True, backend="triton",
        )  # fmt: skip
        want, want_scores = ref.select_and_gather(
            q, k, v, 12, prompt_len=90, prompt_lens=lens, head_budget=head_budget,
            return_scores=True,
        )  # fmt: skip
        assert_scores_close(scores, want_scores)
        assert_no_near_ties(want_scores, want.lengths().cpu(), lens)
        assert_cache_equal(cache, want, k, v)


@pytest.mark.parametrize("window", [False, True])
def test_torch_backend_chunked_two_pass(window):
    """A tiny chunk budget forces the two-pass (LSE, then probabilities) chunked path."""
    from maskkv_kernels.select import torch_impl

    q, k, _ = make_inputs(2, 8, 2, 5, 16, 60, 5, torch.bfloat16, seed=14)
    lens = torch.tensor([60, 23])
    raw, mass = torch_impl.score_keys(
        q, k, (60 - lens).int(), prompt_len=60, window=window, lse=None, scale=0.25,
        need_mass=not window, max_elems=64,
    )  # fmt: skip
    if window:
        got = torch_impl.pool_window(raw, (60 - lens).int(), 5, "max", 7)
        want = ref.window_scores(q, k, prompt_len=60, prompt_lens=lens, scale=0.25)
        assert_scores_close(got, want)
    else:
        want, want_mass = ref.mask_scores(q, k, prompt_len=60, prompt_lens=lens, scale=0.25)
        assert_scores_close(raw, want)
        torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)


@needs_triton_cpu
def test_triton_mass_slots_ignore_stale_autotune_configs():
    """The autotuner runs the score kernel with several BLOCK_N into one partial-mass buffer; the
    config run last must own every slot that any config may have written."""
    from maskkv_kernels.select import triton_scores as ts

    B, Hq, Hkv, M, D, P, R = 1, 2, 2, 3, 16, 40, 70
    q, k, _ = make_inputs(B, Hq, Hkv, M, D, P, R, torch.float32, seed=13)
    lse = natural_lse(q, k, P, None)
    first = torch.zeros(B, dtype=torch.int32)
    scores = torch.empty(B, Hkv, P)
    slot, max_bn = 16, 64
    part = torch.zeros(B * Hkv, -(-R // max_bn) * (max_bn // slot))
    for bn in (16, 64, 32):  # the last one wins, as after autotuning
        grid = (-(-P // bn) + -(-R // bn), B * Hkv)
        ts._score_kernel.fn[grid](
            q, k, first, lse, scores, part, *q.stride(), *k.stride(),
            Hkv, Hq // Hkv, M, P, P + R, part.shape[1], D, D**-0.5 * ts.LOG2E,
            BLOCK_D=16, WINDOW=False, LSE_NATURAL=True, UPCAST=True, IEEE=True, MASS_SLOT=slot,
            BLOCK_M=16, BLOCK_N=bn,
        )  # fmt: skip
    want, want_mass = ref.mask_scores(q, k, prompt_len=P, lse=lse)
    torch.testing.assert_close(part.sum(-1).view(B, Hkv), want_mass, rtol=1e-4, atol=1e-6)
    assert_scores_close(scores, want)


WINDOW_CASES = [
    # dtype, pool, kernel, G, padded
    (torch.float32, "max", 7, 1, False),
    (torch.bfloat16, "avg", 5, 4, True),
    (torch.float16, "none", 7, 7, True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"{c[1]}{c[2]}-G{c[3]}")
def test_window_scores(backend, case):
    dtype, pool, kernel, G, padded = case
    B, Hkv, W, P = 2, 1, 6, 90
    q, k, _ = make_inputs(B, G * Hkv, Hkv, W, 16, P, 4, dtype, seed=3)
    # Row 1 has 3 padding window queries (prompt_lens 3 < W): they must vote for nothing.
    lens = torch.tensor([50, 3]) if padded else None
    got = mk.window_scores(
        q, k, prompt_len=P, prompt_lens=lens, pool=pool, pool_kernel=kernel, backend=backend
    )
    want = ref.window_scores(q, k, prompt_len=P, prompt_lens=lens, pool=pool, pool_kernel=kernel)
    assert_scores_close(got, want)


# ----------------------------------------------------------------------------- full op

SELECT_CASES = [
    # score, head_budget, dtype, B, Hq, Hkv, M, D, P, budget, padded
    ("mask", "uniform", torch.float32, 1, 2, 2, 8, 16, 100, 10, False),
    ("mask", "prompt_preference", torch.bfloat16, 2, 8, 2, 6, 16, 96, 12, True),
    ("mask", "adakv", torch.float16, 2, 7, 1, 4, 16, 80, 9, True),
    ("window", "uniform", torch.bfloat16, 2, 8, 2, 6, 16, 90, 14, True),  # SnapKV
    ("window", "adakv", torch.float32, 1, 4, 4, 5, 64, 64, 11, False),  # AdaKV
    ("window", "uniform", torch.float16, 1, 2, 1, 6, 16, 50, 4, False),  # budget < W
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "case", SELECT_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2])[6:]}-G{c[4] // c[5]}"
)
def test_select_and_gather(backend, case):
    score, head_budget, dtype, B, Hq, Hkv, M, D, P, budget, padded = case
    q, k, v = make_inputs(B, Hq, Hkv, M, D, P, M, dtype, seed=4)
    lens = torch.tensor([P, P - 37][:B]) if padded else None
    kw = dict(prompt_len=P, prompt_lens=lens, score=score, head_budget=head_budget)
    want, want_scores = ref.select_and_gather(q, k, v, budget, return_scores=True, **kw)
    assert_no_near_ties(want_scores, want.lengths(), lens)
    cache, scores = mk.select_and_gather(q, k, v, budget, return_scores=True, backend=backend, **kw)
    assert_scores_close(scores, want_scores)
    assert_cache_equal(cache, want, k, v)
    real = [P] * B if lens is None else lens.tolist()
    assert cache.k.shape[0] == Hkv * sum(min(budget, x) for x in real)
    if head_budget == "uniform":
        assert cache.max_seqlen == want.max_seqlen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_select_with_lse_and_explicit_budgets(backend):
    """Explicit per-head budgets (0, the whole real prompt, in between) and a given lse."""
    B, Hq, Hkv, M, D, P = 2, 4, 2, 5, 16, 72
    q, k, v = make_inputs(B, Hq, Hkv, M, D, P, M, torch.float32, seed=5)
    lens = torch.tensor([72, 40])
    budgets = torch.tensor([[0, 72], [40, 7]], dtype=torch.int32)
    lse = natural_lse(q, k, P, lens)
    kw = dict(prompt_len=P, prompt_lens=lens, lse=lse, return_scores=True)
    want, want_scores = ref.select_and_gather(q, k, v, budgets, **kw)
    assert_no_near_ties(want_scores, budgets, lens)
    cache, scores = mk.select_and_gather(q, k, v, budgets, backend=backend, **kw)
    assert_scores_close(scores, want_scores)
    assert_cache_equal(cache, want, k, v)
    assert cache.lengths().tolist() == budgets.tolist()
    assert cache.max_seqlen == 72


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("budget", [0, 500])
def test_budget_zero_and_beyond_prompt(backend, budget):
    """Budget 0 keeps nothing; a budget >= the prompt keeps every real position."""
    B, Hq, Hkv, M, D, P = 2, 4, 2, 3, 16, 40
    q, k, v = make_inputs(B, Hq, Hkv, M, D, P, M, torch.bfloat16, seed=6)
    lens = torch.tensor([40, 25])
    for head_budget in ("uniform", "adakv"):
        cache = mk.select_and_gather(
            q, k, v, budget, prompt_len=P, prompt_lens=lens, head_budget=head_budget,
            backend=backend,
        )  # fmt: skip
        want = ref.select_and_gather(
            q, k, v, budget, prompt_len=P, prompt_lens=lens, head_budget=head_budget
        )
        assert_cache_equal(cache, want, k, v)
        expect = [[0, 0], [0, 0]] if budget == 0 else [[40, 40], [25, 25]]
        assert cache.lengths().tolist() == expect


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    """k, v as views of a [B, L, Hkv, D] buffer and q of [B, M, Hq, D] (non-contiguous)."""
    B, Hq, Hkv, M, D, P = 1, 4, 2, 4, 16, 64
    q, k, v = make_inputs(B, Hq, Hkv, M, D, P, M, torch.float16, seed=7)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = k.transpose(1, 2).contiguous().transpose(1, 2)
    vs = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ks.is_contiguous()
    want, want_scores = ref.select_and_gather(q, k, v, 8, prompt_len=P, return_scores=True)
    assert_no_near_ties(want_scores, want.lengths())
    cache = mk.select_and_gather(qs, ks, vs, 8, prompt_len=P, backend=backend)
    assert_cache_equal(cache, want, k, v)


# ----------------------------------------------------------------------------- top-k alone


def tricky_scores(B, H, P, seed):
    """Scores with ties, NaN, +-inf, -0.0 / +0.0 and negatives."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (B, H, P), generator=g).float() * 0.5  # many exact ties
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-30, -1e-30])
    idx = torch.randint(0, special.numel(), (B, H, P), generator=g)
    pick = torch.rand(B, H, P, generator=g) < 0.3
    return torch.where(pick, special[idx], s)


TOPK_BACKENDS = CPU_BACKENDS + (["triton-serial", "triton-fused"] if HAS_TRITON_CPU else [])


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("P,chunk", [(37, None), (150, 32)])
def test_topk_gather_nan_ties(backend, P, chunk, monkeypatch):
    """Ties go to the lower position, NaN ranks with -inf (lowest), padding is never kept;
    ``chunk`` splits each row across several programs (the long-prompt path).
    "triton-serial" / "triton-fused": the Triton backend with the serial / one-program-per-row
    compaction (the default is parallel)."""
    if backend.startswith("triton"):
        from maskkv_kernels.select import triton_topk

        if chunk is not None:
            monkeypatch.setattr(triton_topk, "_chunk_size", lambda *a: chunk)
        if backend in ("triton-serial", "triton-fused"):
            monkeypatch.setattr(triton_topk, "COMPACTION", backend.split("-")[1])
            backend = "triton"
    B, H, D = 2, 3, 16
    scores = tricky_scores(B, H, P, seed=P)
    _, k, v = make_inputs(B, H, H, 1, D, P, 2, torch.bfloat16, seed=8)
    lens = torch.tensor([P, P - 11])
    budgets = torch.tensor([[0, 5, P], [P - 11, 1, 17]], dtype=torch.int64)
    got = mk.topk_gather(scores, k, v, budgets, prompt_lens=lens, backend=backend)
    want = ref.topk_gather(scores, k, v, budgets, prompt_lens=lens)
    assert_cache_equal(got, want, k, v)
    assert got.max_seqlen == want.max_seqlen


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    P=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    frac=st.floats(0.0, 1.0),
)
def test_topk_gather_property(backend, P, seed, frac):
    if backend in ("triton-serial", "triton-fused"):
        from maskkv_kernels.select import triton_topk

        saved, triton_topk.COMPACTION = triton_topk.COMPACTION, backend.split("-")[1]
        try:
            return test_topk_gather_property.hypothesis.inner_test("triton", P, seed, frac)
        finally:
            triton_topk.COMPACTION = saved
    scores = tricky_scores(1, 2, P, seed)
    _, k, v = make_inputs(1, 2, 2, 1, 16, P, 0, torch.float32, seed=seed)
    kb = int(frac * P)
    budgets = torch.tensor([[kb, P - kb]])
    got = mk.topk_gather(scores, k, v, budgets, backend=backend)
    assert_cache_equal(got, ref.topk_gather(scores, k, v, budgets), k, v)


@needs_triton_cpu
def test_fused_topk_rows_every_level_and_padding_past_a_tile(monkeypatch):
    """The one-program-per-row compaction: rows that stop after level 1 or 2 (distinct scores),
    never stop early (all equal: ties by position), two values, and left padding longer than a
    tile (BLOCK 16: the first tiles are skipped)."""
    from maskkv_kernels.select import triton_topk

    monkeypatch.setattr(triton_topk, "COMPACTION", "fused")
    P, D = 90, 16
    g = torch.Generator().manual_seed(21)
    scores = torch.stack([
        torch.randn(P, generator=g),  # distinct
        torch.full((P,), 0.25),  # all tied
        torch.randint(0, 2, (P,), generator=g).float() - 0.5,  # two values
        -torch.rand(P, generator=g),  # negative keys
    ]).view(2, 2, P)  # fmt: skip
    _, k, v = make_inputs(2, 2, 2, 1, D, P, 0, torch.bfloat16, seed=22)
    lens = torch.tensor([P, 37])  # row 2 starts at 53, in the fourth 16-key tile
    budgets = torch.tensor([[11, 40], [20, 37]])
    for block in (None, 16):
        if block is not None:
            monkeypatch.setattr(triton_topk, "_row_block", lambda *a, block=block: block)
        got = mk.topk_gather(scores, k, v, budgets, prompt_lens=lens, backend="triton")
        assert_cache_equal(got, ref.topk_gather(scores, k, v, budgets, prompt_lens=lens), k, v)


# ----------------------------------------------------------------------------- API surface


def test_module_matches_function():
    q, k, v = make_inputs(1, 4, 2, 4, 16, 48, 4, torch.float32, seed=9)
    sel = MaskKVSelector(6, head_budget="prompt_preference", backend="torch")
    assert "prompt_preference" in repr(sel)
    a = sel(q, k, v, prompt_len=48)
    b = mk.select_and_gather(
        q, k, v, 6, prompt_len=48, head_budget="prompt_preference", backend="torch"
    )
    assert torch.equal(a.positions, b.positions) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    c = sel(q, k, v, prompt_len=48, budget=3)  # per-call override
    assert c.k.shape[0] == 2 * 3
    with pytest.raises(ValueError, match="head_budget"):
        MaskKVSelector(4, score="window", head_budget="prompt_preference")
    with pytest.raises(ValueError, match="pool_kernel"):
        MaskKVSelector(4, score="window", pool_kernel=4)
    with pytest.raises(ValueError, match="budget"):
        MaskKVSelector(score="mask")(q, k, v, prompt_len=48)


def test_bad_inputs_raise_value_errors():
    q, k, v = make_inputs(1, 4, 2, 4, 16, 32, 4, torch.float32, seed=10)
    sg = mk.select_and_gather
    with pytest.raises(ValueError, match="head_budget"):
        sg(q, k, v, 4, prompt_len=32, score="window", head_budget="prompt_preference")
    with pytest.raises(ValueError, match="W <= prompt_len"):
        sg(q, k, v, 4, prompt_len=3, score="window")
    with pytest.raises(ValueError, match="lse"):
        sg(q, k, v, 4, prompt_len=32, score="window", lse=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="lse"):
        sg(q, k, v, 4, prompt_len=32, lse=torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="budget"):
        sg(q, k, v, -1, prompt_len=32)
    with pytest.raises(ValueError, match=r"budget: .*prompt_lens\[0\]=20"):
        sg(q, k, v, torch.tensor([[3, 21]]), prompt_len=32, prompt_lens=torch.tensor([20]))
    with pytest.raises(ValueError, match="prompt_lens"):
        sg(q, k, v, 4, prompt_len=32, prompt_lens=torch.tensor([33]))
    with pytest.raises(ValueError, match="Hq a multiple"):
        sg(q[:, :3], k, v, 4, prompt_len=32)
    with pytest.raises(ValueError, match="backend"):
        sg(q, k, v, 4, prompt_len=32, backend="cuda")
    with pytest.raises(ValueError, match="alpha"):
        sg(q, k, v, 4, prompt_len=32, head_budget="adakv", alpha=2.0)
    s = torch.zeros(1, 2, 32)
    with pytest.raises(ValueError, match="budgets"):
        mk.topk_gather(s, k, v, torch.tensor([[1, 33]]))
    with pytest.raises(ValueError, match="budgets"):
        mk.topk_gather(s, k, v, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="k: "):
        mk.topk_gather(s, k[:, :, :10], v[:, :, :10], torch.tensor([[1, 3]]))


def test_custom_ops_registered_with_fakes():
    """Schemas and fake implementations agree with the real ones (torch.library.opcheck)."""
    q, k, v = make_inputs(1, 4, 2, 3, 16, 24, 3, torch.float32, seed=11)
    first = torch.zeros(1, dtype=torch.int32)
    ops = torch.ops.maskkv
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.mask_scores, (q, k, first, None, 24, 0.25, "torch"), test_utils=utils)
    torch.library.opcheck(
        ops.window_scores, (q, k, first, 24, "max", 7, 0.25, "torch"), test_utils=utils
    )
    args = (q, k, v, first, None, 5, 24, "mask", "adakv", "max", 7, 0.2, None, 0.25, 10, "torch")
    torch.library.opcheck(ops.select_and_gather, args, test_utils=utils)
    budgets = torch.tensor([[2, 7]], dtype=torch.int32)
    torch.library.opcheck(
        ops.topk_gather, (torch.rand(1, 2, 24), k, v, budgets, first, 9, "torch"), test_utils=utils
    )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """The fused op traces into one graph (fake implementation sizes the outputs)."""
    q, k, v = make_inputs(1, 4, 2, 3, 16, 40, 3, torch.float32, seed=12)
    first = torch.zeros(1, dtype=torch.int32)

    def fn(q, k, v, first):
        return torch.ops.maskkv.select_and_gather(
            q, k, v, first, None, 6, 40, "mask", "prompt_preference", "max", 7, 0.1, None,
            0.25, 12, "torch",
        )  # fmt: skip

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = compiled(q, k, v, first)
    want = fn(q, k, v, first)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- CUDA

LAYERS = {
    # name: (Hq, Hkv) at head dim 128
    "llada": (32, 32),
    "dream": (28, 4),
}


def _gpu_case(name, P, M, dtype=torch.bfloat16, B=1, seed=0):
    Hq, Hkv = LAYERS[name]
    return make_inputs(B, Hq, Hkv, M, 128, P, M, dtype, seed=seed, device="cuda", spread=1.0)


def _check_selection_exact(cache, scores, k, v, budgets, prompt_lens=None):
    """Kept set == the reference top-k of the op's own scores (exact), rows are bit copies."""
    want = ref.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    assert_cache_equal(cache, want, k, v)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_gpu_layer_shapes(name, with_lse):
    P, M, budget = 4096, 256, 256
    q, k, v = _gpu_case(name, P, M)
    lse = natural_lse(q, k, P, None) if with_lse else None
    cache, scores = mk.select_and_gather(
        q, k, v, budget, prompt_len=P, lse=lse, head_budget="prompt_preference",
        return_scores=True, backend="triton",
    )  # fmt: skip
    want, want_mass = ref.mask_scores(q, k, prompt_len=P, lse=lse)
    assert_scores_close(scores, want)
    _check_selection_exact(cache, scores, k, v, cache.lengths())
    budgets = mk.allocate_head_budgets(
        want, budget, "prompt_preference", mask_mass=want_mass
    )  # near-ties in the rounding are possible at this size: allow one unit per head
    assert (cache.lengths().long() - budgets.long()).abs().max() <= 1
    assert cache.k.shape[0] == LAYERS[name][1] * budget


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("G_M", [(1, 1), (4, 33), (7, 300), (8, 64)])
def test_gpu_dtypes_groups_padding(dtype, G_M):
    G, M = G_M
    B, Hkv, D, P = 2, 2, 64, 3000
    q, k, v = make_inputs(B, G * Hkv, Hkv, M, D, P, M, dtype, seed=G, device="cuda")
    lens = torch.tensor([P, 1234])
    for score in ("mask", "window"):
        if score == "window" and M > P:
            continue
        cache, scores = mk.select_and_gather(
            q, k, v, 100, prompt_len=P, prompt_lens=lens, score=score, head_budget="adakv",
            return_scores=True, backend="triton",
        )  # fmt: skip
        fn = ref.mask_scores if score == "mask" else ref.window_scores
        want = fn(q, k, prompt_len=P, prompt_lens=lens.cuda())
        assert_scores_close(scores, want[0] if score == "mask" else want)
        _check_selection_exact(cache, scores, k, v, cache.lengths(), lens)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_gpu_long_prompt_split_rows(name):
    """P = 64k: top-k rows split across programs; large M with G = 7."""
    P, M = 65536, 64
    q, k, v = _gpu_case(name, P, M)
    lse = natural_lse(q, k, P, None)
    scores, _ = mk.mask_scores(q, k, prompt_len=P, lse=lse, backend="triton")
    want, _ = ref.mask_scores(q, k, prompt_len=P, lse=lse)
    assert_scores_close(scores, want)
    Hkv = LAYERS[name][1]
    budgets = torch.full((1, Hkv), 256, dtype=torch.int32, device="cuda")
    cache = mk.topk_gather(scores, k, v, budgets, backend="triton")
    _check_selection_exact(cache, scores, k, v, budgets)


@gpu
@needs_cuda
def test_gpu_large_m_and_dense_rows():
    """M = 4096 with G = 8 (32k query rows per KV head) and a 128k prompt top-k."""
    q, k, v = make_inputs(1, 8, 1, 4096, 128, 2048, 64, torch.bfloat16, device="cuda")
    scores, mass = mk.mask_scores(q, k, prompt_len=2048, backend="triton")
    want, want_mass = ref.mask_scores(q, k, prompt_len=2048)
    assert_scores_close(scores, want)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-3)
    P = 131072
    s = torch.rand(1, 4, P, device="cuda")
    _, k2, v2 = make_inputs(1, 4, 4, 1, 128, P, 0, torch.bfloat16, device="cuda")
    budgets = torch.tensor([[0, 1, 5000, P]], device="cuda")
    cache = mk.topk_gather(s, k2, v2, budgets, backend="triton")
    _check_selection_exact(cache, s, k2, v2, budgets)


@gpu
@needs_cuda
@pytest.mark.parametrize("head_budget", ["uniform", "prompt_preference", "adakv"])
def test_gpu_no_host_sync(head_budget):
    """select_and_gather issues no device-to-host sync (CPU prompt_lens, int budget)."""
    P, M = 8192, 256
    q, k, v = _gpu_case("dream", P, M, B=2)
    lens = torch.tensor([P, 5000])  # on the CPU, as the generation loop passes it
    lse = natural_lse(q, k, P, lens)
    kw = dict(prompt_len=P, prompt_lens=lens, head_budget=head_budget, backend="triton")
    window = head_budget != "prompt_preference"

    def run_all():
        for with_lse in (False, True):
            cache = mk.select_and_gather(q, k, v, 256, lse=lse if with_lse else None, **kw)
        if window:
            mk.select_and_gather(q, k, v, 256, score="window", **kw)
        return cache

    run_all()  # warm-up: compilation and autotuning synchronise, steady state must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache = run_all()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.k.shape[0] == 4 * (256 + 256)


@gpu
@needs_cuda
@pytest.mark.parametrize("head_budget", ["adakv", "uniform"])
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_cuda_graph_capture(head_budget, padded):
    # A CPU prompt_lens (as the generation loop passes it) must be capturable: no pageable H2D
    # copy inside the graph.
    P, M = 4096, 128
    q, k, v = _gpu_case("dream", P, M, B=2)
    lens = torch.tensor([P, P - 700]) if padded else None

    def step():
        c = mk.select_and_gather(
            q, k, v, 64, prompt_len=P, prompt_lens=lens, head_budget=head_budget, backend="triton"
        )
        return c.k, c.v, c.cu_seqlens, c.positions

    eager = step()  # warm-up (compile, autotune) outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_public_select_and_gather_compiles_fullgraph():
    """The public function (host checks, budgets, RaggedKV packing) traces into one graph on the
    torch backend for every head-budget mode, with and without prompt_lens (new values, equal or
    not, need no recompile), also when prompt_lens is built inside the compiled function; it
    equals eager, and a bad prompt_lens still raises the eager ValueError from inside the graph."""
    P = 33
    q, k, v = make_inputs(2, 6, 3, 5, 32, P, 4, torch.float32, seed=13)

    def run(q, k, v, prompt_lens):
        out = []
        for head_budget in ("uniform", "prompt_preference", "adakv"):
            cache, scores = mk.select_and_gather(
                q, k, v, 6, prompt_len=P, prompt_lens=prompt_lens, head_budget=head_budget,
                backend="torch", return_scores=True,
            )  # fmt: skip
            out += [cache.k, cache.v, cache.cu_seqlens, cache.positions, scores]
        return out

    def check(got, want):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b)

    compiled = torch.compile(run, fullgraph=True, backend="inductor")
    for prompt_lens in [None, torch.tensor([30, 26]), torch.tensor([26, 26]), torch.tensor([4, P])]:
        check(compiled(q, k, v, prompt_lens), run(q, k, v, prompt_lens))
    with pytest.raises(ValueError, match=r"prompt_lens: expected values in \[0, prompt_len=33\]"):
        compiled(q, k, v, torch.tensor([4, 34]))

    def inner(q, k, v):  # uniform budgets from a prompt_lens made inside the graph
        cache = mk.select_and_gather(
            q, k, v, 6, prompt_len=P, prompt_lens=torch.tensor([30, 26]), backend="torch"
        )
        return cache.k, cache.cu_seqlens, cache.positions

    check(torch.compile(inner, fullgraph=True, backend="inductor")(q, k, v), inner(q, k, v))
