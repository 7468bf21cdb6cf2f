"""Ragged attention: each KV head attends over [its kept prompt segment ‖ the dense tail].

- :func:`ragged_attention`: the public op (backends "auto", "triton", "cpp", "torch", "reference"),
  registered as the custom op ``torch.ops.maskkv.ragged_attention`` with a fake implementation.
- :class:`RaggedAttention`: a thin ``nn.Module`` for model code.

The Triton kernel lives in ``triton_ragged`` (imported lazily, so the package imports without
Triton); the vectorised CPU path in ``torch_impl``.
"""

from .module import RaggedAttention
from .op import ragged_attention

__all__ = ["RaggedAttention", "ragged_attention"]
