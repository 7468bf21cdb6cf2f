"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct): LLaDA's masked diffusion with an
OLMoE-style mixture-of-experts transformer, bidirectional, sampled with LLaDA's ``generate.py``.

This file loads the official checkpoints unchanged: the config.json fields of
``configuration_lladamoe.py`` and the tensor names of ``modeling_lladamoe.py``
(``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``self_attn.q_norm`` / ``k_norm`` (RMSNorm per head, before RoPE), ``mlp.gate`` (router),
``mlp.experts.{e}.*_proj``, ``shared_expert.*_proj`` (beside ``mlp``), ``model.norm``,
``lm_head``), whose math it reproduces. The released config.json says ``model_type: "llada"``
with ``architectures: ["LLaDAMoEModelLM"]``; ``maskkv.load_checkpoint`` goes by the
architecture, transformers' Auto classes by ``model_type: "lladamoe"`` (what the toolkits ask
users to write).

Layer:  h = x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))   (partial RoPE)
        y = h + MLP(post_attention_layernorm(h)) [+ shared_expert(post_attention_layernorm(h))]
MLP:    dense (``moe_layer_freq[i] == 0``, ``dense_intermediate_size``) or routed experts with
        the official router: p = softmax(gate(x)) in fp32, p += expert_bias (when enabled),
        top-k of p, the k values (not renormalised) cast to the model dtype as weights; each
        token sums its experts' weighted outputs in the model dtype, experts in index order.

The official code reads no value from ``norm_topk_prob``, ``moe_router_score_function``,
``routed_scaling_factor``, ``router_num_group`` or ``router_topk_group`` (its router is the one
above whatever they say); neither does this file.
"""

from __future__ import annotations

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
    apply_partial_rotary,
    merge_heads,
    rotary_cos_sin,
    split_heads,
)
from ._moe import ExpertList, ExpertMLP, cuda_graph_safe

#: The official checkpoints' special ids (their tokenizer is LLaDA2's).
LLADAMOE_MASK_TOKEN_ID = 156895
LLADAMOE_EOS_TOKEN_ID = 156892


class LLaDAMoEConfig(PretrainedConfig):
    """Configuration of a LLaDA-MoE model, field for field the official config.json.

    The official configuration class gives most sizes the default -1 ("must be set"); they keep
    it here and the model refuses a checkpoint that leaves one unset, naming the field.
    """

    model_type = "lladamoe"

    def __init__(
        self,
        vocab_size: int = -1,
        hidden_size: int = -1,
        dense_intermediate_size: int = -1,
        expert_intermediate_size: int = -1,
        shared_expert_intermediate_size: int | None = -1,
        num_hidden_layers: int = -1,
        num_attention_heads: int = -1,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-05,
        pad_token_id: int = 1,
        bos_token_id: int | None = None,
        eos_token_id: int = 50279,
        tie_word_embeddings: bool = False,
        rope_theta: float = -1,
        partial_rotary_factor: float = -1,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = False,
        clip_qkv: float | None = None,
        num_experts_per_tok: int = -1,
        num_experts: int = -1,
        qk_layernorm: bool | None = None,
        moe_layer_freq: list[int] | None = None,
        moe_router_enable_expert_bias: bool | None = None,
        mask_token_id: int = LLADAMOE_MASK_TOKEN_ID,
        **kwargs: Any,
    ) -> None:
        rope_type = (
            None
            if rope_scaling is None
            else rope_scaling.get("rope_type", rope_scaling.get("type"))
        )
        if rope_type not in (None, "default"):
            # Not stored: transformers 5 turns a `rope_scaling` attribute into `rope_parameters`.
            raise NotImplementedError(
                f"rope_scaling: only None or the default rotary embedding is supported, got "
                f"{rope_scaling!r}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dense_intermediate_size = dense_intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.attention_bias = attention_bias
        self.clip_qkv = clip_qkv
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.qk_layernorm = qk_layernorm
        self.moe_layer_freq = list(moe_layer_freq) if moe_layer_freq is not None else []
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.mask_token_id = mask_token_id
        kwargs.pop("head_dim", None)  # derived, see the property
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)


def _check_supported(config: LLaDAMoEConfig) -> None:
    """Refuse, naming the field, a config the official code would run with an unset (-1) or
    contradictory value."""

    def positive(name: str) -> int:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}: expected a positive int, got {value!r} (unset?)")
        return value

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        positive(name)
    heads, kv = config.num_attention_heads, positive("num_key_value_heads")
    if config.hidden_size % heads:
        raise ValueError(
            f"config.num_attention_heads: expected a divisor of hidden_size={config.hidden_size}, "
            f"got {heads}"
        )
    if heads % kv:
        raise ValueError(
            f"config.num_key_value_heads: expected a divisor of num_attention_heads={heads}, got {kv}"
        )
    if not config.rope_theta > 0:
        raise ValueError(
            f"config.rope_theta: expected a positive number, got {config.rope_theta!r}"
        )
    rot = config.rotary_dim
    if not 0 < rot <= config.head_dim or rot % 2:
        raise ValueError(
            f"config.partial_rotary_factor: head_dim={config.head_dim} x "
            f"{config.partial_rotary_factor} must give an even number of rotated channels in "
            f"[2, head_dim], got {rot}"
        )
    if config.hidden_act != "silu":
        raise NotImplementedError(
            f"config.hidden_act: only 'silu' is supported, got {config.hidden_act!r}"
        )
    if config.tie_word_embeddings:
        raise NotImplementedError("config.tie_word_embeddings: only False is supported")
    freq = config.moe_layer_freq
    if len(freq) != config.num_hidden_layers or any(f not in (0, 1) for f in freq):
        raise ValueError(
            f"config.moe_layer_freq: expected num_hidden_layers={config.num_hidden_layers} "
            f"entries of 0 (dense) or 1 (MoE), got {freq!r}"
        )
    if 0 in freq:
        positive("dense_intermediate_size")
    if 1 in freq:
        positive("expert_intermediate_size")
        experts = positive("num_experts")
        k = positive("num_experts_per_tok")
        if k > experts:
            raise ValueError(
                f"config.num_experts_per_tok: expected at most num_experts={experts}, got {k}"
            )
        if config.shared_expert_intermediate_size is not None:
            positive("shared_expert_intermediate_size")


class LLaDAMoEAttention(nn.Module):
    """Holds the attention weights (``q/k/v/o_proj``, ``q_norm`` / ``k_norm``)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)


