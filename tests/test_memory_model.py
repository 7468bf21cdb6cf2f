"""Step 1's memory: the model (``maskkv.bench.memory.step1_memory``) against the peak measured on
the CPU (profiler allocation events), the probe the longest-prompt search runs against the full
pass, and the chunked pass against the unchunked one.

The claim these back: with an eviction method the longest prompt is bound by one layer's
activations, not by the prompt KV of every layer (FullCache's bound)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from maskkv import bench, methods
from maskkv.bench.memory import measure_peak, predict_max_prompt, probe, step1_memory
from maskkv.generation.engine import Denoiser

R = 32  # response tokens


def _model(kind="llada", layers=2, kv_heads=4):
    p = dataclasses.replace(bench.PRESETS["tiny"], kind=kind, layers=layers, hidden=128, heads=4,
                            kv_heads=kv_heads, ffn=256)  # fmt: skip
    return bench.build_model(p, dtype="bfloat16")


def _step1(model, method, P, chunk=64, probe_layers=None):
    """Measured peak of step 1 (bytes above what was allocated before)."""
    x = torch.cat([bench.random_prompt(model, P, seed=2),
                   torch.full((1, R), model.config.mask_token_id)], 1)  # fmt: skip
    need = torch.ones(1, R, dtype=torch.bool)
    den = Denoiser(model, method, P, token_chunk=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no layer profile: uniform budgets, as predicted
        if probe_layers is None:
            return measure_peak(lambda: den(x, need), "cpu")[1]
        with probe(model, method, P, layers=probe_layers) as held:
            return measure_peak(lambda: den(x, need), "cpu")[1] + held


def test_measure_peak_counts_what_lives_at_once():
    def work():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(3 << 20, dtype=torch.uint8)
        del a, b
        return torch.empty(2 << 20, dtype=torch.uint8)

    out, peak, reserved = measure_peak(work, "cpu")
    assert peak == 4 << 20 and out.numel() == 2 << 20 and reserved is None


@pytest.mark.parametrize("kind,kv_heads", [("llada", 4), ("dream", 2)])
def test_model_predicts_the_measured_peak(kind, kv_heads):
    model = _model(kind, kv_heads=kv_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("fullcache", "maskkv"):
            m = methods.get(name, budget=32)
            measured = _step1(model, m, 2048)
            predicted = step1_memory(model, 2048, R, m, token_chunk=64, device="cpu")
            assert abs(predicted.peak_bytes / measured - 1) < 0.08, (name, predicted, measured)


def test_activations_bound_an_evicting_method_and_kv_bounds_fullcache():
    """Two more layers add their prompt KV to FullCache's peak and (almost) nothing to MaskKV's,
    measured and predicted alike."""
    two, four = _model(layers=2), _model(layers=4)
    fc, mkv = methods.FullCache(), methods.MaskKV(budget=32)
    P = 2048
    kv_two_layers = 2 * (2 * 4 * P * 32 * 2 + 4 * 4 * P)  # K, V (bf16) and positions (int32)
    grew_fc = _step1(four, fc, P) - _step1(two, fc, P)
    assert abs(grew_fc / kv_two_layers - 1) < 0.05
    grew_mkv = _step1(four, mkv, P) - _step1(two, mkv, P)
    assert 0 <= grew_mkv < 0.02 * _step1(two, mkv, P)  # two more layers' 32 kept rows per head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slope = {
            (n, name): step1_memory(model, P, R, m, token_chunk=64, device="cpu").per_token
            for n, model in ((2, two), (4, four))
            for name, m in (("fc", fc), ("mkv", mkv))
        }
    assert slope[4, "mkv"] == slope[2, "mkv"]
    assert slope[4, "fc"] - slope[2, "fc"] == pytest.approx(kv_two_layers / P)


@pytest.mark.parametrize("name", ["fullcache", "maskkv"])
def test_probe_has_the_full_pass_peak(name):
    """One layer run, the other layers' caches as placeholders, attention of the needed query
    chunks only: the peak of the whole pass (what makes a 1M-token search try take seconds)."""
    model = _model(layers=3)
    m = methods.get(name, budget=32)
    full = _step1(model, m, 1500)
    probed = _step1(model, m, 1500, probe_layers=1)
    assert abs(probed - full) <= 1024, (probed, full)
    assert len(model.layers) == 3  # restored


def test_chunked_step1_equals_one_chunk():
    """Token chunks (QKV into buffers, attention per query chunk with the residual added in
    place, MLP in place) compute what one chunk does, within fp32 rounding."""
    p = dataclasses.replace(bench.PRESETS["tiny"], layers=2)
    model = bench.build_model(p, dtype="float32")
    P = 150
    x = torch.cat([bench.random_prompt(model, P, seed=5),
                   torch.full((1, R), model.config.mask_token_id)], 1)  # fmt: skip
    need = torch.ones(1, R, dtype=torch.bool)
    runs = []
    for chunk in (40, 4096):
        den = Denoiser(model, methods.SnapKV(budget=24), P, token_chunk=chunk)
        runs.append((den(x, need), den.caches))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a.positions, b.positions)


def test_prediction_at_llada_8b_shape():
    """At the real shape (a meta-device model: no memory), the predicted FullCache slope is the
    prompt KV of 32 layers plus MaskKV's, and the longest prompts follow from the slopes."""
    with torch.device("meta"):
        model = bench.build_model("llada-8b", device="meta")
    fc, mkv = methods.FullCache(), methods.MaskKV(budget=256)
    a = step1_memory(model, 32768, 256, fc, device="cuda")
    b = step1_memory(model, 32768, 256, mkv, device="cuda")
    kv = 32 * 2 * 32 * 128 * 2 + 32 * 32 * 4  # bytes of prompt KV (+ positions) per token
    assert a.per_token - b.per_token == pytest.approx(kv, rel=0.02)
    free = 60 << 30
    fc_max, mkv_max = (predict_max_prompt(model, m, free, device="cuda") for m in (fc, mkv))
    assert step1_memory(model, fc_max, 256, fc, device="cuda").peak_bytes <= free
    assert step1_memory(model, fc_max + 256, 256, fc, device="cuda").peak_bytes > free
    assert mkv_max > 5 * fc_max


def test_longest_prompt_search_brackets_the_answer():
    """The search on the CPU against a memory budget: it starts at the model's prediction and
    ends with a fitting try and an over-budget one 128 tokens apart (probe tries: one layer)."""
    model = _model(layers=4)
    budget = 6 << 20
    search = bench.max_prompt_search(
        model, ["fullcache", "maskkv"], budget=32, gen_length=R, token_chunk=256,
        free_bytes=budget, refine=5, quantum=128, progress=False,
    )  # fmt: skip
    for name, s in search.items():
        good, bad = s["max_fit"], s["first_oom"]
        assert good is not None and bad is not None and 0 < bad - good <= 128, (name, s)
        tries = {t["prompt_len"]: t for t in s["tries"]}
        assert tries[good]["peak_memory_bytes"] <= budget < tries[bad]["peak_memory_bytes"]
        assert s["tries"][0]["prompt_len"] == s["predicted_max"] // 128 * 128
        assert abs(s["predicted_max"] / good - 1) < 0.15, (name, s["predicted_max"], good)
    assert search["maskkv"]["max_fit"] > search["fullcache"]["max_fit"]
