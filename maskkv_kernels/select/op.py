"""Public ops ``select_and_gather``, ``mask_scores``, ``window_scores``, ``topk_gather``.

Each public function validates its inputs (``_checks``), resolves the backend, sizes the output on
the host and calls a ``torch.library`` custom op (``maskkv::...``) whose fake implementation lets it
trace under ``torch.compile`` and CUDA graphs. The custom ops take the host-known sizes (N, the
number of kept rows) as int arguments and return plain tensors; the wrappers pack ``RaggedKV``.

Host/device contract (``select_and_gather`` never reads the GPU unless said below):

- the output size N = Hkv * sum_b min(k_l, prompt_lens[b]) for an int layer budget: every head
  allocator gives exact row totals, so N is known from the arguments alone;
- ``prompt_lens`` on the CPU is free to read (the generation loop passes it so); on q's device,
  reading it to size the output costs one device-to-host sync;
- an explicit budget tensor [B, Hkv] costs one host read (to validate it and size N), as does
  ``topk_gather``'s ``budgets``;
- ``max_seqlen`` is exact where it is host-known (uniform head budgets, explicit budgets), else the
  bound min(max prompt length, Hkv * k_l).
"""

# No ``from __future__ import annotations``: torch.library reads the annotations at definition.
import torch

from .. import _checks as C
from .. import reference as _ref
from .._dispatch import resolve_backend
from .._ragged import RaggedKV
from ..budgets import allocate_head_budgets
from . import torch_impl

__all__ = ["mask_scores", "select_and_gather", "topk_gather", "window_scores"]


def _backend_fns(backend: str):
    """(score_keys, pool_window, topk_gather) of a backend; Triton imported only when used."""
    if backend == "triton":
        from . import triton_scores, triton_topk

        return triton_scores.score_keys, triton_scores.pool_window, triton_topk.topk_gather
    if backend == "cpp":
        from . import cpp_impl

        return cpp_impl.score_keys, cpp_impl.pool_window, cpp_impl.topk_gather
    return torch_impl.score_keys, torch_impl.pool_window, torch_impl.topk_gather


def _cu_seqlens(budgets: torch.Tensor) -> torch.Tensor:
    """int32 [B*Hkv + 1] exclusive prefix of the budgets, on their device (no sync)."""
    cu = budgets.reshape(-1).cumsum(0, dtype=torch.int32)
    return torch.nn.functional.pad(cu, (1, 0))


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("maskkv::mask_scores", mutates_args=())
def _mask_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    first: torch.Tensor,
    lse: torch.Tensor | None,
    prompt_len: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    score_keys, _, _ = _backend_fns(backend)
    return score_keys(
        q, k, first, prompt_len=prompt_len, window=False, lse=lse, scale=scale, need_mass=True
    )


@_mask_scores_op.register_fake
def _(q, k, first, lse, prompt_len, scale, backend):
    B, Hkv = k.shape[:2]
    return (
        q.new_empty(B, Hkv, prompt_len, dtype=torch.float32),
        q.new_empty(B, Hkv, dtype=torch.float32),
    )