class LLaDAMoESparseMoeBlock(nn.Module):
    """The router (``gate``, a bias-free linear layer; ``expert_bias`` buffer when enabled) and
    the routed experts (``experts.{e}``)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ExpertList(
            config.hidden_size, config.expert_intermediate_size, config.num_experts
        )
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)  # [N, E] fp32
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        weights, ids = probs.topk(self.top_k, dim=-1)  # [N, k], the biased values
        weights = weights.to(x.dtype)
        N, k = ids.shape
        # Slots in the official loop's order inside each expert: by top-k rank, then token.
        out = self.experts.run(
            x, ids.t().reshape(-1), torch.arange(N, device=x.device).repeat(k)
        ).view(k, N, -1)
        weighted = out * weights.t().unsqueeze(-1)  # [k, N, d], model dtype
        # Each token adds its experts' outputs to zero in expert-index order (the official
        # index_add_ per expert), in the model dtype.
        rank = ids.argsort(dim=-1)  # [N, k]: the token's slots by expert index
        y = torch.zeros_like(x)
        for j in range(k):
            y = y + weighted.gather(0, rank[:, j].view(1, N, 1).expand(1, N, shape[-1]))[0]
        return y.view(shape)


class LLaDAMoEDecoderLayer(nn.Module):
    """One LLaDA-MoE layer, split into the three steps of the layer protocol (``_common``)."""

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        self.self_attn = LLaDAMoEAttention(config)
        moe = config.moe_layer_freq[layer_idx] == 1
        if moe:
            self.mlp = LLaDAMoESparseMoeBlock(config)
        else:
            self.mlp = ExpertMLP(config.hidden_size, config.dense_intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if moe and config.shared_expert_intermediate_size is not None:
            self.shared_expert = ExpertMLP(
                config.hidden_size, config.shared_expert_intermediate_size
            )

    def qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [B, T, d]; cos, sin: fp32 [B, T, R] (R rotated channels).
        Returns q [B, Hq, T, D], k [B, Hkv, T, D] (normed, rotated), v [B, Hkv, T, D]."""
        attn = self.self_attn
        x = self.input_layernorm(hidden)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if hasattr(attn, "q_norm"):  # per head: the official norm runs on [B * T * H, D]
            q = attn.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = attn.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = split_heads(q, attn.num_heads)
        k = split_heads(k, attn.num_kv_heads)
        v = split_heads(v, attn.num_kv_heads)
        return apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin), v

    def attn_output(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] (the layer input); attn: [B, Hq, T, D] -> [B, T, d]."""
        return hidden + self.self_attn.o_proj(merge_heads(attn))

    def mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        x = self.post_attention_layernorm(hidden)
        y = self.mlp(x)
        if hasattr(self, "shared_expert"):
            y = y + self.shared_expert(x)
        return hidden + y


class LLaDAMoEModel(nn.Module):
    """Holds the weights under the official names: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDAMoESparseMoeBlock) and module.expert_bias is not None:
            nn.init.zeros_(module.expert_bias)


class LLaDAMoEModelLM(DiffusionLMMixin, LLaDAMoEPreTrainedModel):
    """LLaDA-MoE with its LM head; ``model(input_ids, attention_mask).logits`` is the full
    bidirectional forward (logits in the model dtype). It samples as LLaDA does."""

    dllm_kind = "llada"

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- layer protocol ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, each with ``qkv``, ``attn_output``, ``mlp_block``."""
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int [B, T] -> hidden [B, T, d]."""
        return self.model.embed_tokens(input_ids)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: int [B, T] -> (cos, sin), fp32 [B, T, rotary_dim] each."""
        return rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> logits [B, T, vocab] (final norm + LM head)."""
        return self.lm_head(self.model.norm(hidden))

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a later step may be captured as a CUDA graph: the MoE layers must run the
        grouped backend (no host sync), i.e. CUDA, bf16 / fp16, ``torch._grouped_mm``."""
        return cuda_graph_safe(self)

    # -- transformers plumbing -----------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LLaDAMoEConfig, LLaDAMoEModelLM, exist_ok=True)
