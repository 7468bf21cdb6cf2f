"""Batch-invariant linear layers: a token's output bits do not depend on how many other tokens
share the matrix multiply.

BLAS libraries pick their kernel by the shape of the call. On the CPU (MKL, measured with
torch 2.13 on AVX-512) a single-threaded ``F.linear`` over M rows gives the same bits for a row
whatever M is once M >= 16, but below that it takes another kernel (a GEMV-like path for one or
a few rows) whose sums round differently; with several threads the split of the work between
threads changes with M (for K >= 1024 even at M = 500) and so do the sums. The serving engine
runs many requests' tokens through one linear call, so without care a request's logits would
depend on what runs beside it, and a greedy decode could flip a near-tie.

``batch_invariant()`` is a ``TorchFunctionMode`` that replaces ``F.linear`` (every ``nn.Linear``
of the models) by ``invariant_linear``:

- CPU, one intra-op thread: rows padded with zeros up to ``MIN_ROWS`` (16), one call;
- otherwise (several threads, or CUDA): the rows in fixed chunks of ``CHUNK_ROWS[device]``
  (64 on the CPU, 256 on CUDA, where a 64-row GEMM would waste the tensor cores), the last chunk
  zero-padded, so every call has the same shape; a row's bits then depend neither on its
  position inside the chunk nor on the other rows (measured on the CPU with 2 threads for K up
  to 4096; on CUDA the same construction holds as long as the library's choice depends on the
  shape only, to be checked by ``tests/test_serving.py`` on a GPU). The cost is the padding of
  the last chunk and, for long prompt passes, one GEMM per chunk instead of one per layer.

Mixture-of-experts layers run their experts on the rows routed to each, so an expert's row count
depends on the whole batch. The loop backend calls ``F.linear`` per expert (covered above). The
grouped backend's ``torch._grouped_mm`` picks its CUTLASS tile by the average rows per expert
(torch 2.11: one configuration up to 128 rows per expert, another above); ``invariant_grouped_mm``
keeps every call in the first regime by cutting the rows into calls of at most
``GROUPED_ROWS_PER_EXPERT`` rows per expert (the row offsets stay on the device: no host sync).
A row's dot products run in one tile whatever its neighbours, so its bits are then fixed (checked
on a GPU by ``tests/test_serving_graphs.py``).

Elementwise functions are row-invariant on a GPU, not always on the CPU: PyTorch's vectorized
loop runs a contiguous tensor in blocks of two SIMD vectors and its last ``numel % 32`` elements
(AVX-512, fp32) through the scalar function, which rounds differently. Where rows are narrower than
a block, a row's place in the tensor decides which path computes it: LLaDA2's sigmoid router over
8 experts (the tiny model) gave an expert weight another last bit when padding rows were added.
``invariant_sigmoid`` computes every row in the vectorized path: rows padded to a multiple of 64
columns, in blocks of at most 16384 elements (one thread's work, below PyTorch's parallel grain).

``maskkv.generate`` and the serving engine both run under it, so a request served among others
gives the tokens it gives alone. Full passes (step 1's [prompt ‖ response] pass, a NoCache step, a
block-start pass that refreshes the prompt) run one request at a time in both, so their shapes
and bits already agree: they run the plain kernels (``plain_linears``), and a 32k prompt pass
stays one GEMM per linear instead of 128 chunked ones with an extra copy of every output.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "CHUNK_ROWS",
    "GROUPED_ROWS_PER_EXPERT",
    "MIN_ROWS",
    "batch_invariant",
    "invariant_grouped_mm",
    "invariant_linear",
    "invariant_sigmoid",
    "plain_linears",
]

MIN_ROWS = 16
CHUNK_ROWS = {"cpu": 64, "cuda": 256}
GROUPED_ROWS_PER_EXPERT = 128
_SIGMOID_BLOCK_ELEMENTS = 16384  # invariant_sigmoid's block: half of PyTorch's parallel grain

_thread = threading.local()  # ``plain``: inside ``plain_linears`` (modes are per thread too)


@contextlib.contextmanager
def plain_linears():
    """Inside an enclosing ``batch_invariant`` mode, ``F.linear`` runs the plain kernels again:
    for a pass that runs one request alone wherever it runs (a full pass), so that its rows
    already have the same neighbours in ``maskkv.generate`` and in the serving engine."""
    before = getattr(_thread, "plain", False)
    _thread.plain = True
    try:
        yield
    finally:
        _thread.plain = before


def invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose rows do not depend on the number of rows.

    x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N].
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    M = x.numel() // K if K else 0
    rows = x.reshape(M, K)
    if M == 0:
        out = F.linear(rows, weight, bias)
    elif x.device.type == "cpu" and torch.get_num_threads() == 1:
        out = F.linear(_pad_rows(rows, max(M, MIN_ROWS)), weight, bias)[:M]
    else:
        C = CHUNK_ROWS.get(x.device.type, 256)
        padded = _pad_rows(rows, -(-M // C) * C)
        out = torch.cat([F.linear(padded[s : s + C], weight, bias) for s in range(0, M, C)])[:M]
    return out.reshape(*lead, out.shape[-1])


def invariant_grouped_mm(
    a: torch.Tensor, b: torch.Tensor, *, offs: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` (a [S, K] rows sorted by group, b [E, K, N], offs
    int32 [E] cumulative group ends) in calls of at most ``GROUPED_ROWS_PER_EXPERT * E`` rows,
    so that the library's tile choice, which follows S / E, never changes with the batch.
    Returns [S, N]."""
    if a.dim() != 2 or b.dim() != 3 or kwargs:
        return torch._grouped_mm(a, b, offs=offs, **kwargs)
    S, C = a.shape[0], GROUPED_ROWS_PER_EXPERT * b.shape[0]
    if S <= C:
        return torch._grouped_mm(a, b, offs=offs)
    outs = []
    for s in range(0, S, C):
        n = min(C, S - s)
        local = (offs - s).clamp(0, n).to(offs.dtype)  # this call's group ends, on the device
        outs.append(torch._grouped_mm(a[s : s + n], b, offs=local))
    return torch.cat(outs)