@torch.library.custom_op("maskkv::window_scores", mutates_args=())
def _window_scores_op(
    q: torch.Tensor,
    k: torch.Tensor,
    first: torch.Tensor,
    prompt_len: int,
    pool: str,
    pool_kernel: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    score_keys, pool_window, _ = _backend_fns(backend)
    raw, _mass = score_keys(
        q, k, first, prompt_len=prompt_len, window=True, lse=None, scale=scale, need_mass=False
    )
    return pool_window(raw, first, q.shape[2], pool, pool_kernel)


@_window_scores_op.register_fake
def _(q, k, first, prompt_len, pool, pool_kernel, scale, backend):
    return q.new_empty(k.shape[0], k.shape[1], prompt_len, dtype=torch.float32)


@torch.library.custom_op("maskkv::topk_gather", mutates_args=())
def _topk_gather_op(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    first: torch.Tensor,
    n: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, _, topk = _backend_fns(backend)
    cu = _cu_seqlens(budgets)
    k_out, v_out, pos = topk(scores, k, v, budgets, first, cu, n)
    return k_out, v_out, cu, pos


@_topk_gather_op.register_fake
def _(scores, k, v, budgets, first, n, backend):
    D = k.shape[-1]
    return (
        k.new_empty(n, D),
        v.new_empty(n, D),
        k.new_empty(scores.shape[0] * scores.shape[1] + 1, dtype=torch.int32),
        k.new_empty(n, dtype=torch.int32),
    )


@torch.library.custom_op("maskkv::select_and_gather", mutates_args=())
def _select_and_gather_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first: torch.Tensor,
    budgets: torch.Tensor | None,
    layer_budget: int,
    prompt_len: int,
    score: str,
    head_budget: str,
    pool: str,
    pool_kernel: int,
    alpha: float,
    lse: torch.Tensor | None,
    scale: float,
    n: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    score_keys, pool_window, topk = _backend_fns(backend)
    window = score == "window"
    need_mass = budgets is None and head_budget == "prompt_preference"
    scores, mass = score_keys(
        q, k, first, prompt_len=prompt_len, window=window, lse=lse, scale=scale, need_mass=need_mass
    )
    if window:
        scores = pool_window(scores, first, q.shape[2], pool, pool_kernel)
    if budgets is None:  # device allocators: exact row totals, no host sync
        budgets = allocate_head_budgets(
            scores,
            layer_budget,
            head_budget,
            mask_mass=mass if need_mass else None,
            alpha=alpha,
            prompt_lens=prompt_len - first,
        )
    budgets = budgets.to(torch.int32)
    cu = _cu_seqlens(budgets)
    k_out, v_out, pos = topk(scores, k, v, budgets, first, cu, n)
    return k_out, v_out, cu, pos, scores


@_select_and_gather_op.register_fake
def _(q, k, v, first, budgets, layer_budget, prompt_len, score, head_budget, pool, pool_kernel,
      alpha, lse, scale, n, backend):  # fmt: skip
    B, Hkv, _, D = k.shape
    return (
        k.new_empty(n, D),
        v.new_empty(n, D),
        k.new_empty(B * Hkv + 1, dtype=torch.int32),
        k.new_empty(n, dtype=torch.int32),
        k.new_empty(B, Hkv, prompt_len, dtype=torch.float32),
    )


# ----------------------------------------------------------------------------- host helpers


def _compiling() -> bool:
    """Under torch.compile host values are symbolic: keep tensor ops (traced as one H2D copy)."""
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def _host_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 [len(values)] on ``device`` from host ints, safe inside CUDA-graph capture.

    Equal values are one fill. Otherwise an H2D copy, except while a CUDA graph is being
    captured: a copy from pageable host memory cannot be captured (and a replay would re-read a
    buffer that is gone), so each value becomes its own fill, baked into the graph like the sizes
    that already depend on these values."""
    if values and all(x == values[0] for x in values):
        return torch.full((len(values),), values[0], dtype=torch.int32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        out = torch.empty(len(values), dtype=torch.int32, device=device)
        for i, x in enumerate(values):
            out[i : i + 1].fill_(x)  # a fill kernel; ``out[i] = x`` would be an H2D copy
        return out
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def _first(
    prompt_lens: torch.Tensor | None,
    dims: C.Dims,
    device: torch.device,
    host_lens: list[int] | None = None,
) -> torch.Tensor:
    """int32 [B] on ``device``: first real position P - prompt_lens[b] (left padding).

    A CPU ``prompt_lens`` becomes a fill or an H2D copy (never a sync), from ``host_lens`` when
    the caller has already read the values; one on ``device`` is used in place."""
    if prompt_lens is None:
        return torch.zeros(dims.B, dtype=torch.int32, device=device)
    if prompt_lens.device.type == "cpu" and device.type != "cpu" and not _compiling():
        lens = prompt_lens.tolist() if host_lens is None else host_lens
        return _host_ints([dims.P - int(x) for x in lens], device)
    return (dims.P - prompt_lens).to(device=device, dtype=torch.int32)


def _host_lens(prompt_lens: torch.Tensor | None, dims: C.Dims) -> list[int]:
    """Real prompt lengths on the host. A device tensor costs one sync (documented)."""
    if prompt_lens is None:
        return [dims.P] * dims.B
    return C.host_prompt_lens(prompt_lens, dims.P)  # graph-safe under torch.compile


def _explicit_budgets(budget: torch.Tensor, lens: list[int]) -> tuple[int, int]:
    """Validate an int [B, Hkv] budget tensor against the prompt lengths: one host read.
    Returns (N, max_seqlen)."""
    host = budget.detach().to("cpu", torch.long)
    bad = [(b, int(x)) for b, row in enumerate(host.tolist()) for x in row if not 0 <= x <= lens[b]]
    if bad:
        b, x = bad[0]
        raise C.fail("budget", f"values in [0, prompt_lens[{b}]={lens[b]}] (per-head budgets)", x)
    return int(host.sum()), int(host.max()) if host.numel() else 0


def _uniform_budgets(first: torch.Tensor, layer_budget: int, dims: C.Dims) -> torch.Tensor:
    """int32 [B, Hkv] = min(k_l, prompt_lens[b]) from ``first`` (= P - prompt_lens) on its
    device: tensor ops only, so it is CUDA-graph safe and traces under torch.compile without
    branching on the (there symbolic) lengths."""
    kept = (dims.P - first).clamp_max(layer_budget).to(torch.int32)
    return kept[:, None].expand(dims.B, dims.Hkv).contiguous()


def _window_len(q: torch.Tensor, dims: C.Dims) -> None:
    if dims.M > dims.P:
        raise C.fail(
            "q", f"[B, Hq, W, D] with W <= prompt_len={dims.P} (window queries)", C.describe(q)
        )


# ----------------------------------------------------------------------------- public API


def select_and_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int | torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    score: str = "mask",
    head_budget: str = "uniform",
    pool: str = "max",
    pool_kernel: int = 7,
    alpha: float | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    return_scores: bool = False,
    backend: str = "auto",
) -> RaggedKV | tuple[RaggedKV, torch.Tensor]:
    """Score the prompt keys, split the budget between KV heads, keep the top-k, gather.

    Args:
        q: [B, Hq, M, D] scoring queries: the M mask queries (``score="mask"``) or the queries of
            the last W = M prompt positions (``score="window"``, W <= prompt_len).
        k, v: [B, Hkv, L, D], Hq a multiple of Hkv; the prompt is the first ``prompt_len``
            positions (keys after RoPE). Any strides.
        budget: int layer budget k_l (average kept pairs per KV head, split by ``head_budget``:
            "uniform", "prompt_preference" (mask mode only) or "adakv"), or an int tensor
            [B, Hkv] on q's device of explicit per-head budgets in [0, prompt_lens[b]] (one host
            read to validate it and size the output).
        prompt_lens: int [B] real tokens per row (left padding), on the CPU (free) or on q's
            device (one sync to size the output).
        pool, pool_kernel: window-mode pooling ("max", "avg", "none"; odd kernel).
        alpha: head-budget parameter; None = the mode's default (0.1 prompt_preference, 0.2
            adakv).
        lse: fp32 [B, Hq, M] natural-log LSE of the mask queries over all valid keys, from the
            attention forward (mask mode only): saves the LSE pass over K.
        scale: softmax scale, default D ** -0.5.
        return_scores: also return the fp32 [B, Hkv, P] scores.
        backend: "auto" (Triton on CUDA, the C++ kernels on CPU, else torch), "triton",
            "cpp", "torch" or "reference".
    Returns:
        RaggedKV (segment b*Hkv + g holds the kept rows of (b, g) in ascending position order,
        copied bit for bit), and the scores when ``return_scores``.

    No device-to-host sync with an int budget and a CPU (or absent) ``prompt_lens``.
    """
    dims = C.check_qkv(q, k, v, prompt_len)
    C.check_choice(score, "score", C.SCORES)
    C.check_choice(head_budget, "head_budget", C.HEAD_BUDGETS)
    C.check_pool(pool, pool_kernel)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_lse(lse, dims, q, score)
    alpha_f = C.check_alpha(alpha, head_budget)
    scale_f = C.check_scale(scale, dims.D)
    if score == "window":
        _window_len(q, dims)
    if isinstance(budget, torch.Tensor):
        C.check_head_budgets(budget, dims, q.device)
    else:
        C.check_layer_budget(budget)
        if head_budget == "prompt_preference" and score == "window":
            raise C.fail(
                "head_budget",
                "'uniform' or 'adakv' with score='window' (no mask mass)",
                repr(head_budget),
            )
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _ref.select_and_gather(
            q, k, v, budget, prompt_len=prompt_len, prompt_lens=prompt_lens, score=score,
            head_budget=head_budget, pool=pool, pool_kernel=pool_kernel, alpha=alpha, lse=lse,
            scale=scale, return_scores=return_scores,
        )  # fmt: skip

    lens = _host_lens(prompt_lens, dims)
    first = _first(prompt_lens, dims, q.device, lens)
    if isinstance(budget, torch.Tensor):
        n, max_seqlen = _explicit_budgets(budget, lens)
        budgets, layer_budget = budget, 0
    elif head_budget == "uniform":  # host-known budgets: skip the allocator's launches
        kept = [min(budget, x) for x in lens]
        n, max_seqlen = dims.Hkv * sum(kept), max(kept)
        budgets, layer_budget = _uniform_budgets(first, budget, dims), budget
    else:
        n = dims.Hkv * sum(min(budget, x) for x in lens)
        max_seqlen = min(max(lens), dims.Hkv * budget)
        budgets, layer_budget = None, budget
    k_out, v_out, cu, pos, scores = _select_and_gather_op(
        q, k, v, first, budgets, layer_budget, prompt_len, score, head_budget, pool, pool_kernel,
        alpha_f, lse, scale_f, n, backend,
    )  # fmt: skip
    cache = RaggedKV(k_out, v_out, cu, pos, max_seqlen, dims.Hkv)
    return (cache, scores) if return_scores else cache


def mask_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-query voting scores (no host sync, whatever the device of ``prompt_lens``).

    Args:
        q: [B, Hq, M, D] mask queries; k: [B, Hkv, L, D] keys, prompt = first ``prompt_len``.
        prompt_lens: int [B] (left padding), on the CPU or q's device (values not checked there).
        lse: optional fp32 [B, Hq, M] natural-log LSE over all valid keys (skips a pass over K).
    Returns:
        scores fp32 [B, Hkv, P] (attention mass per prompt key, summed over the G heads of the KV
        head and the M queries; 0 on padding) and mask_mass fp32 [B, Hkv] (mass on [P, L)).
    """
    dims = C.check_qkv(q, k, None, prompt_len)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_lse(lse, dims, q, "mask")
    scale_f = C.check_scale(scale, dims.D)
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _ref.mask_scores(
            q, k, prompt_len=prompt_len, prompt_lens=prompt_lens, lse=lse, scale=scale
        )
    first = _first(prompt_lens, dims, q.device)
    return _mask_scores_op(q, k, first, lse, prompt_len, scale_f, backend)


