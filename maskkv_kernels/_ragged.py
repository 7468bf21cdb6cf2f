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

    Attributes:
        k: [N, D] kept keys (after RoPE), N = sum of kept lengths.
        v: [N, D] kept values, same dtype and device as ``k``.
        cu_seqlens: int32 [B * Hkv + 1], cumulative segment lengths, ``cu_seqlens[0] == 0``.
        positions: int32 [N], original token position of every kept row.
        max_seqlen: an upper bound on the longest segment (exact when it is known on the host
            without a device sync; kernels only use it to size their grids).
        num_kv_heads: Hkv, so that ``B = (len(cu_seqlens) - 1) // Hkv``.
    """

    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int
    num_kv_heads: int

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
        # Value checks need the data on the host; do them for free on CPU only (no device sync),
        # and never under tracing (torch.compile): there the values are not known yet, and the
        # ops that build a RaggedKV produce consistent offsets by construction.
        if cu.device.type == "cpu" and not torch.compiler.is_compiling():
            lengths = cu[1:] - cu[:-1]
            if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) != k.shape[0]:
                raise ValueError(
                    f"RaggedKV: cu_seqlens must start at 0, be non-decreasing and end at N={k.shape[0]}"
                )
            if lengths.numel() and int(lengths.max()) > self.max_seqlen:
                raise ValueError(
                    f"RaggedKV: max_seqlen={self.max_seqlen} is below the longest segment "
                    f"({int(lengths.max())})"
                )

    @property
    def batch_size(self) -> int:
        return (self.cu_seqlens.numel() - 1) // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.k.shape[1]

    def lengths(self) -> torch.Tensor:
        """Kept length of every segment: int32 [B, Hkv]."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).view(self.batch_size, self.num_kv_heads)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values, positions and offsets)."""
        return sum(
            t.numel() * t.element_size() for t in (self.k, self.v, self.positions, self.cu_seqlens)
        )

    def to_padded(
        self, fill: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copy for debugging and tests (syncs with the device).

        Returns ``k``, ``v``: [B, Hkv, Lmax, D] (``fill`` past each segment's end), ``positions``:
        int64 [B, Hkv, Lmax] (-1 past the end) and ``valid``: bool [B, Hkv, Lmax].
        """
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        lengths = self.lengths().reshape(-1).long()
        lmax = int(lengths.max()) if lengths.numel() else 0
        seg = torch.repeat_interleave(torch.arange(B * H, device=self.k.device), lengths)
        offs = (
            torch.arange(self.k.shape[0], device=self.k.device) - self.cu_seqlens[:-1].long()[seg]
        )
        k = self.k.new_full((B * H, lmax, D), fill)
        v = self.v.new_full((B * H, lmax, D), fill)
        pos = torch.full((B * H, lmax), -1, dtype=torch.long, device=self.k.device)
        k[seg, offs] = self.k
        v[seg, offs] = self.v
        pos[seg, offs] = self.positions.long()
        return (
            k.view(B, H, lmax, D),
            v.view(B, H, lmax, D),
            pos.view(B, H, lmax),
            (pos >= 0).view(B, H, lmax),
        )

    def to(self, device: torch.device | str) -> RaggedKV:
        return RaggedKV(
            self.k.to(device),
            self.v.to(device),
            self.cu_seqlens.to(device),
            self.positions.to(device),
            self.max_seqlen,
            self.num_kv_heads,
        )


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
