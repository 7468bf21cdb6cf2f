"""Mixture-of-experts execution shared by the MoE model files (LLaDA2, LLaDA-MoE).

The routers differ per family and live in the model files; both hand this module the same
question: "run token ``token_of[s]`` through expert ``expert_of[s]`` for every slot s". The slots
are sorted by expert (a stable sort, so a token's slots keep the order the caller gave them) and
each expert runs once on its contiguous rows:

- ``"loop"``: one ``F.linear`` chain per expert on its rows, the official files' computation
  (bit for bit, so NoCache reproduces them); it reads the per-expert row counts on the host.
- ``"grouped"``: two ``torch._grouped_mm`` calls over all experts at once (gate and up fused
  into one [E, 2F, d] weight). The row offsets stay on the device: no host sync, so a later step
  that routes tokens can still be captured in a CUDA graph. The stacked weights are built once
  and the experts' own parameters become views of them (no second copy).

``"auto"`` takes ``"grouped"`` on CUDA in bf16 / fp16 where the build has ``torch._grouped_mm``,
else ``"loop"``. ``MOE_BACKEND`` (module attribute) overrides it for every expert bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MOE_BACKEND", "ExpertList", "ExpertMLP", "cuda_graph_safe", "moe_backend_for"]

#: "auto", "loop" or "grouped" for every ``ExpertBank`` (tests and benchmarks set it).
MOE_BACKEND = "auto"
_BACKENDS = ("auto", "loop", "grouped")


class ExpertMLP(nn.Module):
    """A SiLU-gated MLP under the official names ``gate_proj``, ``up_proj``, ``down_proj``:
    down(silu(gate(x)) * up(x)). The experts, the shared experts and the dense layers of both
    MoE families are this block."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def moe_backend_for(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend ("loop" or "grouped") that runs tokens ``x`` (see the module docstring)."""
    backend = MOE_BACKEND if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    grouped = (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype in (torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
    )
    return "grouped" if grouped else "loop"


def cuda_graph_safe(model: nn.Module) -> bool:
    """Whether ``model``'s MoE layers (if any) run without a host sync in inference (the
    grouped backend), so that a step can be captured in a CUDA graph."""
    banks = [m for m in model.modules() if isinstance(m, ExpertList)]
    if not banks:
        return True
    if MOE_BACKEND != "auto":
        return MOE_BACKEND == "grouped"
    weight = banks[0][0].gate_proj.weight
    return (
        weight.is_cuda
        and hasattr(torch, "_grouped_mm")
        and weight.dtype in (torch.bfloat16, torch.float16)
    )


class ExpertList(nn.ModuleList):
    """E ``ExpertMLP`` under the official names (``experts.{e}.gate_proj.weight`` ...) and the
    grouped execution of all of them (``run``), optionally with extra MLPs of the same width
    stacked behind them (a shared expert, fused into the same grouped pass).

    Args:
        hidden_size: d. intermediate_size: F of every expert. num_experts: E.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__(ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts))
        self._stack: tuple | None = None  # (key, gate_up [E', 2F, d], down [E', d, F])

    def run(
        self,
        x: torch.Tensor,
        expert_of: torch.Tensor,
        token_of: torch.Tensor,
        *,
        extra: tuple[nn.Module, ...] = (),
        backend: str | None = None,
    ) -> torch.Tensor:
        """Per-slot expert outputs.

        x: [N, d] tokens; expert_of: int [S] expert of each slot, in [0, E + len(extra)) (ids
        >= E name the ``extra`` MLPs, which must have the experts' width for the grouped
        backend); token_of: int [S] the token of each slot. Returns [S, d] in x's dtype,
        unweighted, in slot order.
        """
        mlps = (*self, *extra)
        order = expert_of.argsort(stable=True)  # slots grouped by expert, caller order inside
        rows = x.index_select(0, token_of.index_select(0, order))
        if moe_backend_for(x, backend) == "grouped":
            out_sorted = self._grouped(rows, expert_of.index_select(0, order), mlps)
        else:
            out_sorted = self._loop(rows, expert_of, mlps)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out

    @staticmethod
    def _loop(rows: torch.Tensor, expert_of: torch.Tensor, mlps) -> torch.Tensor:
        counts = torch.bincount(expert_of, minlength=len(mlps)).tolist()  # host sync
        outs, start = [], 0
        for mlp, n in zip(mlps, counts):
            if n:
                outs.append(mlp(rows[start : start + n]))
                start += n
        return torch.cat(outs) if outs else rows.new_empty(0, rows.shape[-1])

    def _grouped(self, rows: torch.Tensor, sorted_experts: torch.Tensor, mlps) -> torch.Tensor:
        gate_up, down = self._stacked(mlps)
        # Row offsets from a scatter-add (bincount would read its maximum on the host).
        counts = torch.zeros(len(mlps), dtype=torch.int32, device=rows.device)
        counts.index_add_(0, sorted_experts, torch.ones_like(sorted_experts, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        h = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs)  # [S, 2F]
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)

    def _stacked(self, mlps) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [E', 2F, d] and down [E', d, F] for ``mlps``; every MLP's weights become views
        of them, so the stack costs no second copy and ``state_dict`` is unchanged. Rebuilt when
        the parameters moved (``model.to(...)`` replaces them)."""
        first = mlps[0].gate_proj.weight
        key = (len(mlps), first.data_ptr(), first.dtype, first.device)
        if self._stack is not None and self._stack[0] == key:
            return self._stack[1], self._stack[2]
        F_ = first.shape[0]
        gate_up = torch.empty(
            len(mlps), 2 * F_, first.shape[1], dtype=first.dtype, device=first.device
        )
        down = torch.empty(len(mlps), first.shape[1], F_, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for e, mlp in enumerate(mlps):
                gate_up[e, :F_].copy_(mlp.gate_proj.weight)
                gate_up[e, F_:].copy_(mlp.up_proj.weight)
                down[e].copy_(mlp.down_proj.weight)
                mlp.gate_proj.weight.data = gate_up[e, :F_]
                mlp.up_proj.weight.data = gate_up[e, F_:]
                mlp.down_proj.weight.data = down[e]
        key = (len(mlps), mlps[0].gate_proj.weight.data_ptr(), first.dtype, first.device)
        self._stack = (key, gate_up, down)
        return gate_up, down
