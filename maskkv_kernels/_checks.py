"""Input validation shared by every public op.

Every error is a ``ValueError`` that names the argument and the expected shape, so that nothing is
silently broadcast, truncated or lost. The checks only read shapes, dtypes and devices, plus the
values of small CPU tensors (free to read): they never synchronise with the device.

Under ``torch.compile`` no check guards on data: the ``prompt_lens`` values that size outputs are
checked by a small custom op (``maskkv::check_prompt_lens``) that runs inside the compiled graph
and raises the same ``ValueError`` at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCORES = ("mask", "window")
HEAD_BUDGETS = ("uniform", "prompt_preference", "adakv")
POOLS = ("max", "avg", "none")
BACKENDS = ("auto", "triton", "cpp", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_ALPHA = {"uniform": 0.0, "prompt_preference": 0.1, "adakv": 0.2}


def fail(arg: str, expected: str, got: object) -> ValueError:
    return ValueError(f"{arg}: expected {expected}, got {got}")


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(
    x: object, arg: str, shape_doc: str, ndim: int, dtypes=FLOAT_DTYPES
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != ndim:
        raise fail(arg, f"a {ndim}-D tensor {shape_doc}", describe(x))
    if dtypes is not None and x.dtype not in dtypes:
        raise fail(arg, f"{shape_doc} with dtype in {[str(d) for d in dtypes]}", describe(x))
    return x


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise fail("backend", f"one of {BACKENDS}", repr(backend))
    return backend


def check_same(
    arg: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str, *, dtype: bool = True
) -> None:
    if x.device != ref.device:
        raise fail(arg, f"the device of {ref_name} ({ref.device})", describe(x))
    if dtype and x.dtype != ref.dtype:
        raise fail(arg, f"the dtype of {ref_name} ({ref.dtype})", describe(x))


@dataclass(frozen=True)
class Dims:
    B: int
    Hq: int
    Hkv: int
    M: int
    D: int
    L: int
    P: int

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, prompt_len: int) -> Dims:
    """q: [B, Hq, M, D]; k, v: [B, Hkv, L, D]; 0 <= prompt_len <= L."""
    check_tensor(q, "q", "[B, Hq, M, D]", 4)
    check_tensor(k, "k", "[B, Hkv, L, D]", 4)
    B, Hq, M, D = q.shape
    _, Hkv, L, _ = k.shape
    if B == 0 or Hq == 0 or D == 0:
        raise fail("q", "[B, Hq, M, D] with B, Hq, D >= 1", describe(q))
    if k.shape[0] != B or k.shape[3] != D:
        raise fail("k", f"[B={B}, Hkv, L, D={D}] to match q {tuple(q.shape)}", describe(k))
    check_same("k", k, q, "q")
    if Hkv == 0 or Hq % Hkv != 0:
        raise fail("q", f"[B, Hq, M, D] with Hq a multiple of k's Hkv={Hkv}", describe(q))
    if v is not None:
        check_tensor(v, "v", "[B, Hkv, L, D]", 4)
        if v.shape != k.shape:
            raise fail("v", f"k's shape {tuple(k.shape)} [B, Hkv, L, D]", describe(v))
        check_same("v", v, k, "k")
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or not 0 <= prompt_len <= L:
        raise fail("prompt_len", f"an int in [0, L={L}] (k is [B, Hkv, L, D])", repr(prompt_len))
    return Dims(B, Hq, Hkv, M, D, L, prompt_len)


def _bad_prompt_lens(lens: list[int], P: int, what: str = "prompt_len") -> ValueError | None:
    if any(not 0 <= x <= P for x in lens):
        return fail("prompt_lens", f"values in [0, {what}={P}]", lens)
    return None


@torch.library.custom_op(
    "maskkv::check_prompt_lens", mutates_args=(), schema="(Tensor prompt_lens, SymInt P) -> Tensor"
)
def _check_prompt_lens_op(prompt_lens, P):
    """The value check as a graph node: raises ValueError when the compiled graph runs."""
    error = _bad_prompt_lens(prompt_lens.tolist(), P)
    if error is not None:
        raise error
    return prompt_lens.clone()


@_check_prompt_lens_op.register_fake
def _(prompt_lens, P):
    return torch.empty_like(prompt_lens)


def host_prompt_lens(prompt_lens: torch.Tensor, P: int) -> list[int]:
    """Values of an int [B] ``prompt_lens`` on the host (a CUDA tensor: one sync), each checked
    to be in [0, P].

    Graph-safe: under ``torch.compile`` the check runs as a node of the graph before the values
    are read (they are unbacked symbolic ints there), so tracing never guards on data."""
    if torch.compiler.is_compiling():
        lens = _check_prompt_lens_op(prompt_lens, P).tolist()
        for x in lens:  # already checked at run time; tells the tracer the sizes' range
            torch._check(x >= 0)
            torch._check(x <= P)
        return lens
    lens = [int(x) for x in prompt_lens.tolist()]
    error = _bad_prompt_lens(lens, P)
    if error is not None:
        raise error
    return lens


def check_prompt_lens_tensor(
    prompt_lens: object, B: int, P: int, device: torch.device, what: str = "prompt_len"
) -> None:
    """prompt_lens: int [B] real prompt tokens per row (left padding), each in [0, P], on the CPU
    or on ``device``. The values are checked where reading them is free (a CPU tensor)."""
    if (
        not isinstance(prompt_lens, torch.Tensor)
        or prompt_lens.shape != (B,)
        or prompt_lens.dtype not in (torch.int32, torch.int64)
    ):
        raise fail("prompt_lens", f"an int32/int64 tensor of shape [B={B}]", describe(prompt_lens))
    # On the host it costs nothing to read (sizes outputs without a sync); on q's device is fine too.
    if prompt_lens.device not in (device, torch.device("cpu")):
        raise fail("prompt_lens", f"a tensor on the CPU or on {device}", describe(prompt_lens))
    # Under torch.compile the values are checked where they are read (host_prompt_lens).
    if prompt_lens.device.type == "cpu" and not torch.compiler.is_compiling():
        error = _bad_prompt_lens(prompt_lens.tolist(), P, what)
        if error is not None:
            raise error


def check_prompt_lens(prompt_lens: torch.Tensor | None, dims: Dims, device: torch.device) -> None:
    """prompt_lens: int [B] real prompt tokens per row (left padding), each in [0, P]."""
    if prompt_lens is not None:
        check_prompt_lens_tensor(prompt_lens, dims.B, dims.P, device)


def check_lse(lse: torch.Tensor | None, dims: Dims, q: torch.Tensor, score: str) -> None:
    if lse is None:
        return
    if score != "mask":
        raise fail(
            "lse",
            "None with score='window' (the window softmax runs over prompt keys only)",
            describe(lse),
        )
    if (
        not isinstance(lse, torch.Tensor)
        or lse.shape != (dims.B, dims.Hq, dims.M)
        or lse.dtype != torch.float32
    ):
        raise fail("lse", f"fp32 tensor [B={dims.B}, Hq={dims.Hq}, M={dims.M}]", describe(lse))
    check_same("lse", lse, q, "q", dtype=False)


def check_layer_budget(budget: object, arg: str = "budget") -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise fail(arg, "a non-negative int (average prompt KV pairs per KV head)", repr(budget))
    return budget


def check_head_budgets(budget: torch.Tensor, dims: Dims, device: torch.device) -> None:
    if budget.shape != (dims.B, dims.Hkv) or budget.dtype not in (torch.int32, torch.int64):
        raise fail(
            "budget", f"an int or an int tensor [B={dims.B}, Hkv={dims.Hkv}]", describe(budget)
        )
    if budget.device != device:
        raise fail("budget", f"a tensor on {device}", describe(budget))


def check_alpha(alpha: float | None, mode: str) -> float:
    if alpha is None:
        return DEFAULT_ALPHA[mode]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise fail("alpha", "a float in [0, 1]", repr(alpha))
    return float(alpha)


def check_choice(value: str, arg: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise fail(arg, f"one of {choices}", repr(value))
    return value


def check_pool(pool: str, pool_kernel: int) -> None:
    check_choice(pool, "pool", POOLS)
    if (
        isinstance(pool_kernel, bool)
        or not isinstance(pool_kernel, int)
        or pool_kernel < 1
        or pool_kernel % 2 == 0
    ):
        raise fail("pool_kernel", "an odd positive int (same padding)", repr(pool_kernel))


def check_scale(scale: float | None, D: int) -> float:
    """Softmax scale: a finite positive float; None = D ** -0.5 (D >= 1, checked with the shapes)."""
    if scale is None:
        if D < 1:
            raise fail("q", "head dim D >= 1", f"D={D}")
        return D**-0.5
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or not scale > 0
    ):
        raise fail("scale", "a finite positive float", repr(scale))
    return float(scale)


def check_scores(scores: torch.Tensor, arg: str = "scores") -> tuple[int, int, int]:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or scores.dtype != torch.float32:
        raise fail(arg, "an fp32 tensor [B, Hkv, P]", describe(scores))
    return tuple(scores.shape)


def check_mask_mass(
    mask_mass: torch.Tensor | None, B: int, Hkv: int, scores: torch.Tensor
) -> torch.Tensor:
    if mask_mass is None:
        raise fail(
            "mask_mass", f"an fp32 tensor [B={B}, Hkv={Hkv}] for mode='prompt_preference'", "None"
        )
    if (
        not isinstance(mask_mass, torch.Tensor)
        or mask_mass.shape != (B, Hkv)
        or not mask_mass.is_floating_point()
    ):
        raise fail("mask_mass", f"a float tensor [B={B}, Hkv={Hkv}]", describe(mask_mass))
    check_same("mask_mass", mask_mass, scores, "scores", dtype=False)
    return mask_mass


def _check_cache_fits(cache, q, B: int, Hq: int, D: int, expected: str) -> int:
    """The cache's request count, head count and head dim against q's (``expected``: what the
    error names), and cache.k on q's device and dtype; returns Hkv."""
    Hkv = cache.num_kv_heads
    if cache.batch_size != B or Hq % Hkv != 0:
        raise fail("cache", expected, f"B={cache.batch_size}, Hkv={Hkv}")
    if cache.head_dim != D:
        raise fail("cache", f"head dim D={D} (q is {tuple(q.shape)})", f"D={cache.head_dim}")
    check_same("cache.k", cache.k, q, "q")
    return Hkv