def window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    prompt_len: int,
    prompt_lens: torch.Tensor | None = None,
    pool: str = "max",
    pool_kernel: int = 7,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SnapKV window scores for bidirectional dLLMs (no host sync).

    Args:
        q: [B, Hq, W, D] queries of the last W <= prompt_len prompt positions; k: [B, Hkv, L, D].
    Returns:
        fp32 [B, Hkv, P]: softmax over valid prompt keys, summed over window queries and group,
        pooled over [0, P - W); +inf on the window; 0 on padding.
    """
    dims = C.check_qkv(q, k, None, prompt_len)
    C.check_prompt_lens(prompt_lens, dims, q.device)
    C.check_pool(pool, pool_kernel)
    scale_f = C.check_scale(scale, dims.D)
    _window_len(q, dims)
    backend = resolve_backend(backend, q.device)
    if backend == "reference":
        return _ref.window_scores(
            q, k, prompt_len=prompt_len, prompt_lens=prompt_lens, pool=pool,
            pool_kernel=pool_kernel, scale=scale,
        )  # fmt: skip
    first = _first(prompt_lens, dims, q.device)
    return _window_scores_op(q, k, first, prompt_len, pool, pool_kernel, scale_f, backend)


def topk_gather(
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    *,
    prompt_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> RaggedKV:
    """Keep, per (b, g), the ``budgets[b, g]`` best-scored real prompt positions and gather them.

    Args:
        scores: fp32 [B, Hkv, P]; k, v: [B, Hkv, L >= P, D] (only the prompt is read).
        budgets: int tensor [B, Hkv] in [0, prompt_lens[b]], on the CPU or the scores' device
            (one host read to validate it and size the output).
        prompt_lens: int [B] real tokens per row (left padding).
    Returns:
        RaggedKV; ranking: higher score first, NaN lowest, ties to the lower position; rows
        copied bit for bit in ascending position order; ``max_seqlen`` exact.
    """
    B, Hkv, P = C.check_scores(scores)
    C.check_tensor(k, "k", "[B, Hkv, L, D]", 4)
    C.check_tensor(v, "v", "[B, Hkv, L, D]", 4)
    if k.shape[:2] != (B, Hkv) or k.shape[2] < P:
        raise C.fail("k", f"[B={B}, Hkv={Hkv}, L>={P}, D] to match scores", C.describe(k))
    if v.shape != k.shape:
        raise C.fail("v", f"k's shape {tuple(k.shape)} [B, Hkv, L, D]", C.describe(v))
    C.check_same("k", k, scores, "scores", dtype=False)
    C.check_same("v", v, k, "k")
    dims = C.Dims(B, Hkv, Hkv, 0, k.shape[3], k.shape[2], P)
    C.check_prompt_lens(prompt_lens, dims, scores.device)
    if (
        not isinstance(budgets, torch.Tensor)
        or budgets.shape != (B, Hkv)
        or budgets.dtype not in (torch.int32, torch.int64)
    ):
        raise C.fail("budgets", f"an int32/int64 tensor [B={B}, Hkv={Hkv}]", C.describe(budgets))
    if budgets.device not in (scores.device, torch.device("cpu")):
        raise C.fail("budgets", f"a tensor on the CPU or on {scores.device}", C.describe(budgets))
    backend = resolve_backend(backend, scores.device)
    if backend == "reference":
        return _ref.topk_gather(scores, k, v, budgets, prompt_lens=prompt_lens)
    lens = _host_lens(prompt_lens, dims)
    try:
        n, max_seqlen = _explicit_budgets(budgets, lens)
    except ValueError as e:
        raise ValueError(str(e).replace("budget:", "budgets:", 1)) from None
    first = _first(prompt_lens, dims, scores.device, lens)
    dev_budgets = budgets.to(scores.device, torch.int32, non_blocking=True)
    k_out, v_out, cu, pos = _topk_gather_op(scores, k, v, dev_budgets, first, n, backend)
    return RaggedKV(k_out, v_out, cu, pos, max_seqlen, Hkv)
