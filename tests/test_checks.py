"""Every bad input to a public op is a ValueError that names the argument and the expected shape."""

import math

import pytest
import torch

import maskkv_kernels as mk
from maskkv_kernels import reference as R

B, Hq, Hkv, M, L, D, P = 2, 4, 2, 3, 12, 8, 8


def _inputs(dtype=torch.float32):
    return (
        torch.randn(B, Hq, M, D, dtype=dtype),
        torch.randn(B, Hkv, L, D, dtype=dtype),
        torch.randn(B, Hkv, L, D, dtype=dtype),
    )


SELECTS = [
    pytest.param(lambda *a, **kw: mk.select_and_gather(*a, backend="torch", **kw), id="torch"),
    pytest.param(
        lambda *a, **kw: mk.select_and_gather(*a, backend="reference", **kw), id="reference"
    ),
    pytest.param(R.select_and_gather, id="reference-module"),
]

BAD_SELECT = [
    # (what to change, expected message fragment)
    (lambda q, k, v, kw: (q[0], k, v, kw), r"q: expected a 4-D tensor \[B, Hq, M, D\]"),
    (lambda q, k, v, kw: (q, k[:, :, :, :4], v, kw), r"k: expected \[B=2, Hkv, L, D=8\]"),
    (lambda q, k, v, kw: (q, k, v[:, :, :5], kw), r"v: expected k's shape"),
    (lambda q, k, v, kw: (q.half(), k, v, kw), r"k: expected the dtype of q"),
    (lambda q, k, v, kw: (q[:, :3], k, v, kw), r"q: expected .*Hq a multiple of k's Hkv=2"),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "prompt_len": L + 1}),
        r"prompt_len: expected an int in \[0, L=12\]",
    ),
    (lambda q, k, v, kw: (q, k, v, {**kw, "budget": -1}), r"budget: expected a non-negative int"),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "budget": torch.ones(B, Hkv + 1, dtype=torch.int32)}),
        r"budget: expected an int or an int tensor \[B=2, Hkv=2\]",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "lse": torch.zeros(B, Hq, M + 1)}),
        r"lse: expected fp32 tensor \[B=2, Hq=4, M=3\]",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "lse": torch.zeros(B, Hq, M, dtype=torch.float16)}),
        r"lse: expected fp32",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "prompt_lens": torch.tensor([P])}),
        r"prompt_lens: expected .*\[B=2\]",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "prompt_lens": torch.tensor([P, P + 1])}),
        r"prompt_lens: expected values in \[0, prompt_len=8\]",
    ),
    (lambda q, k, v, kw: (q, k, v, {**kw, "score": "snap"}), r"score: expected one of"),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "head_budget": "pyramid"}),
        r"head_budget: expected one of",
    ),
    (
        lambda q, k, v, kw: (
            q,
            k,
            v,
            {**kw, "score": "window", "head_budget": "prompt_preference"},
        ),
        r"head_budget",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "score": "window", "pool_kernel": 4}),
        r"pool_kernel: expected an odd",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "score": "window", "lse": torch.zeros(B, Hq, M)}),
        r"lse: expected None with score='window'",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "scale": -1.0}),
        r"scale: expected a finite positive float",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "alpha": 2.0, "head_budget": "adakv"}),
        r"alpha: expected a float in \[0, 1\]",
    ),
    *[
        (
            lambda q, k, v, kw, bad=bad: (q, k, v, {**kw, "scale": bad}),
            r"scale: expected a finite positive float",
        )
        for bad in (math.inf, math.nan, 0.0, -math.inf)
    ],
    (lambda q, k, v, kw: (q[..., :0], k[..., :0], v[..., :0], kw), r"q: expected .*D >= 1"),
    (lambda q, k, v, kw: (q[:0], k[:0], v[:0], kw), r"q: expected .*B, Hq, D >= 1"),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "prompt_lens": torch.tensor([-1, P])}),
        r"prompt_lens: expected values in \[0, prompt_len=8\]",
    ),
    (
        lambda q, k, v, kw: (q, k, v, {**kw, "prompt_lens": torch.tensor([1.0, 2.0])}),
        r"prompt_lens: expected an int32/int64 tensor of shape \[B=2\]",
    ),
]


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("change,message", BAD_SELECT)
def test_select_and_gather_bad_input(select, change, message):
    q, k, v = _inputs()
    q, k, v, kw = change(q, k, v, {"budget": 3, "prompt_len": P})
    budget = kw.pop("budget")
    with pytest.raises(ValueError, match=message):
        select(q, k, v, budget, **kw)