def check_ragged_attention(
    q: torch.Tensor, cache, k_tail, v_tail
) -> tuple[int, int, int, int, int, int]:
    """q: [B, Hq, Lq, D]; cache: RaggedKV with B*Hkv segments; k_tail, v_tail: [B, Hkv, Lt, D]."""
    from ._ragged import RaggedKV

    check_tensor(q, "q", "[B, Hq, Lq, D]", 4)
    if not isinstance(cache, RaggedKV):
        raise fail("cache", "a RaggedKV", describe(cache))
    B, Hq, Lq, D = q.shape
    if B == 0 or Hq == 0 or D == 0:
        raise fail("q", "[B, Hq, Lq, D] with B, Hq, D >= 1", describe(q))
    Hkv = _check_cache_fits(
        cache, q, B, Hq, D, f"a RaggedKV with B={B} rows and Hkv dividing Hq={Hq}"
    )
    if (k_tail is None) != (v_tail is None):
        raise fail("v_tail" if v_tail is None else "k_tail", "given together with its pair", "None")
    Lt = 0
    if k_tail is not None:
        check_tensor(k_tail, "k_tail", "[B, Hkv, Lt, D]", 4)
        if k_tail.shape[0] != B or k_tail.shape[1] != Hkv or k_tail.shape[3] != D:
            raise fail("k_tail", f"[B={B}, Hkv={Hkv}, Lt, D={D}]", describe(k_tail))
        check_tensor(v_tail, "v_tail", "[B, Hkv, Lt, D]", 4)
        if v_tail.shape != k_tail.shape:
            raise fail("v_tail", f"k_tail's shape {tuple(k_tail.shape)}", describe(v_tail))
        check_same("k_tail", k_tail, q, "q")
        check_same("v_tail", v_tail, q, "q")
        Lt = k_tail.shape[2]
    return B, Hq, Hkv, Lq, D, Lt


