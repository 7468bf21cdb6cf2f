"""Fused later-step layer bodies (``Denoiser(fusion=...)``) against the model's own layers: the eager
fused loop bit for bit, the Triton kernels (interpreter) and torch.compile within bf16 rounding."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from maskkv import methods
from maskkv.generation import DualCache, generate
from maskkv.generation.engine import Denoiser
from maskkv.models import load_checkpoint
from maskkv.models.fused import FusedLayers, resolve_fusion
from maskkv.testing import tiny_checkpoint

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KINDS = ["llada", "dream"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tiny_checkpoint(kind, tmp_path_factory.mktemp(kind), dtype=torch.bfloat16)
        out[kind] = load_checkpoint(path).eval()
    return out


def _inputs(model, P=40, R=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 250, (1, P), generator=g)
    x = torch.cat([prompt, torch.full((1, R), model.config.mask_token_id)], 1)
    return x, torch.ones(1, R, dtype=torch.bool)


def _later_logits(model, fusion, *, compile_backend=None):
    """Logits of step 2 (a tail pass over the pruned prompt) with ``fusion``."""
    x, need = _inputs(model)
    den = Denoiser(model, methods.SnapKV(budget=16), 40, fusion="none")
    den(x, need)  # step 1
    if compile_backend is not None:
        den.use_fusion(fusion, "cpu", compile_backend=compile_backend)
    else:
        den.use_fusion(fusion, "cpu")
    x[0, 41] = 7  # a revealed token
    return den(x, need)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_loop_in_torch_is_the_layer_protocol(models, kind):
    """Same math, restructured (residual adds moved into the next norm): bit-identical, with a
    pruned prompt (PromptCache) and with stored response KV (DualCache)."""
    model = models[kind]
    assert torch.equal(_later_logits(model, "torch"), _later_logits(model, "none"))
    prompt = _inputs(model)[0][:, :40]
    runs = [
        generate(model, prompt, method=methods.SnapKV(budget=16), cache=DualCache(),
                 gen_length=16, block_length=8, steps=8, fusion=fusion, seed=0)
        for fusion in ("none", "torch")
    ]  # fmt: skip
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_loop_traces_the_same_graph(models, kind):
    """torch.compile plumbing (weights as graph inputs, one graph for every layer) with the
    compiler-free "eager" backend: bit-identical. The inductor numerics run on the GPU tests."""
    model = models[kind]
    got = _later_logits(model, "compile", compile_backend="eager")
    assert torch.equal(got, _later_logits(model, "none"))


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_fused_layers_match_within_bf16_rounding(models, kind):
    model = models[kind]
    fused, ref = _later_logits(model, "triton"), _later_logits(model, "none")
    # Each kernel is within one bf16 step of the eager op; two layers and the LM head keep the
    # logits (about unit size) within a few bf16 steps.
    torch.testing.assert_close(fused.float(), ref.float(), rtol=0, atol=3 * 2**-7)
    assert (fused.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_fusion_choice_and_bad_values(models):
    model = models["llada"]
    assert resolve_fusion("auto", model, torch.device("cpu")) == "none"
    assert resolve_fusion("triton", model, torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="fusion: expected one of"):
        Denoiser(model, methods.FullCache(), 40, fusion="fast")
    other = SimpleNamespace(layers=[torch.nn.Linear(2, 2)])  # a layer class it does not know
    with pytest.raises(ValueError, match="fusion: expected 'none' for layers of type Linear"):
        FusedLayers(other, "triton")
    assert resolve_fusion("auto", other, torch.device("cpu")) == "none"
