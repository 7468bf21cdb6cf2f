"""LLaDA2.x (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini, -flash): a mixture-of-experts
block-diffusion language model. It attends block-causally (a token reads its own block and every
earlier block) and is trained and sampled block by block.

This file loads the official checkpoints unchanged: the config.json fields of
``configuration_llada2_moe.py`` and the tensor names of ``modeling_llada2_moe.py`` (Ling/Bailing
layout: ``model.word_embeddings``, ``model.layers.{i}.attention.query_key_value`` (fused QKV),
``attention.query_layernorm`` / ``key_layernorm`` (q/k RMSNorm per head), ``attention.dense``,
``mlp.gate.weight`` + ``mlp.gate.expert_bias`` (router), ``mlp.experts.{e}.*_proj``,
``mlp.shared_experts.*_proj``, ``model.norm``, ``lm_head``), whose math it reproduces.

Layer:  h = x + dense(attention(q_norm(q), k_norm(k), v))      (partial RoPE on q and k)
        y = h + MLP(post_attention_layernorm(h))
MLP:    the first ``first_k_dense_replace`` layers: a SiLU-gated MLP of ``intermediate_size``;
        the others: routed experts + shared experts, with the router
        s = sigmoid(x W_g^T) (fp32); experts chosen by top-k of s + expert_bias inside the
        ``topk_group`` best of ``n_group`` groups (a group's score: its two best); weights
        s_topk / sum(s_topk) * routed_scaling_factor (the bias only chooses).
Logits are returned in fp32, as the official ``LLaDA2MoeModelLM.forward`` does.

The attention pattern is a property of the call, not of the weights: ``model(ids).logits`` is
bidirectional (the official forward without a mask), ``model(ids, block_length=32)`` is
block-causal (what training and ``maskkv.generate`` use).
"""

from __future__ import annotations

from typing import Any

import torch
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
)
from ._moe import ExpertList, ExpertMLP, cuda_graph_safe, moe_backend_for

#: The official sampler's defaults (``LLaDA2MoeModelLM.generate``): the config has no mask id,
#: and the block length (the block-causal attention's) is the sampler's argument.
LLADA2_MASK_TOKEN_ID = 156895
LLADA2_EOS_TOKEN_ID = 156892
LLADA2_BLOCK_LENGTH = 32


