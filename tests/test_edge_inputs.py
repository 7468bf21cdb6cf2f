"""Edge inputs on every backend: non-finite keys, and empty tensors with odd strides.

Each case here once broke a promise of the README on one backend:

- window mode (SnapKV family) keeps its W window positions whatever the other keys hold: a NaN or
  +-inf inside a real prompt key must not make the fused path drop them, however wide the
  pooling spreads the key's score;
- a scoring row whose softmax is undefined (a NaN or +inf logit) carries no mass, on every
  backend as in the reference, so window-mode scores outside the window stay finite;
- a valid empty input (an empty prompt, a cache with only empty segments) returns the empty
  result on every backend, whatever the strides of its zero-element tensors.

The hypothesis properties over the same inputs live in ``test_fuzz.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import test_select_and_gather as sg
import torch

import maskkv_kernels as mk
from maskkv_kernels import _cpp
from maskkv_kernels import reference as ref
from maskkv_kernels._dispatch import interpreting, triton_available

needs_cpp = pytest.mark.skipif(
    _cpp._find_compiler() is None, reason="no C++ compiler: the 'cpp' backend cannot be built"
)
needs_triton = pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="Triton on CPU needs TRITON_INTERPRET=1"
)
BACKENDS = [
    "torch",
    "reference",
    pytest.param("cpp", marks=needs_cpp),
    pytest.param("triton", marks=needs_triton),
]
SPECIALS = [math.nan, math.inf, -math.inf]


def _kept(cache: mk.RaggedKV) -> list[list[int]]:
    cu, pos = cache.cu_seqlens.tolist(), cache.positions.tolist()
    return [pos[cu[s] : cu[s + 1]] for s in range(len(cu) - 1)]


def _stride2_last(shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """A view of ``shape`` whose last dim has stride 2 (every other column of a wider buffer)."""
    wide = torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)
    view = wide[..., ::2]
    assert view.shape == shape and (view.shape[-1] <= 1 or view.stride(-1) == 2)
    return view


# ----------------------------------------------------------------------------- non-finite keys


@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_window_kept_with_nonfinite_prompt_key(backend, special):
    """The reported case: fp16, 7 window queries, pooling 101 wide over 82 positions, one
    non-finite component in a prompt key of KV head 1 in two batch rows. Every segment keeps
    positions 82-88, and the kept rows are the ranking rule applied to the backend's scores."""
    B, H, M, D, P, R = 3, 2, 7, 48, 89, 4
    q, k, v = sg.make_inputs(B, H, H, M, D, P, R, torch.float16, seed=27, spread=1.0)
    k[0, 1, 69, 5] = special
    k[2, 1, 80, 11] = special
    kw = dict(prompt_len=P, score="window", pool_kernel=101, scale=1.5875, return_scores=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy on inf - inf (interpreter)
        cache, scores = mk.select_and_gather(q, k, v, 23, backend=backend, **kw)
        _, want_scores = ref.select_and_gather(q, k, v, 23, **kw)
    for s, pos in enumerate(_kept(cache)):
        assert set(range(P - M, P)) <= set(pos), f"segment {s} dropped window positions"
    assert torch.isfinite(scores[..., : P - M]).all(), "non-window scores must stay finite"
    sg.assert_scores_close(scores, want_scores)
    assert torch.equal(torch.isnan(scores), torch.isnan(want_scores))
    want = ref.topk_gather(scores, k, v, cache.lengths())
    sg.assert_cache_equal(cache, want, k, v)


@pytest.mark.parametrize("with_lse", [False, True], ids=["lse", "given-lse"])
@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_scores_with_nonfinite_keys(backend, special, with_lse):
    """Mask mode: a non-finite prompt key and a non-finite response key. Scores, mask mass
    (NaN and inf positions included) and the prompt-preference selection equal the reference."""
    B, Hq, Hkv, M, D, P, R = 2, 4, 2, 3, 16, 40, 3
    q, k, v = sg.make_inputs(B, Hq, Hkv, M, D, P, R, torch.float32, seed=28)
    k[0, 0, 17, 3] = special
    k[1, 1, P + 1, 0] = special
    lens = torch.tensor([P, 31])
    lse = None
    if with_lse:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lse = sg.natural_lse(q, k, P, lens)
    kw = dict(prompt_len=P, prompt_lens=lens, lse=lse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scores, mass = mk.mask_scores(q, k, backend=backend, **kw)
        want, want_mass = ref.mask_scores(q, k, **kw)
        cache, sel_scores = mk.select_and_gather(
            q, k, v, 6, head_budget="prompt_preference", return_scores=True, backend=backend, **kw
        )
    assert torch.equal(torch.isnan(scores), torch.isnan(want))
    sg.assert_scores_close(scores, want)
    assert torch.equal(torch.isnan(mass), torch.isnan(want_mass))
    fin = torch.isfinite(want_mass)
    torch.testing.assert_close(mass[fin], want_mass[fin], rtol=1e-4, atol=1e-5)
    assert torch.equal(sel_scores.isnan(), scores.isnan())
    want_cache = ref.topk_gather(sel_scores, k, v, cache.lengths(), prompt_lens=lens)
    sg.assert_cache_equal(cache, want_cache, k, v)


# ----------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("R", [0, 4], ids=["no-response", "response"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_select_empty_prompt_strided(backend, R):
    """P = 0 with k / v whose last dim has stride 2: the empty cache and [B, Hkv, 0] scores."""
    B, Hq, Hkv, M, D = 2, 4, 2, 3, 8
    q = torch.randn(B, Hq, M, D)
    k, v = _stride2_last((B, Hkv, R, D)), _stride2_last((B, Hkv, R, D))
    for head_budget in ("uniform", "prompt_preference", "adakv"):
        cache, scores = mk.select_and_gather(
            q, k, v, 4, prompt_len=0, head_budget=head_budget, return_scores=True, backend=backend
        )
        assert cache.k.shape == (0, D) and cache.v.shape == (0, D)
        assert cache.cu_seqlens.tolist() == [0] * (B * Hkv + 1)
        assert scores.shape == (B, Hkv, 0)
    scores, mass = mk.mask_scores(q, k, prompt_len=0, backend=backend)
    _, want_mass = ref.mask_scores(q, k, prompt_len=0)
    assert scores.shape == (B, Hkv, 0)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("Lt", [0, 3], ids=["no-tail", "tail"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_attention_all_segments_empty_strided(backend, Lt):
    """A cache whose segments are all empty, k / v (and empty tails) with a last-dim stride of 2:
    attention over the tail only (or 0 with LSE -inf), as the reference."""
    B, Hkv, G, Lq, D = 2, 2, 2, 3, 8
    q = torch.randn(B, Hkv * G, Lq, D)
    cache = mk.RaggedKV(
        _stride2_last((0, D)),
        _stride2_last((0, D)),
        torch.zeros(B * Hkv + 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        0,
        Hkv,
    )
    kt, vt = _stride2_last((B, Hkv, Lt, D)), _stride2_last((B, Hkv, Lt, D))
    out, lse = mk.ragged_attention(q, cache, kt, vt, return_lse=True, backend=backend)
    want, want_lse = ref.ragged_attention(q, cache, kt, vt, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    if Lt == 0:
        assert (out == 0).all() and (lse == -math.inf).all()


@needs_cpp
def test_cpp_ops_accept_empty_tensors_with_any_strides():
    """Direct torch.ops.maskkv_cpp calls: a zero-element k / v has no element to read, so its
    strides are no error (a non-empty one with a strided last dim still is)."""
    _cpp.load()
    ops = torch.ops.maskkv_cpp
    q = torch.randn(1, 2, 3, 4)
    k = _stride2_last((1, 1, 0, 4))
    first = torch.zeros(1, dtype=torch.int32)
    scores, mass = ops.score_keys(q, k, first, None, 0, False, 0.5, True)
    assert scores.shape == (1, 1, 0) and mass.tolist() == [[0.0]]
    budgets = torch.zeros(1, 1, dtype=torch.int32)
    k_out, v_out, pos = ops.topk_gather(scores, k, k, budgets, first, torch.zeros(2).int(), 0)
    assert k_out.shape == (0, 4) and pos.shape == (0,)
    kv = _stride2_last((0, 4))
    out, lse = ops.ragged_attention(q, kv, kv, torch.zeros(2).int(), 1, None, None, 0.5, True)
    assert (out == 0).all() and (lse == -math.inf).all()
    with pytest.raises(RuntimeError, match="k: expected the last"):
        ops.score_keys(q, _stride2_last((1, 1, 5, 4)), first, None, 5, False, 0.5, True)