def test_window_queries_longer_than_prompt():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"W <= prompt_len=2"):
        R.select_and_gather(q, k, v, 1, prompt_len=2, score="window")


def test_unknown_backend():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        mk.select_and_gather(q, k, v, 3, prompt_len=P, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        mk.ragged_attention(q, R.select_and_gather(q, k, v, 3, prompt_len=P), backend="fast")


ATTNS = [
    pytest.param(lambda *a, **kw: mk.ragged_attention(*a, backend="torch", **kw), id="torch"),
    pytest.param(R.ragged_attention, id="reference"),
]


@pytest.mark.parametrize("attn", ATTNS)
def test_ragged_attention_bad_input(attn):
    q, k, v = _inputs()
    cache = R.select_and_gather(q, k, v, 3, prompt_len=P)
    tail = k[:, :, P:]
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \[B, Hq, Lq, D\]"):
        attn(q[0], cache)
    with pytest.raises(ValueError, match=r"cache: expected a RaggedKV"):
        attn(q, (cache.k, cache.v))
    with pytest.raises(ValueError, match=r"cache: expected a RaggedKV with B=1 rows"):
        attn(q[:1], cache)
    with pytest.raises(ValueError, match=r"cache: expected head dim D=4"):
        attn(q[..., :4], cache)
    with pytest.raises(ValueError, match=r"v_tail: expected given together"):
        attn(q, cache, tail, None)
    with pytest.raises(ValueError, match=r"k_tail: expected \[B=2, Hkv=2, Lt, D=8\]"):
        attn(q, cache, tail[:, :1], tail[:, :1])
    with pytest.raises(ValueError, match=r"v_tail: expected k_tail's shape"):
        attn(q, cache, tail, tail[:, :, :1])
    with pytest.raises(ValueError, match=r"cache.k: expected the dtype of q"):
        attn(q.half(), cache)


@pytest.mark.parametrize("alloc", [mk.allocate_head_budgets, R.allocate_head_budgets])
@pytest.mark.parametrize(
    "prompt_lens,message",
    [
        (torch.tensor([-3, 4]), r"prompt_lens: expected values in \[0, P=6\]"),
        (torch.tensor([7, 4]), r"prompt_lens: expected values in \[0, P=6\]"),
        (torch.tensor([3.0, 4.0]), r"prompt_lens: expected an int32/int64 tensor"),
        (torch.tensor([3]), r"prompt_lens: expected an int32/int64 tensor of shape \[B=2\]"),
    ],
)
def test_allocator_prompt_lens(alloc, prompt_lens, message):
    """Negative, too long or float lengths used to give negative or silent budgets."""
    with pytest.raises(ValueError, match=message):
        alloc(torch.rand(2, 2, 6), 3, "uniform", prompt_lens=prompt_lens)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -1.0])
def test_ragged_attention_bad_scale_and_empty_dims(attn, scale):
    q, k, v = _inputs()
    cache = R.select_and_gather(q, k, v, 3, prompt_len=P)
    with pytest.raises(ValueError, match=r"scale: expected a finite positive float"):
        attn(q, cache, scale=scale)
    empty = mk.RaggedKV(cache.k[:, :0], cache.v[:, :0], cache.cu_seqlens, cache.positions, 3, 2)
    with pytest.raises(ValueError, match=r"q: expected .*D >= 1"):
        attn(q[..., :0], empty)
