"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): a Qwen2.5 transformer turned into a masked
diffusion language model by running it bidirectionally.

This file loads the official checkpoints unchanged: Qwen2 config fields and tensor names
(`model.layers.{i}.self_attn.q_proj.weight`, `lm_head.weight`, ...), q/k/v projections with bias,
the output projection without. Dream predicts token i from position i-1 (shifted logits); that
shift belongs to the generation loop, the model returns plain per-position logits like the
official `DreamModel`.

Layer:  h = x + o_proj(attention(input_layernorm(x)))
        y = h + down_proj(silu(gate_proj(post_attention_layernorm(h))) * up_proj(...))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ._common import (
    DiffusionLMMixin,
    RMSNorm,
    apply_rotary,
    merge_heads,
    rotary_cos_sin,
    split_heads,
)


class DreamConfig(PretrainedConfig):
    """Configuration of a Dream model, field for field the official config.json (Qwen2 names).

    Defaults are Dream-7B's. `head_dim` is derived (hidden_size / num_attention_heads), as in the
    official code.
    """

    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int = 151666,
        bos_token_id: int | None = 151643,
        eos_token_id: int = 151643,
        pad_token_id: int = 151643,
        **kwargs: Any,
    ) -> None:
        if rope_scaling is not None and rope_scaling.get(
            "rope_type", rope_scaling.get("type")
        ) not in (
            None,
            "default",
        ):
            # Not stored: transformers 5 turns a `rope_scaling` attribute into `rope_parameters`.
            raise NotImplementedError(f"Dream rope_scaling={rope_scaling!r} is not supported")
        kwargs.pop("head_dim", None)  # derived, see the property
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        )
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_supported(config: DreamConfig) -> None:
    if config.hidden_act != "silu":
        raise NotImplementedError(f"Dream hidden_act={config.hidden_act!r} is not supported")
    if getattr(config, "tie_word_embeddings", False):
        raise NotImplementedError("Dream with tie_word_embeddings=True is not supported")
    if config.use_sliding_window:
        # The official code also ignores it outside flash-attention-2; refuse rather than guess.
        raise NotImplementedError("Dream with use_sliding_window=True is not supported")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


class DreamAttention(nn.Module):
    """Holds the attention projections (`self_attn.{q,k,v,o}_proj`); the math is in the layer."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * head_dim, config.hidden_size, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """One Qwen2 decoder layer run bidirectionally, split into the three steps of the layer
    protocol so a caller can run attention its own way between them."""

    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [B, T, d]; cos, sin: fp32 [B, T, D] for these T tokens.
        Returns q [B, Hq, T, D], k [B, Hkv, T, D] (both rotated), v [B, Hkv, T, D]."""
        attn = self.self_attn
        x = self.input_layernorm(hidden)
        q = split_heads(attn.q_proj(x), attn.num_heads)
        k = split_heads(attn.k_proj(x), attn.num_kv_heads)
        v = split_heads(attn.v_proj(x), attn.num_kv_heads)
        # Qwen2-style RoPE: cos/sin cast to the model dtype, rotation in that dtype.
        return (
            apply_rotary(q, cos, sin, full_precision=False),
            apply_rotary(k, cos, sin, full_precision=False),
            v,
        )

    def attn_output(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] (the layer input); attn: [B, Hq, T, D] -> [B, T, d]."""
        return hidden + self.self_attn.o_proj(merge_heads(attn))

    def mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DreamBaseModel(nn.Module):
    """Holds the weights under the official names: `embed_tokens`, `layers`, `norm`."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # nn.init functions (not Tensor methods): transformers 5 wraps them during loading so
        # weights that came from the checkpoint are never overwritten.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class DreamModelLM(DiffusionLMMixin, DreamPreTrainedModel):
    """Dream with its LM head; `model(input_ids, attention_mask).logits` is the full bidirectional
    forward (unshifted: logits[:, i] predicts token i + 1, as in the official model)."""

    dllm_kind = "dream"

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- layer protocol ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, each with `qkv`, `attn_output`, `mlp_block`."""
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int [B, T] -> hidden [B, T, d]."""
        return self.model.embed_tokens(input_ids)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: int [B, T] -> (cos, sin), fp32 [B, T, head_dim] each."""
        return rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> logits [B, T, vocab_size] (final norm + LM head)."""
        return self.lm_head(self.model.norm(hidden))

    # -- transformers plumbing -----------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
# The official auto_map names AutoModel; masked LM is what Dream is.
for _auto in (AutoModel, AutoModelForMaskedLM):
    _auto.register(DreamConfig, DreamModelLM, exist_ok=True)
