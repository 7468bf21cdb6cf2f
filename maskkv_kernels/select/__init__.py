"""``select_and_gather`` and its steps: mask / window scoring, head budgets, top-k and gather.

- :mod:`.op`: the public functions (validation, backend dispatch, ``torch.library`` custom ops);
- :mod:`.triton_scores`: kernel A (score reduction) and window pooling;
- :mod:`.triton_topk`: kernel B (radix top-k fused with the K/V gather);
- :mod:`.torch_impl`: the vectorised, chunked PyTorch backend;
- :mod:`.module`: :class:`MaskKVSelector`, the per-layer ``nn.Module``.

Triton is imported only when the Triton backend runs.
"""

from .module import MaskKVSelector
from .op import mask_scores, select_and_gather, topk_gather, window_scores

__all__ = ["MaskKVSelector", "mask_scores", "select_and_gather", "topk_gather", "window_scores"]
