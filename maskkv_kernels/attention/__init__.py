"""Ragged attention: each KV head attends over [its kept prompt segment ‖ the dense tail].

- :func:`ragged_attention`: the public op (backends "auto", "triton", "cpp", "torch", "reference"),
  registered as the custom ops ``torch.ops.maskkv.ragged_attention`` (dense form) and
  ``torch.ops.maskkv.ragged_attention_varlen`` (requests at different positions) with fake
  implementations.
- :class:`RaggedAttention`: a thin ``nn.Module`` for model code.

The Triton kernel lives in ``triton_ragged`` (imported lazily, so the package imports without
Triton), the adapter onto the C++ kernels in ``cpp_impl``, the vectorised torch path in
``torch_impl``; each serves both forms.
"""

from .module import RaggedAttention
from .op import ragged_attention

__all__ = ["RaggedAttention", "ragged_attention"]
