"""GPU-only checks of the generation engine: later steps replayed as CUDA graphs equal eager
steps bit for bit, and the step-1 attention's LSE (fed to select_and_gather) is the true LSE."""

from __future__ import annotations

import pytest
import torch

from maskkv import bench, generate, methods
from maskkv.generation.engine import Denoiser, dense_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model():
    preset = bench.PRESETS["tiny"]
    return bench.build_model(preset, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("method", ["maskkv", "fullcache", "snapkv"])
def test_graph_replay_equals_eager(method):
    model = _model()
    prompt = bench.random_prompt(model, 300, batch=2, seed=1)
    runs = [
        generate(model, prompt, method=methods.get(method, budget=32), gen_length=32,
                 block_length=32, steps=8, cuda_graphs=graphs)
        for graphs in (False, True)
    ]  # fmt: skip
    assert torch.equal(runs[0].sequences, runs[1].sequences)


def test_graph_logits_equal_eager_and_follow_new_tokens():
    model = _model()
    P, R = 300, 32
    x = torch.cat([bench.random_prompt(model, P, seed=2),
                   torch.full((1, R), model.config.mask_token_id, device="cuda")], 1)  # fmt: skip
    need = torch.ones(1, R, dtype=torch.bool, device="cuda")
    eager = Denoiser(model, methods.MaskKV(budget=32), P, cuda_graphs=False)
    graph = Denoiser(model, methods.MaskKV(budget=32), P)
    for step in range(4):
        if step:  # reveal tokens: the replayed graph must read the new ids
            x[0, P + step] = step
        a, b = eager(x, need), graph(x, need)
        assert torch.equal(a, b), step
    assert len(graph._graphs) == 1


def test_step1_lse_is_the_true_lse():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out, lse = dense_attention(q, k, v, None, 256, lse_from=600)
    kf = k.float().repeat_interleave(4, 1)
    ref = torch.logsumexp(q.float() @ kf.transpose(-1, -2) * 128**-0.5, -1)[:, :, 600:]
    assert lse is not None and lse.shape == (1, 8, 100)
    torch.testing.assert_close(lse, ref, atol=2e-3, rtol=0)
    plain, none = dense_attention(q, k, v, None, 256)
    assert none is None
    torch.testing.assert_close(out, plain, atol=1e-2, rtol=0)