def invariant_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``torch.sigmoid(x)`` whose rows (along the last dim) do not depend on the other rows, on
    the CPU (elsewhere the plain function). x: [..., W]; returns [..., W]."""
    if x.device.type != "cpu" or x.dim() == 0 or x.numel() == 0 or not x.is_floating_point():
        return torch.sigmoid(x)
    W = x.shape[-1]
    rows = x.reshape(-1, W)
    M, Wp = rows.shape[0], -(-W // 64) * 64
    # Rows per block: under PyTorch's parallel grain (32768 elements), so one thread runs the
    # whole block and no thread's share starts inside a vector. Every block holds a multiple of
    # 64 elements, so none reaches the scalar tail.
    C = max(1, _SIGMOID_BLOCK_ELEMENTS // Wp)
    out = torch.empty_like(rows)
    block = rows.new_zeros(min(C, M), Wp)
    for s in range(0, M, C):
        n = min(C, M - s)
        block[:n, :W] = rows[s : s + n]
        out[s : s + n] = torch.sigmoid(block)[:n, :W]
    return out.reshape(x.shape)


def _pad_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """rows [M, K] followed by n - M zero rows (rows itself when n == M)."""
    if n == rows.shape[0]:
        return rows
    padded = rows.new_zeros(n, rows.shape[1])
    padded[: rows.shape[0]] = rows
    return padded


class batch_invariant(TorchFunctionMode):
    """Context manager: every ``F.linear`` inside runs as ``invariant_linear``, every
    ``torch._grouped_mm`` as ``invariant_grouped_mm``, every sigmoid as ``invariant_sigmoid``.

    ``batch_invariant(enabled=False)`` is a no-op (the plain kernels). Modes are per thread: a
    thread that runs the model enters its own.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __enter__(self):
        return super().__enter__() if self.enabled else self

    def __exit__(self, *exc):
        return super().__exit__(*exc) if self.enabled else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_thread, "plain", False):
            if func is F.linear:
                return invariant_linear(*args, **kwargs)
            if func is torch._grouped_mm:
                return invariant_grouped_mm(*args, **kwargs)
            if func in (torch.sigmoid, torch.Tensor.sigmoid) and not kwargs:
                return invariant_sigmoid(*args)
        return func(*args, **kwargs)
