"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct): an OLMo-style bidirectional transformer trained as a
masked diffusion language model.

This file loads the official checkpoints unchanged: the config.json fields (`d_model`, `n_heads`,
...) and the tensor names (`model.transformer.blocks.{i}.q_proj.weight`, ...) are the ones of the
official `modeling_llada.py`, whose math it reproduces for the configuration every released LLaDA
checkpoint uses (`block_type="llama"`, RMSNorm, RoPE, SiLU-gated MLP, no biases, untied head).

Block:  h = x + attn_out(attention(attn_norm(x)))
        y = h + ff_out(silu(ff_proj(ff_norm(h))) * up_proj(ff_norm(h)))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
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


class LLaDAConfig(PretrainedConfig):
    """Configuration of a LLaDA model, field for field the official config.json.

    Defaults are LLaDA-8B's. Besides the official names, the uniform names the rest of maskkv reads
    work on both model families: `hidden_size`, `num_attention_heads`, `num_hidden_layers`,
    `num_key_value_heads`, `head_dim`, `intermediate_size`, `mask_token_id`, `eos_token_id`,
    `pad_token_id`.
    """

    model_type = "llada"
    # Uniform names -> LLaDA names (read and written through).
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = 32,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        mlp_ratio: int = 4,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope: bool = True,
        rope_theta: float = 500000.0,
        rope_full_precision: bool = True,
        rms_norm_eps: float = 1e-5,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        scale_logits: bool = False,
        input_emb_norm: bool = False,
        block_type: str = "llama",
        activation_type: str = "silu",
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        bias_for_layer_norm: bool | None = False,
        attention_layer_norm: bool = False,
        alibi: bool = False,
        block_group_size: int = 1,
        multi_query_attention: bool | None = None,
        init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.scale_logits = scale_logits
        self.input_emb_norm = input_emb_norm
        self.block_type = block_type
        self.activation_type = activation_type
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.bias_for_layer_norm = bias_for_layer_norm
        self.attention_layer_norm = attention_layer_norm
        self.alibi = alibi
        self.block_group_size = block_group_size
        self.multi_query_attention = multi_query_attention
        self.init_std = init_std
        # Derived (the properties below). A LLaDA-MoE config.json also says model_type "llada"
        # (AutoConfig, e.g. under AutoTokenizer, reads it as this class) and sets some of them.
        for derived in ("num_key_value_heads", "head_dim", "intermediate_size"):
            kwargs.pop(derived, None)
        # The head is tied by `weight_tying`, handled in `LLaDAModelLM.head`; transformers' own
        # tying (whose default is on in transformers 4) must never touch `ff_out`.
        kwargs["tie_word_embeddings"] = False
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def num_key_value_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def intermediate_size(self) -> int:
        return (
            self.mlp_hidden_size
            if self.mlp_hidden_size is not None
            else self.mlp_ratio * self.d_model
        )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the LM head (`embedding_size`, or `vocab_size`)."""
        return self.embedding_size or self.vocab_size


def _check_supported(config: LLaDAConfig) -> None:
    """The official code has options no released checkpoint uses; refuse them loudly instead of
    computing something else."""
    required = {
        "rope": (config.rope, True),
        "alibi": (config.alibi, False),
        "block_type": (str(config.block_type), "llama"),
        "activation_type": (str(config.activation_type), "silu"),
        "layer_norm_type": (str(config.layer_norm_type), "rms"),
        "layer_norm_with_affine": (config.layer_norm_with_affine, True),
        "attention_layer_norm": (config.attention_layer_norm, False),
        "block_group_size": (config.block_group_size, 1),
    }
    for name, (value, wanted) in required.items():
        if value != wanted:
            raise NotImplementedError(
                f"LLaDA config {name}={value!r} is not supported (only {wanted!r})"
            )
    # As in the official code, `bias_for_layer_norm=None` inherits `include_bias`.
    ln_bias = config.bias_for_layer_norm
    if ln_bias is None:
        ln_bias = config.include_bias
    if ln_bias:
        raise NotImplementedError("LLaDA layer-norm biases are not supported")
    if config.d_model % config.n_heads:
        raise ValueError(
            f"d_model ({config.d_model}) must be a multiple of n_heads ({config.n_heads})"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("n_heads must be a multiple of n_kv_heads")


class LLaDABlock(nn.Module):
    """One LLaDA transformer block ("llama" block type), split into the three steps of the layer
    protocol so a caller can run attention its own way between them."""

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        head_dim = config.head_dim
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        bias = bool(config.include_bias)

        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, self.num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, self.num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, self.num_kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=bias)

        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.intermediate_size, bias=bias)  # gate
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=bias)
        self.ff_out = nn.Linear(config.intermediate_size, config.d_model, bias=bias)  # down

    def qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [B, T, d]; cos, sin: fp32 [B, T, D] for these T tokens.
        Returns q [B, Hq, T, D], k [B, Hkv, T, D] (both rotated), v [B, Hkv, T, D]."""
        x = self.attn_norm(hidden)
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attn_output(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] (the block input); attn: [B, Hq, T, D] -> [B, T, d]."""
        return hidden + self.attn_out(merge_heads(attn))

    def mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        x = self.ff_norm(hidden)
        return hidden + self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class LLaDAModel(nn.Module):
    """Holds the weights under the official names: `transformer.{wte, blocks, ln_f, ff_out}`."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.padded_vocab_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(
                config.d_model, config.padded_vocab_size, bias=bool(config.include_bias)
            )
        self.transformer = nn.ModuleDict(modules)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # nn.init functions (not Tensor methods): transformers 5 wraps them during loading so
        # weights that came from the checkpoint are never overwritten.
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModelLM(DiffusionLMMixin, LLaDAPreTrainedModel):
    """LLaDA with its LM head; `model(input_ids, attention_mask).logits` is the full bidirectional
    forward. Logits have `embedding_size` columns, as in the official code."""

    dllm_kind = "llada"

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.model = LLaDAModel(config)
        self.post_init()

    # -- layer protocol ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, each with `qkv`, `attn_output`, `mlp_block`."""
        return self.model.transformer.blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int [B, T] -> hidden [B, T, d]."""
        hidden = self.model.transformer.wte(input_ids)
        if self.config.input_emb_norm:
            hidden = hidden * (self.config.d_model**0.5)
        return hidden

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: int [B, T] -> (cos, sin), fp32 [B, T, head_dim] each."""
        return rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> logits [B, T, embedding_size] (final norm + LM head)."""
        x = self.model.transformer.ln_f(hidden)
        if self.config.weight_tying:
            logits = F.linear(x, self.model.transformer.wte.weight)
        else:
            logits = self.model.transformer.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return logits

    # -- transformers plumbing -----------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value


AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
# The official auto_map names AutoModel and AutoModelForCausalLM; masked LM is what LLaDA is.
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
