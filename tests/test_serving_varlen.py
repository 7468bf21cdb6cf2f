"""The serving engine's attention path: with a batch-invariant varlen ``ragged_attention`` (its
rows bitwise the dense per-request calls', probed once at start-up), one varlen call per layer
serves the whole batch, for both shipped models (MHA LLaDA, GQA Dream) on the CPU backends."""

from __future__ import annotations

import pytest
import torch

from maskkv.cli_common import ASSETS
from maskkv.models import load_checkpoint
from maskkv.serving import Engine
from maskkv_kernels import _cpp

BACKENDS = [
    "torch",
    pytest.param(
        "cpp", marks=pytest.mark.skipif(_cpp._find_compiler() is None, reason="no C++ compiler")
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_engine_serves_a_batch_with_one_varlen_call(kind, dtype, backend):
    model = load_checkpoint(ASSETS / f"tiny-{kind}-kv", dtype=dtype).eval()
    config = model.config
    assert (config.num_attention_heads == config.num_key_value_heads) == (kind == "llada")
    engine = Engine(model, method="maskkv", kv_budget=1 << 22, backend=backend)
    assert engine.runner.attention == "varlen"