@dataclass(frozen=True)
class VarlenDims:
    """Sizes of one varlen ``ragged_attention`` call (all host ints)."""

    B: int
    Nq: int
    Hq: int
    Hkv: int
    D: int
    Nt: int  # rows of k_tail / v_tail (0 without a tail)
    max_seqlen_q: int
    max_seqlen_tail: int  # host bound on a request's tail rows (0 without a tail)


def _check_cu(cu: object, arg: str, B: int, device: torch.device, rows: int, rows_doc: str):
    """cu: int32 [B + 1] on ``device``; on the CPU also 0 first, non-decreasing, last <= rows.
    Returns the lengths as a host list on the CPU, else None."""
    if (
        not isinstance(cu, torch.Tensor)
        or cu.dtype != torch.int32
        or cu.shape != (B + 1,)
        or cu.device != device
    ):
        raise fail(arg, f"an int32 tensor [B + 1 = {B + 1}] on {device}", describe(cu))
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or min(lengths, default=0) < 0 or values[-1] > rows:
        raise fail(arg, f"0 first, non-decreasing, last <= {rows_doc}={rows}", values)
    return lengths


def _check_bound(bound: object, arg: str, lengths: list[int] | None, what: str) -> int:
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
        raise fail(arg, f"an int >= 0 (host upper bound on {what})", repr(bound))
    if lengths and max(lengths) > bound:
        raise fail(arg, f"an int >= the longest {what} ({max(lengths)})", bound)
    return bound


