"""The elementwise work of a transformer layer, fused: RMSNorm (with the residual add before it),
rotary embedding of q and k, the SiLU-gated product.

- :mod:`.op`: the public functions (validation, backend dispatch, ``torch.library`` custom ops);
- :mod:`.triton_elementwise`: the Triton kernels;
- :mod:`.torch_impl`: the eager PyTorch code they replace (reference, and what
  ``torch.compile`` fuses).

A later denoising step runs a few hundred small kernels; these ops turn the ~30 elementwise
launches of a layer into 5 (``maskkv.models.fused``). Triton is imported only when used.
"""

from .op import rms_norm, rotary, silu_mul

__all__ = ["rms_norm", "rotary", "silu_mul"]