class LLaDA2MoeConfig(PretrainedConfig):
    """Configuration of a LLaDA2.x model, field for field the official config.json.

    Defaults are the official configuration class's; ``mask_token_id`` / ``eos_token_id`` (absent
    from the official file) default to the official sampler's ids. Fields the official model code
    reads no value from (``score_function``, ``norm_topk_prob``, ``router_dtype``,
    ``moe_router_enable_expert_bias``, ``use_rmsnorm``, ``rotary_dim``) are checked against the
    computation it does, so a checkpoint that asks for another one is refused by name.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 0,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = True,
        rms_norm_eps: float = 1e-05,
        norm_head: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 16384,
        rope_theta: float = 10000.0,
        use_sliding_window: bool = False,
        rope_scaling: dict[str, Any] | None = None,
        pad_token_id: int = 126081,
        num_experts: int | None = 16,
        num_shared_experts: int | None = 0,
        num_experts_per_tok: int = 2,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        head_dim: int | None = None,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        mask_token_id: int = LLADA2_MASK_TOKEN_ID,
        eos_token_id: int = LLADA2_EOS_TOKEN_ID,
        **kwargs: Any,
    ) -> None:
        # Not stored under this name: transformers 5 turns a `rope_scaling` attribute into
        # `rope_parameters`. The released checkpoints have none; a scaled one is refused.
        self.rope_scaling_type = _rope_type(rope_scaling)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.norm_head = norm_head
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.partial_rotary_factor = partial_rotary_factor
        # Rotated channels per head: the official rotary init computes
        # int(head_dim * partial_rotary_factor) and ignores this field; it is checked against it.
        self.rotary_dim = rotary_dim or int(self.head_dim * partial_rotary_factor)
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    rope_type = None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in (None, "default"):
        raise NotImplementedError(
            f"rope_scaling: only None or the default rotary embedding is supported, got "
            f"{rope_scaling!r}"
        )
    return "default"


def _positive(config: LLaDA2MoeConfig, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name}: expected a positive int, got {value!r}")
    return value


def _check_supported(config: LLaDA2MoeConfig) -> None:
    """Refuse, naming the field, what the official code does not compute or a config whose
    fields contradict each other."""
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _positive(config, name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if (
        isinstance(kv_heads, bool)
        or not isinstance(kv_heads, int)
        or kv_heads < 1
        or heads % kv_heads
    ):
        raise ValueError(
            f"config.num_key_value_heads: expected a positive divisor of num_attention_heads="
            f"{heads}, got {kv_heads!r}"
        )
    rot = int(config.head_dim * config.partial_rotary_factor)
    if config.rotary_dim != rot:
        raise ValueError(
            f"config.rotary_dim: expected head_dim x partial_rotary_factor = {rot} (what the "
            f"official code rotates), got {config.rotary_dim!r}"
        )
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
    for name, wanted in (
        ("use_sliding_window", False),
        ("norm_head", False),
        ("tie_word_embeddings", False),
    ):
        if bool(getattr(config, name, wanted)) != wanted:
            raise NotImplementedError(f"config.{name}: only {wanted} is supported")
    layers = config.num_hidden_layers
    dense = config.first_k_dense_replace if config.num_experts is not None else layers
    if dense > 0:
        _positive(config, "intermediate_size")
    if config.num_experts is None:
        return
    _positive(config, "num_experts")
    _positive(config, "moe_intermediate_size")
    k = _positive(config, "num_experts_per_tok")
    groups = _positive(config, "n_group")
    if config.num_experts % groups:
        raise ValueError(
            f"config.n_group: expected a divisor of num_experts={config.num_experts}, got {groups}"
        )
    if not 1 <= config.topk_group <= groups:
        raise ValueError(
            f"config.topk_group: expected an int in [1, n_group={groups}], got {config.topk_group!r}"
        )
    if config.num_experts // groups < 2:
        raise ValueError(
            f"config.n_group: each group needs at least 2 experts (its score is its two best), "
            f"got {config.num_experts} experts in {groups} groups"
        )
    if k > config.topk_group * (config.num_experts // groups):
        raise ValueError(
            f"config.num_experts_per_tok: expected at most topk_group x experts per group = "
            f"{config.topk_group * (config.num_experts // groups)}, got {k}"
        )
    shared = config.num_shared_experts
    if shared is not None and (
        isinstance(shared, bool) or not isinstance(shared, int) or shared < 0
    ):
        raise ValueError(f"config.num_shared_experts: expected None or an int >= 0, got {shared!r}")
    # Fields the official code takes no value from: the computation is fixed.
    fixed = {
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "norm_topk_prob": k > 1,  # the official router normalises exactly when top_k > 1
        "use_rmsnorm": True,
    }
    for name, wanted in fixed.items():
        value = config.__dict__.get(name)  # read from config.json, not a property
        if value is not None and value != wanted:
            raise NotImplementedError(
                f"config.{name}: the official LLaDA2 code computes {name}={wanted!r}, got {value!r}"
            )


class LLaDA2MoeAttention(nn.Module):
    """Holds the attention weights (``query_key_value``, ``query_layernorm``, ``key_layernorm``,
    ``dense``); the math is in the decoder layer."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            bias=config.use_qkv_bias,
        )
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias
        )