def check_ragged_attention_varlen(
    q: torch.Tensor,
    cache,
    k_tail,
    v_tail,
    cu_seqlens_q,
    max_seqlen_q,
    cu_seqlens_tail,
    max_seqlen_tail,
    tail_starts,
) -> VarlenDims:
    """q: [Nq, Hq, D]; cache: RaggedKV with B*Hkv segments (B = len(cu_seqlens_q) - 1);
    k_tail, v_tail: [Nt, Hkv, D] with cu_seqlens_tail int32 [B + 1] (and tail_starts int64 [B]).

    Values (offsets, bounds, starts) are checked on CPU tensors only (free to read)."""
    from ._ragged import RaggedKV

    check_tensor(q, "q", "[Nq, Hq, D] (packed queries, with cu_seqlens_q)", 3)
    Nq, Hq, D = q.shape
    if Hq == 0 or D == 0:
        raise fail("q", "[Nq, Hq, D] with Hq, D >= 1", describe(q))
    if not isinstance(cache, RaggedKV):
        raise fail("cache", "a RaggedKV", describe(cache))
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1:
        raise fail("cu_seqlens_q", "an int32 tensor [B + 1]", describe(cu_seqlens_q))
    B = cu_seqlens_q.numel() - 1
    Hkv = _check_cache_fits(
        cache, q, B, Hq, D,
        f"a RaggedKV over B={B} requests (len(cu_seqlens_q) - 1) with Hkv dividing Hq={Hq}",
    )  # fmt: skip
    q_lens = _check_cu(cu_seqlens_q, "cu_seqlens_q", B, q.device, Nq, "Nq")
    max_seqlen_q = _check_bound(max_seqlen_q, "max_seqlen_q", q_lens, "request's queries")
    if (k_tail is None) != (v_tail is None):
        raise fail("v_tail" if v_tail is None else "k_tail", "given together with its pair", "None")
    if k_tail is None:
        for arg, value in (
            ("cu_seqlens_tail", cu_seqlens_tail),
            ("max_seqlen_tail", max_seqlen_tail),
            ("tail_starts", tail_starts),
        ):
            if value is not None:
                raise fail(arg, "None without k_tail / v_tail", describe(value))
        return VarlenDims(B, Nq, Hq, Hkv, D, 0, max_seqlen_q, 0)
    check_tensor(k_tail, "k_tail", "[Nt, Hkv, D]", 3)
    if k_tail.shape[1] != Hkv or k_tail.shape[2] != D:
        raise fail("k_tail", f"[Nt, Hkv={Hkv}, D={D}]", describe(k_tail))
    check_tensor(v_tail, "v_tail", "[Nt, Hkv, D]", 3)
    if v_tail.shape != k_tail.shape:
        raise fail("v_tail", f"k_tail's shape {tuple(k_tail.shape)}", describe(v_tail))
    check_same("k_tail", k_tail, q, "q")
    check_same("v_tail", v_tail, q, "q")
    Nt = k_tail.shape[0]
    if cu_seqlens_tail is None:
        raise fail("cu_seqlens_tail", f"an int32 tensor [B + 1 = {B + 1}] with k_tail", "None")
    # With tail_starts the tails may sit anywhere in the Nt rows: only the starts are bounded.
    end_bound = Nt if tail_starts is None else 2**31 - 1
    t_lens = _check_cu(cu_seqlens_tail, "cu_seqlens_tail", B, q.device, end_bound, "Nt")
    if max_seqlen_tail is None:
        max_seqlen_tail = Nt  # a request's tail is at most all of k_tail
    max_seqlen_tail = _check_bound(max_seqlen_tail, "max_seqlen_tail", t_lens, "request's tail")
    if tail_starts is not None:
        if (
            not isinstance(tail_starts, torch.Tensor)
            or tail_starts.dtype != torch.int64
            or tail_starts.shape != (B,)
            or tail_starts.device != q.device
        ):
            raise fail(
                "tail_starts", f"an int64 tensor [B={B}] on {q.device}", describe(tail_starts)
            )
        if t_lens is not None:
            starts = tail_starts.tolist()
            for b, (start, n) in enumerate(zip(starts, t_lens)):
                if start < 0 or start + n > Nt:
                    raise fail(
                        "tail_starts",
                        f"values keeping every tail inside the Nt={Nt} rows of k_tail",
                        f"request {b} at rows [{start}, {start + n})",
                    )
    return VarlenDims(B, Nq, Hq, Hkv, D, Nt, max_seqlen_q, max_seqlen_tail)
