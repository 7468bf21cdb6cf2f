"""Eviction methods: layer schedules against hand-computed tables, exact totals, head allocators
through the methods, the registry, profiles and parameter validation.

The expected tables were computed by hand / with independent Decimal arithmetic from the formulas
in DESIGN.md "Layer budgets" (not with this package), then hard-coded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskkv_kernels as mk
from maskkv import methods
from maskkv.methods import (
    PROFILE_FILENAME,
    AdaKV,
    FullCache,
    LayerProfile,
    MaskKV,
    MissingProfileWarning,
    NoCache,
    PyramidKV,
    SnapKV,
    SqueezeAttention,
)
from maskkv.methods.profile import _reset_missing_profile_warnings
from maskkv.methods.squeeze import kmeans_1d

EVICTING = [MaskKV, SnapKV, PyramidKV, SqueezeAttention, AdaKV]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _reset_missing_profile_warnings()
    yield
    _reset_missing_profile_warnings()


# ----------------------------------------------------------------------------- PyramidKV

# 32 layers, B=256, W=32, beta=20, P=4096: min = 224/20 = 11.2, max = 448 - 11.2 = 436.8 < P-W;
# k_l = 32 + round(436.8 - l * 425.6/31).
PYRAMID_32_256_P4096 = [
    469, 455, 441, 428, 414, 400, 386, 373, 359, 345, 332, 318, 304, 290, 277, 263,
    249, 235, 222, 208, 194, 180, 167, 153, 139, 126, 112, 98, 84, 71, 57, 43,
]  # fmt: skip
# P=300: max = 436.8 >= P-W = 268, so max = 268, min = 448 - 268 = 180;
# k_l = 32 + round(268 - l * 88/31): layer 0 keeps the whole prompt.
PYRAMID_32_256_P300 = [
    300, 297, 294, 291, 289, 286, 283, 280, 277, 274, 272, 269, 266, 263, 260, 257,
    255, 252, 249, 246, 243, 240, 238, 235, 232, 229, 226, 223, 221, 218, 215, 212,
]  # fmt: skip


def test_pyramid_tables():
    m = PyramidKV(budget=256)
    assert m.layer_budgets(32, 4096) == PYRAMID_32_256_P4096
    assert m.layer_budgets(32, 300) == PYRAMID_32_256_P300
    assert sum(PYRAMID_32_256_P4096) == sum(PYRAMID_32_256_P300) == 256 * 32


def test_pyramid_small_cases():
    # 4 layers, B=64, W=32: min = 1.6, max = 62.4, step 20.27: 32 + [62, 42, 22, 2].
    assert PyramidKV(budget=64).layer_budgets(4, 1000) == [94, 74, 54, 34]
    # B=20 shrinks the window to 10 (B // 2); beta=4: min=2.5, max=17.5, both exact halves.
    # Round-half-even gives 18 + 2 (half-up would give 18 + 3 and break the total).
    assert PyramidKV(budget=20, beta=4).layer_budgets(2, 1000) == [28, 12]
    assert PyramidKV(budget=256).layer_budgets(1, 4096) == [256]
    # P <= B keeps everything.
    assert PyramidKV(budget=256).layer_budgets(8, 256) == [256] * 8
    assert PyramidKV(budget=256).layer_budgets(8, 100) == [100] * 8


def test_pyramid_window_size_is_the_schedule_window():
    m = PyramidKV(budget=256)
    assert m.effective_window == 32
    assert m.window_size(43) == 32  # top layer: 32 window + 11 selected, as KVCache-Factory
    assert PyramidKV(budget=32).window_size(40) == 16
    assert PyramidKV(budget=256).window_size(10) == 10


# ----------------------------------------------------------------------------- MaskKV


def test_maskkv_boundary_middle_split_and_rounding():
    # 7 layers, boundary = {0, 1, 5, 6}, middle = {2, 3, 4}; both groups sum to I = 1.
    # B=10: base floor(0.4*10)=4, T=70, R=70-28=42, 21 per group: boundary 4+5.25, middle 4+7.
    # Largest remainder: 4 x 0.25 -> one extra unit, to the lowest index (layer 0).
    prof = LayerProfile([0.5, 0.125, 0.25, 0.5, 0.25, 0.25, 0.125])
    assert MaskKV(budget=10).layer_budgets(7, 1000, prof) == [10, 9, 11, 11, 11, 9, 9]


def test_maskkv_32_layers():
    # B=256: base 102, T=8192, R=4928; boundary I sum 1, middle I sum 3 (uneven inside the group,
    # which must not matter): boundary 102 + 1232/4 = 410, middle 102 + 3696/28 = 234.
    middle = [0.125, 0.0] * 12 + [0.375] * 4  # 28 layers, sum 3
    prof = LayerProfile([0.25, 0.25, *middle, 0.25, 0.25])
    out = MaskKV(budget=256).layer_budgets(32, 4096, prof)
    assert out == [410, 410] + [234] * 28 + [410, 410]
    assert sum(out) == 256 * 32


def test_maskkv_clamp_water_fills():
    # 6 layers, boundary {0, 5}; all importance in the boundary: base 40, R=360 -> 220 each,
    # above P=150: pinned at 150, the 140 excess shared by the middle layers (40 + 35).
    prof = LayerProfile([3.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    m = MaskKV(budget=100, boundary_first=1, boundary_last=1)
    assert m.layer_budgets(6, 150, prof) == [150, 75, 75, 75, 75, 150]


def test_maskkv_special_profiles():
    # beta=0: everything by importance.
    m = MaskKV(budget=10, beta=0.0, boundary_first=1, boundary_last=1)
    assert m.layer_budgets(4, 1000, [1.0, 0.0, 0.0, 1.0]) == [20, 0, 0, 20]
    # All-zero importance: by group size, i.e. uniform.
    assert MaskKV(budget=10).layer_budgets(8, 1000, [0.0] * 8) == [10] * 8
    # No middle group: every layer is boundary, evenly.
    assert MaskKV(budget=10).layer_budgets(4, 1000, [5.0, 0.0, 0.0, 0.0]) == [10] * 4
    # beta=1: no remainder to share.
    assert MaskKV(budget=10, beta=1.0).layer_budgets(7, 1000, [1.0] * 7) == [10] * 7
    # Uniform-layers ablation needs no profile and ignores one.
    assert (
        MaskKV(budget=10, uniform_layers=True).layer_budgets(7, 1000, [9.0] + [0.0] * 6) == [10] * 7
    )
    # floor(0.29 * 100) is 29 (exact decimal), not 28 (binary float).
    m = MaskKV(budget=100, beta=0.29, boundary_first=1, boundary_last=0)
    assert m.layer_budgets(2, 1000, [1.0, 0.0]) == [171, 29]


def test_maskkv_without_profile_warns_once_and_is_uniform():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert MaskKV(budget=8).layer_budgets(4, 100) == [8] * 4
        assert MaskKV(budget=16).layer_budgets(4, 100) == [16] * 4
        assert MaskKV(budget=8, uniform_layers=True).layer_budgets(4, 100) == [8] * 4
        assert SqueezeAttention(budget=8).layer_budgets(4, 100) == [8] * 4
        assert SqueezeAttention(budget=8).layer_budgets(4, 100) == [8] * 4
    got = [str(w.message).split(":")[0] for w in rec if w.category is MissingProfileWarning]
    assert got == ["maskkv", "squeezeattention"]
    assert rec[0].filename == __file__  # points at the caller, not at the package


# ----------------------------------------------------------------------------- SqueezeAttention

SQUEEZE_PROFILE = [0.9, 0.05, 0.06, 0.3, 0.32, 0.04, 0.31, 0.8]


def test_kmeans_1d_on_crafted_profile():
    # Init at sorted[0], sorted[3], sorted[7] = 0.04, 0.3, 0.9; 0.8 is nearer 0.9 than 0.3.
    labels, centroids = kmeans_1d(SQUEEZE_PROFILE, 3)
    assert labels == [2, 0, 0, 1, 1, 0, 1, 2]
    assert centroids == pytest.approx([0.05, 0.31, 0.85])


def test_squeeze_tables():
    # Least important cluster {1, 2, 5} keeps floor(0.4 B); the rest share the freed budget.
    # B=100: 40 each; freed 3*60=180 over 5 layers = 36 -> 136.
    m = SqueezeAttention(budget=100)
    assert m.layer_budgets(8, 4096, SQUEEZE_PROFILE) == [136, 40, 40, 136, 136, 40, 136, 136]
    # B=101: floor(40.4)=40, freed 3*61=183 -> 101 + 36.6 = 137.6; 3 spare units to the lowest
    # indices among equal remainders (layers 0, 3, 4).
    m = SqueezeAttention(budget=101)
    assert m.layer_budgets(8, 4096, SQUEEZE_PROFILE) == [138, 40, 40, 138, 138, 40, 137, 137]


def test_squeeze_degenerate_and_clamped():
    m = SqueezeAttention(budget=100)
    assert m.layer_budgets(8, 4096, [0.2] * 8) == [100] * 8  # one cluster: uniform
    two = [0.1] * 6 + [0.5] * 2  # init 0.1, 0.1, 0.5: ties go to the lower cluster
    assert m.layer_budgets(8, 4096, two) == [40] * 6 + [280] * 2
    # P=200: the two boosted layers are pinned at 200; their 160 excess goes back to the six
    # squeezed layers (40 + 26.67), spare units to the lowest indices.
    assert m.layer_budgets(8, 200, two) == [67, 67, 67, 67, 66, 66, 200, 200]
    assert SqueezeAttention(budget=100, clusters=1).layer_budgets(8, 4096, two) == [100] * 8


# ----------------------------------------------------------------------------- uniform ones


def test_uniform_and_reference_methods():
    for cls in (SnapKV, AdaKV):
        assert cls(budget=64).layer_budgets(5, 1000) == [64] * 5
        assert cls(budget=64).layer_budgets(5, 50) == [50] * 5
    for cls in (FullCache, NoCache):
        assert cls().layer_budgets(3, 777) == [777] * 3
        assert cls(budget=4).layer_budgets(3, 777) == [777] * 3
        assert not cls().evicts and cls().window_size(100) == 0
        assert cls().selector_kwargs() == {}
    assert FullCache().caches_prompt and not NoCache().caches_prompt
    assert all(cls().evicts and cls().caches_prompt for cls in EVICTING)
    assert MaskKV(budget=0).layer_budgets(4, 10, [1.0] * 4) == [0] * 4
    assert SnapKV(budget=0).layer_budgets(4, 100) == [0] * 4


def test_window_size_and_selector_kwargs():
    assert SnapKV().window_size(256) == 32
    assert SnapKV().window_size(40) == 20
    assert SqueezeAttention(budget=64).window_size(25) == 12
    assert MaskKV().window_size(256) == 0
    assert SnapKV(pool="avg", pool_kernel=5).selector_kwargs() == {
        "score": "window", "head_budget": "uniform", "alpha": None, "pool": "avg",
        "pool_kernel": 5,
    }  # fmt: skip
    assert AdaKV(safeguard=0.3).selector_kwargs()["alpha"] == 0.3
    assert AdaKV().selector_kwargs()["head_budget"] == "adakv"
    assert MaskKV(alpha=0.25).selector_kwargs() == {
        "score": "mask", "head_budget": "prompt_preference", "alpha": 0.25,
    }  # fmt: skip


@pytest.mark.parametrize("cls", EVICTING)
def test_selector_kwargs_drive_select_and_gather(cls):
    # The generation loop splats selector_kwargs into select_and_gather; the per-head lengths
    # must follow the method's head allocator.
    torch.manual_seed(0)
    B, Hq, Hkv, P, R, D, k_l = 1, 4, 2, 40, 6, 8, 10
    m = cls(budget=k_l)
    k = torch.randn(B, Hkv, P + R, D)
    v = torch.randn(B, Hkv, P + R, D)
    M = R if m.score == "mask" else m.window_size(k_l)
    q = torch.randn(B, Hq, M, D)
    cache, scores = mk.reference.select_and_gather(
        q, k, v, k_l, prompt_len=P, return_scores=True, **m.selector_kwargs()
    )
    lens = cache.cu_seqlens.diff()
    assert int(lens.sum()) == Hkv * k_l
    if m.head_budget != "prompt_preference":  # needs the mask mass, checked below
        assert lens.tolist() == m.allocate_head_budgets(scores, k_l).flatten().tolist()


# ----------------------------------------------------------------------------- head allocators


@pytest.mark.parametrize("cls", EVICTING)
@pytest.mark.parametrize("with_lens", [False, True])
def test_head_allocators_match_reference(cls, with_lens):
    g = torch.Generator().manual_seed(1 + with_lens)
    B, Hkv, P = 3, 4, 48
    scores = torch.rand(B, Hkv, P, generator=g) ** 4
    mask_mass = torch.rand(B, Hkv, generator=g) * 5
    lens = torch.tensor([48, 20, 7]) if with_lens else None
    if lens is not None:  # padding positions carry no score
        scores = scores.masked_fill(torch.arange(P)[None, None] < (P - lens)[:, None, None], 0.0)
    params = {"alpha": 0.3} if cls is MaskKV else {"safeguard": 0.25} if cls is AdaKV else {}
    m = cls(budget=16, **params)
    for k_l in (0, 1, 9, 16, 30):
        got = m.allocate_head_budgets(scores, k_l, mask_mass=mask_mass, prompt_lens=lens)
        want = mk.reference.allocate_head_budgets(
            scores, k_l, m.head_budget, mask_mass=mask_mass, alpha=m.head_alpha, prompt_lens=lens
        )
        assert got.dtype == torch.int32
        assert torch.equal(got, want), (k_l, got, want)
        cap = torch.full((B,), P) if lens is None else lens
        assert torch.equal(got.sum(1), Hkv * cap.clamp_max(k_l).int())


def test_head_allocator_modes_and_alphas():
    assert (MaskKV.head_budget, SnapKV.head_budget, PyramidKV.head_budget) == (
        "prompt_preference", "uniform", "uniform",
    )  # fmt: skip
    assert (SqueezeAttention.head_budget, AdaKV.head_budget) == ("uniform", "adakv")
    assert MaskKV().head_alpha == 0.1 and AdaKV().head_alpha == 0.2
    assert SnapKV().head_alpha is None


# ----------------------------------------------------------------------------- properties

profiles = st.lists(st.floats(0.0, 2.0), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.sampled_from(EVICTING),
    profiles,
    st.integers(0, 3000),
    st.integers(0, 600),
    st.integers(1, 64),
)
def test_schedules_exact_and_clamped(cls, imp, P, B, window):
    L = len(imp)
    params = {} if cls is MaskKV else {"window": window}
    m = cls(budget=B, **params)
    if cls is not MaskKV and P > B and window >= P:
        with pytest.raises(ValueError, match="^window: "):
            m.layer_budgets(L, P, imp)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingProfileWarning)
        out = m.layer_budgets(L, P, imp)
    assert len(out) == L and all(type(k) is int and 0 <= k <= P for k in out)
    if P <= B:
        assert out == [P] * L
    else:
        assert sum(out) == B * L


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    profiles,
    st.integers(0, 40),
    st.integers(0, 40),
    st.floats(0.0, 1.0),
    st.integers(1, 500),
)
def test_maskkv_boundary_params_exact(imp, first, last, beta, B):
    L, P = len(imp), 4 * B + 1
    m = MaskKV(budget=B, beta=beta, boundary_first=first, boundary_last=last)
    out = m.layer_budgets(L, P, imp)
    assert sum(out) == B * L and all(0 <= k <= P for k in out)
    boundary = [i < first or i >= L - last for i in range(L)]
    if 0 < sum(boundary) < L:  # evenly within a group: at most 1 apart
        for group in (True, False):
            ks = [k for k, b in zip(out, boundary) if b == group]
            assert max(ks) - min(ks) <= 1
            assert min(ks) >= int(beta * B) - 1  # every layer keeps ~floor(beta * B)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_aliases():
    assert methods.available() == [
        "maskkv", "snapkv", "pyramidkv", "squeezeattention", "adakv", "tailvote", "fullcache",
        "nocache",
    ]  # fmt: skip
    for name, cls in {
        "MaskKV": MaskKV, "snapkv": SnapKV, "Pyramid": PyramidKV, "squeeze": SqueezeAttention,
        "Squeeze-Attention": SqueezeAttention, "ADAKV": AdaKV, "full": FullCache,
        "full_cache": FullCache, "vanilla": NoCache, "NoCache": NoCache,
    }.items():  # fmt: skip
        assert type(methods.get(name)) is cls
    m = methods.get("maskkv", budget=128, alpha=0.2)
    assert m == MaskKV(budget=128, alpha=0.2)
    assert methods.get(m) is m
    assert methods.get(m, budget=64) == MaskKV(budget=64, alpha=0.2)
    assert methods.get("full", budget=256).budget == 256  # a sweep may pass one budget to all
    for cls in EVICTING + [FullCache, NoCache]:
        assert type(methods.get(cls.name)) is cls


def test_repr_shows_every_parameter_and_frozen():
    r = repr(methods.get("maskkv", budget=64))
    assert r == (
        "MaskKV(budget=64, alpha=0.1, beta=0.4, boundary_first=2, boundary_last=2, "
        "uniform_layers=False)"
    )
    assert (
        repr(PyramidKV()) == "PyramidKV(budget=256, window=32, pool='max', pool_kernel=7, beta=20)"
    )
    assert repr(SqueezeAttention()) == (
        "SqueezeAttention(budget=256, window=32, pool='max', pool_kernel=7, clusters=3, "
        "squeeze_fraction=0.4)"
    )
    assert repr(AdaKV()).endswith("safeguard=0.2)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskKV().budget = 3  # type: ignore[misc]
    assert MaskKV(alpha=1).alpha == 1.0 and isinstance(MaskKV(alpha=1).alpha, float)
    assert MaskKV().params()["name"] == "maskkv"
    assert hash(MaskKV()) == hash(MaskKV())


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build, param",
    [
        (lambda: MaskKV(budget=-1), "budget"),
        (lambda: SnapKV(budget=2.5), "budget"),
        (lambda: AdaKV(budget=True), "budget"),
        (lambda: FullCache(budget=-3), "budget"),
        (lambda: MaskKV(alpha=1.5), "alpha"),
        (lambda: MaskKV(alpha=-0.1), "alpha"),
        (lambda: MaskKV(alpha=float("nan")), "alpha"),
        (lambda: MaskKV(beta=1.01), "beta"),
        (lambda: MaskKV(boundary_first=-1), "boundary_first"),
        (lambda: MaskKV(boundary_last=1.0), "boundary_last"),
        (lambda: MaskKV(uniform_layers=1), "uniform_layers"),
        (lambda: SnapKV(window=0), "window"),
        (lambda: SnapKV(pool="min"), "pool"),
        (lambda: SnapKV(pool_kernel=4), "pool_kernel"),
        (lambda: SnapKV(pool_kernel=0), "pool_kernel"),
        (lambda: PyramidKV(beta=0.5), "beta"),
        (lambda: SqueezeAttention(clusters=0), "clusters"),
        (lambda: SqueezeAttention(squeeze_fraction=1.2), "squeeze_fraction"),
        (lambda: AdaKV(safeguard=-0.5), "safeguard"),
        (lambda: methods.get("h2o"), "name"),
        (lambda: methods.get(3), "name"),
        (lambda: methods.get("snapkv", alpha=0.1), "alpha"),
        (lambda: SnapKV(budget=16, window=64).layer_budgets(4, 64), "window"),
        (lambda: PyramidKV(budget=16, window=100).layer_budgets(4, 80), "window"),
        (lambda: SnapKV().layer_budgets(0, 100), "num_layers"),
        (lambda: SnapKV().layer_budgets(4, -1), "prompt_len"),
        (lambda: MaskKV().layer_budgets(4, 4096, [0.1] * 5), "profile"),
        (lambda: SnapKV().layer_budgets(4, 4096, LayerProfile([0.1] * 3)), "profile"),
        (lambda: MaskKV().layer_budgets(4, 4096, "abcd"), "profile"),
        (lambda: SnapKV().window_size(-1), "layer_budget"),
    ],
)
def test_bad_parameters_name_themselves(build, param):
    with pytest.raises(ValueError, match=rf"^{param}: "):
        build()


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^alpha: expected a float in \[0, 1\], got 1\.5$"):
        MaskKV(alpha=1.5)


def test_window_not_checked_when_nothing_is_evicted():
    # P <= B keeps the whole prompt, so a window longer than the prompt is harmless.
    assert SnapKV(budget=256, window=512).layer_budgets(2, 100) == [100, 100]
    # A big window with a small budget shrinks (W = min(window, k // 2)) instead of failing.
    assert SnapKV(budget=16, window=64).layer_budgets(2, 100) == [16, 16]
    assert SnapKV(budget=16, window=64).window_size(16) == 8


# ----------------------------------------------------------------------------- profiles


def test_profile_roundtrip_and_find(tmp_path):
    prof = LayerProfile.from_cosines([0.75, 0.5, 1.0], model_type="llada", num_prompts=8)
    assert prof.importance == [0.25, 0.5, 0.0] and prof.num_layers == 3
    path = prof.save(tmp_path)  # a directory: the standard file name inside it
    assert path == tmp_path / PROFILE_FILENAME
    assert LayerProfile.load(path) == prof
    assert LayerProfile.find(tmp_path) == prof
    assert LayerProfile.find(tmp_path / "nope") is None
    assert LayerProfile.find("GSAI-ML/LLaDA-8B-Instruct") is None
    other = tmp_path / "p.json"
    assert prof.save(other) == other and LayerProfile.load(other) == prof
    data = json.loads(other.read_text())
    assert data["num_layers"] == 3 and data["model_type"] == "llada"


@pytest.mark.parametrize(
    "payload, param",
    [
        ('{"importance": [0.1, NaN]}', "importance"),
        ('{"importance": []}', "importance"),
        ('{"importance": "0.1"}', "importance"),
        ('{"importance": [0.1, true]}', "importance"),
        ('{"importance": [0.1, 0.2], "num_layers": 3}', "profile"),
        ('{"model_type": "llada"}', "profile"),
        ('{"importance": [0.1], "format": "other"}', "profile"),
        ("[0.1, 0.2]", "profile"),
        ("{not json", "profile"),
        ('{"importance": [0.1], "num_prompts": -1}', "num_prompts"),
    ],
)
def test_profile_load_validates(tmp_path, payload, param):
    f = tmp_path / PROFILE_FILENAME
    f.write_text(payload)
    with pytest.raises(ValueError, match=rf"^{param}: "):
        LayerProfile.load(f)