class LLaDA2MoeGate(nn.Module):
    """The router: ``weight`` [E, d] and the ``expert_bias`` buffer [E] (it only chooses)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d] -> (expert ids int64 [N, k], fp32 weights [N, k])."""
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # [N, E]
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias
        N, E = biased.shape
        # A group's score is the sum of its two best biased scores; only the `topk_group` best
        # groups may supply experts.
        group_scores = biased.view(N, self.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        groups = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1)
        allowed = group_mask.unsqueeze(-1).expand(N, self.n_group, E // self.n_group).reshape(N, E)
        ids = biased.masked_fill(~allowed.bool(), float("-inf")).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (``experts.{e}``) plus the shared experts (``shared_experts``, one MLP of
    ``num_shared_experts`` x ``moe_intermediate_size``) added to every token."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = ExpertList(
            config.hidden_size, config.moe_intermediate_size, config.num_experts
        )
        self.gate = LLaDA2MoeGate(config)
        # Run the shared experts as one more expert of the grouped pass (when widths match);
        # benchmarks/bench_moe.py measures both ways.
        self.fuse_shared = True
        self.shared_experts = None
        if config.num_shared_experts is not None:
            self.shared_experts = ExpertMLP(
                config.hidden_size, config.moe_intermediate_size * config.num_shared_experts
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        ids, weights = self.gate(x)  # [N, k]
        N = ids.shape[0]
        shared = self.shared_experts
        # The grouped backend runs the shared expert as expert E, weight 1, in the same pass.
        fuse = (
            shared is not None
            and self.fuse_shared
            and moe_backend_for(x) == "grouped"
            and shared.gate_proj.out_features == self.experts[0].gate_proj.out_features
        )
        extra = ()
        if fuse:
            E = len(self.experts)
            ids = torch.cat([ids, torch.full((N, 1), E, dtype=ids.dtype, device=ids.device)], 1)
            weights = torch.cat([weights, weights.new_ones(N, 1)], 1)
            extra = (shared,)
        tokens = torch.arange(N, device=x.device).repeat_interleave(ids.shape[1])
        out = self.experts.run(x, ids.reshape(-1), tokens, extra=extra)
        # The official combine: per-slot outputs in fp32 times the fp32 weights, summed over the
        # slots, cast back; the shared experts' output is added in the model dtype.
        y = (out.view(N, -1, shape[-1]).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        if shared is not None and not fuse:
            y = y + shared(x)
        return y.view(shape)


class LLaDA2MoeDecoderLayer(nn.Module):
    """One LLaDA2 layer, split into the three steps of the layer protocol (``_common``)."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = LLaDA2MoeAttention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = LLaDA2MoeSparseMoeBlock(config)
        else:
            self.mlp = ExpertMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def qkv(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [B, T, d]; cos, sin: fp32 [B, T, R] (R rotated channels).
        Returns q [B, Hq, T, D], k [B, Hkv, T, D] (normed, rotated), v [B, Hkv, T, D]."""
        attn = self.attention
        B, T, _ = hidden.shape
        qkv = attn.query_key_value(self.input_layernorm(hidden))
        qkv = qkv.view(B, T, attn.num_heads + 2 * attn.num_kv_heads, attn.head_dim)
        q, k, v = qkv.split([attn.num_heads, attn.num_kv_heads, attn.num_kv_heads], dim=-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if hasattr(attn, "query_layernorm"):
            q, k = attn.query_layernorm(q), attn.key_layernorm(k)
        return apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin), v

    def attn_output(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] (the layer input); attn: [B, Hq, T, D] -> [B, T, d]."""
        return hidden + self.attention.dense(merge_heads(attn))

    def mlp_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> [B, T, d]."""
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LLaDA2MoeModel(nn.Module):
    """Holds the weights under the official names: ``word_embeddings``, ``layers``, ``norm``."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
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
        elif isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.expert_bias)


class LLaDA2MoeModelLM(DiffusionLMMixin, LLaDA2MoePreTrainedModel):
    """LLaDA2 with its LM head. ``model(input_ids).logits`` (fp32 [B, T, vocab]) is the
    bidirectional forward, ``model(input_ids, block_length=32).logits`` the block-causal one."""

    dllm_kind = "llada2"

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        _check_supported(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- layer protocol ------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, each with ``qkv``, ``attn_output``, ``mlp_block``."""
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int [B, T] -> hidden [B, T, d]."""
        return self.model.word_embeddings(input_ids)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: int [B, T] -> (cos, sin), fp32 [B, T, rotary_dim] each."""
        return rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, d] -> fp32 logits [B, T, vocab] (final norm + LM head, then fp32)."""
        return self.lm_head(self.model.norm(hidden)).float()

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a later step may be captured as a CUDA graph: the MoE layers must run the
        grouped backend (no host sync), i.e. CUDA, bf16 / fp16, ``torch._grouped_mm``."""
        return cuda_graph_safe(self)

    # -- transformers plumbing -----------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)
# The official auto_map names AutoModelForCausalLM; masked (block) diffusion is what it is.
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LLaDA2MoeConfig, LLaDA2MoeModelLM, exist_ok=True)
