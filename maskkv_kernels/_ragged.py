"""`RaggedKV`: the pruned prompt cache of one layer, one variable-length segment per (batch, KV head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RaggedKV"]


@dataclass
class RaggedKV:
    """Per-head-budget prompt KV cache of one layer.

    Segment ``(b, g)`` (batch row ``b``, KV head ``g``) is stored at index ``s = b * Hkv + g`` and
    holds rows ``cu_seqlens[s] : cu_seqlens[s + 1]`` of ``k``, ``v`` and ``positions``, in
    ascending position order.

    With ``seg_starts`` the cache is a view into a pool: segment ``s`` holds rows
    ``seg_starts[s] : seg_starts[s] + (cu_seqlens[s + 1] - cu_seqlens[s])`` of ``k``, ``v`` and
    ``positions``, which are then the whole pool (N pool rows; disjoint segments in any order,
    with holes of any content between them). Lengths always come from ``cu_seqlens``. An engine
    keeps every request's pruned cache of a layer in one preallocated pool this way, and frees
    or reuses a request's rows without concatenating the others.

    Attributes:
        k: [N, D] kept keys (after RoPE), N = sum of kept lengths (with ``seg_starts``: the
            pool's rows).
        v: [N, D] kept values, same dtype and device as ``k``.
        cu_seqlens: int32 [B * Hkv + 1], cumulative segment lengths, ``cu_seqlens[0] == 0``.
        positions: int32 [N], original token position of every kept row.
        max_seqlen: an upper bound on the longest segment (exact when it is known on the host
            without a device sync; kernels only use it to size their grids).
        num_kv_heads: Hkv, so that ``B = (len(cu_seqlens) - 1) // Hkv``.
        seg_starts: optional int64 [B * Hkv], first row of every segment in ``k`` / ``v`` /
            ``positions`` (None: ``cu_seqlens[:-1]``, the packed layout).
    """

    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int
    num_kv_heads: int
    seg_starts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k, v = self.k, self.v
        if not isinstance(k, torch.Tensor) or k.dim() != 2:
            raise ValueError(f"RaggedKV: k must be a [N, D] tensor, got {_shape(k)}")
        if not isinstance(v, torch.Tensor) or v.shape != k.shape:
            raise ValueError(f"RaggedKV: v must have k's shape {tuple(k.shape)}, got {_shape(v)}")
        if v.dtype != k.dtype or v.device != k.device:
            raise ValueError(
                f"RaggedKV: v must match k's dtype/device ({k.dtype}, {k.device}), "
                f"got ({v.dtype}, {v.device})"
            )
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(
                f"RaggedKV: num_kv_heads must be a positive int, got {self.num_kv_heads}"
            )
        cu = self.cu_seqlens
        if (
            not isinstance(cu, torch.Tensor)
            or cu.dim() != 1
            or cu.dtype != torch.int32
            or (cu.numel() - 1) % self.num_kv_heads != 0
            or cu.numel() < 2
        ):
            raise ValueError(
                f"RaggedKV: cu_seqlens must be int32 [B * Hkv + 1] with Hkv={self.num_kv_heads}, "
                f"got {_shape(cu)} {getattr(cu, 'dtype', None)}"
            )
        pos = self.positions
        if (
            not isinstance(pos, torch.Tensor)
            or pos.shape != (k.shape[0],)
            or pos.dtype != torch.int32
        ):
            raise ValueError(
                f"RaggedKV: positions must be int32 [N={k.shape[0]}], got {_shape(pos)} "
                f"{getattr(pos, 'dtype', None)}"
            )
        if cu.device != k.device or pos.device != k.device:
            raise ValueError(f"RaggedKV: cu_seqlens and positions must be on {k.device}")
        if not isinstance(self.max_seqlen, int) or self.max_seqlen < 0:
            raise ValueError(
                f"RaggedKV: max_seqlen must be a non-negative int, got {self.max_seqlen}"
            )
        starts = self.seg_starts
        S = cu.numel() - 1
        if starts is not None and (
            not isinstance(starts, torch.Tensor)
            or starts.shape != (S,)
            or starts.dtype != torch.int64
            or starts.device != k.device
        ):
            raise ValueError(
                f"RaggedKV: seg_starts must be None or int64 [B * Hkv={S}] on {k.device}, got "
                f"{_shape(starts)} {getattr(starts, 'dtype', None)} "
                f"{getattr(starts, 'device', None)}"
            )
        # Value checks need the data on the host; do them for free on CPU only (no device sync),
        # and never under tracing (torch.compile): there the values are not known yet, and the
        # ops that build a RaggedKV produce consistent offsets by construction.
        if cu.device.type == "cpu" and not torch.compiler.is_compiling():
            lengths = cu[1:] - cu[:-1]
            N = k.shape[0]
            packed_end = starts is None and int(cu[-1]) != N
            if int(cu[0]) != 0 or bool((lengths < 0).any()) or packed_end:
                raise ValueError(
                    "RaggedKV: cu_seqlens must start at 0, be non-decreasing"
                    + (f" and end at N={N}" if starts is None else "")
                )
            if lengths.numel() and int(lengths.max()) > self.max_seqlen:
                raise ValueError(
                    f"RaggedKV: max_seqlen={self.max_seqlen} is below the longest segment "
                    f"({int(lengths.max())})"
                )
            if starts is not None:
                _check_pool_segments(starts, lengths.long(), N)

    @property
    def batch_size(self) -> int:
        return (self.cu_seqlens.numel() - 1) // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.k.shape[1]

    def lengths(self) -> torch.Tensor:
        """Kept length of every segment: int32 [B, Hkv]."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).view(self.batch_size, self.num_kv_heads)

    def starts(self) -> torch.Tensor:
        """First row of every segment in ``k`` / ``v`` / ``positions``: int64 [B * Hkv]."""
        if self.seg_starts is not None:
            return self.seg_starts
        return self.cu_seqlens[:-1].long()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: keys, values, positions and offsets.

        With ``seg_starts`` (a view into a pool) it counts the rows the segments cover
        (``cu_seqlens[-1]`` rows of K, V and positions) plus the offset tensors: what this cache
        occupies inside the pool, not the pool's size (its owner counts that). That reads
        ``cu_seqlens[-1]``: one device sync on CUDA (none without ``seg_starts``).
        """
        offsets = [self.cu_seqlens] + ([] if self.seg_starts is None else [self.seg_starts])
        offset_bytes = sum(t.numel() * t.element_size() for t in offsets)
        rows = self.k.shape[0] if self.seg_starts is None else int(self.cu_seqlens[-1])
        row_bytes = (
            self.k.shape[1] * self.k.element_size()
            + self.v.shape[1] * self.v.element_size()
            + self.positions.element_size()
        )
        return rows * row_bytes + offset_bytes

    def to_padded(
        self, fill: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copy for debugging and tests (syncs with the device).

        Returns ``k``, ``v``: [B, Hkv, Lmax, D] (``fill`` past each segment's end), ``positions``:
        int64 [B, Hkv, Lmax] (-1 past the end) and ``valid``: bool [B, Hkv, Lmax].
        """
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        seg, offs, rows = self._row_index()
        lmax = int(offs.max()) + 1 if offs.numel() else 0
        k = self.k.new_full((B * H, lmax, D), fill)
        v = self.v.new_full((B * H, lmax, D), fill)
        pos = torch.full((B * H, lmax), -1, dtype=torch.long, device=self.k.device)
        k[seg, offs] = self.k[rows]
        v[seg, offs] = self.v[rows]
        pos[seg, offs] = self.positions[rows].long()
        return (
            k.view(B, H, lmax, D),
            v.view(B, H, lmax, D),
            pos.view(B, H, lmax),
            (pos >= 0).view(B, H, lmax),
        )

    def _row_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int64 [n] each for the n = cu_seqlens[-1] kept rows, in segment order: segment,
        offset inside it, row in ``k`` (syncs with the device)."""
        lengths = self.lengths().reshape(-1).long()
        device = self.k.device
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        offs = torch.arange(seg.numel(), device=device) - self.cu_seqlens[:-1].long()[seg]
        return seg, offs, self.starts()[seg] + offs

    def compact(self) -> RaggedKV:
        """A packed copy (no ``seg_starts``, N = sum of lengths); syncs with the device.
        Without ``seg_starts`` it returns ``self``."""
        if self.seg_starts is None:
            return self
        _, _, rows = self._row_index()
        return RaggedKV(
            self.k[rows],
            self.v[rows],
            self.cu_seqlens.clone(),
            self.positions[rows],
            self.max_seqlen,
            self.num_kv_heads,
        )

    def to(self, device: torch.device | str) -> RaggedKV:
        return RaggedKV(
            self.k.to(device),
            self.v.to(device),
            self.cu_seqlens.to(device),
            self.positions.to(device),
            self.max_seqlen,
            self.num_kv_heads,
            None if self.seg_starts is None else self.seg_starts.to(device),
        )


def _check_pool_segments(starts: torch.Tensor, lengths: torch.Tensor, N: int) -> None:
    """Every segment inside the N rows, no two (non-empty) segments sharing a row."""
    ends = starts + lengths
    bad = (starts < 0) | (ends > N)
    if bool(bad.any()):
        s = int(bad.nonzero()[0])
        raise ValueError(
            f"RaggedKV: seg_starts must keep every segment inside the N={N} rows of k, got "
            f"segment {s} at rows [{int(starts[s])}, {int(ends[s])})"
        )
    live = (lengths > 0).nonzero().view(-1)
    order = live[starts[live].argsort()]
    overlap = ends[order[:-1]] > starts[order[1:]]
    if bool(overlap.any()):
        i = int(overlap.nonzero()[0])
        a, b = int(order[i]), int(order[i + 1])
        raise ValueError(
            f"RaggedKV: seg_starts must give segments disjoint rows, got segments {a} "
            f"[{int(starts[a])}, {int(ends[a])}) and {b} [{int(starts[b])}, {int(ends[b])})"
        )


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
