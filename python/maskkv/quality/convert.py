"""Start a Dream-layout or LLaDA2-layout model from a trained LLaDA-layout one (``train.py
--kind dream|llada2 --init-from LLADA_DIR``).

Both layouts are the same pre-norm transformer (RMSNorm, RoPE, SwiGLU); they differ in names
(OLMo's ``model.transformer.blocks.i.attn_out`` is Qwen2's ``model.layers.i.self_attn.o_proj``),
in Dream's q/k/v biases, in grouped-query attention, in the special token ids and in which
position predicts a token (LLaDA: logits[i] predicts token i; Dream: logits[i - 1]). The
conversion carries the weights over and leaves the last two to training:

- biases start at zero (the LLaDA block has none), so before grouping the two models compute
  the same logits (up to the norms' epsilon);
- the K and V projections of the query heads that will share a KV head are averaged (Dream's
  query head h reads KV head h // group, as ``repeat_kv`` lays them out);
- the embedding and LM-head rows of BOS, EOS and mask move to the Dream ids (BOS wins where
  Dream gives BOS and EOS one id).

Why: Dream's shifted prediction trained from random weights stayed at chance on the lab's
multi-query recall (TRAINING.md) where LLaDA routed; from converted LLaDA weights it routes
within a few hundred steps (Dream-7B itself starts from an autoregressive Qwen2.5).
"""

from __future__ import annotations

import torch

from . import tasks as task_lib

__all__ = ["dream_state_from_llada", "is_llada_state", "llada2_state_from_llada"]

_LLADA = "model.transformer."

#: LLaDA block name -> Dream layer name, for the tensors copied unchanged.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",  # LLaDA: ff_out(silu(ff_proj(x)) * up_proj(x))
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def _grouped_kv(w: torch.Tensor, kv_heads: int, group: int, head_dim: int) -> torch.Tensor:
    """[heads * head_dim, d] K or V projection -> [kv_heads * head_dim, d]: the heads that will
    share a KV head averaged (query head h reads KV head h // group)."""
    d = w.shape[-1]
    return w.view(kv_heads, group, head_dim, d).mean(1).reshape(kv_heads * head_dim, d)


def _special_rows(t: torch.Tensor, src_ids, dst_ids) -> torch.Tensor:
    """[vocab, d] embedding / head rows with BOS, EOS and mask moved from ``src_ids`` to
    ``dst_ids`` (BOS last: it wins a shared BOS / EOS id)."""
    out = t.clone()
    for name in ("eos", "mask", "bos"):
        out[getattr(dst_ids, name)] = t[getattr(src_ids, name)]
    return out


def is_llada_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses LLaDA's (OLMo) tensor names."""
    return any(name.startswith(_LLADA) for name in state)


def dream_state_from_llada(
    llada_state: dict[str, torch.Tensor], llada_config, dream_config
) -> dict[str, torch.Tensor]:
    """A Dream-layout state dict (``DreamModelLM``'s names and shapes for ``dream_config``) from a
    LLaDA-layout one. The two configs must agree on layers, width, query heads, MLP width and
    vocabulary; ``dream_config.num_key_value_heads`` must divide the query heads.

    Raises ``ValueError`` naming the first config field that differs."""
    expected = {
        "num_hidden_layers": llada_config.n_layers,
        "hidden_size": llada_config.d_model,
        "num_attention_heads": llada_config.n_heads,
        "intermediate_size": llada_config.intermediate_size,
        "vocab_size": llada_state[_LLADA + "wte.weight"].shape[0],
    }
    for name, value in expected.items():
        if getattr(dream_config, name) != value:
            raise ValueError(
                f"dream_config.{name}: expected the LLaDA model's {value}, "
                f"got {getattr(dream_config, name)}"
            )
    heads, kv_heads = dream_config.num_attention_heads, dream_config.num_key_value_heads
    if heads % kv_heads:
        raise ValueError(
            f"dream_config.num_key_value_heads: expected a divisor of {heads}, got {kv_heads}"
        )
    d = dream_config.hidden_size
    group, head_dim = heads // kv_heads, d // heads

    llada_ids, dream_ids = task_lib.token_ids(llada_config), task_lib.token_ids(dream_config)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [vocab, d] with the specials moved
        return _special_rows(t, llada_ids, dream_ids)

    out = {
        "model.embed_tokens.weight": rows(llada_state[_LLADA + "wte.weight"]),
        "lm_head.weight": rows(llada_state[_LLADA + "ff_out.weight"]),
        "model.norm.weight": llada_state[_LLADA + "ln_f.weight"].clone(),
    }
    for i in range(dream_config.num_hidden_layers):
        src, dst = f"{_LLADA}blocks.{i}.", f"model.layers.{i}."
        for llada_name, dream_name in _BLOCK_NAMES.items():
            out[dst + dream_name] = llada_state[src + llada_name].clone()
        for proj in ("k_proj", "v_proj"):
            w = llada_state[src + f"{proj}.weight"]
            out[dst + f"self_attn.{proj}.weight"] = _grouped_kv(w, kv_heads, group, head_dim)
        for proj, width in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            out[dst + f"self_attn.{proj}.bias"] = torch.zeros(width * head_dim)
    return out


def llada2_state_from_llada(
    llada_state: dict[str, torch.Tensor], llada_config, llada2_config, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A LLaDA2-layout state dict (``LLaDA2MoeModelLM``'s names and shapes for
    ``llada2_config``) from a LLaDA-layout one, computing the same function up to rounding:

    - attention: Q, K and V stacked into ``query_key_value`` (K and V averaged per KV group, as
      for Dream), ``dense`` = ``attn_out``; the config must rotate every channel
      (``partial_rotary_factor`` 1) and have no q/k norms (LLaDA has neither);
    - the first ``first_k_dense_replace`` layers keep the dense MLP;
    - in an MoE layer the shared experts (``num_shared_experts`` x ``moe_intermediate_size`` =
      the dense width) are the dense MLP; each routed expert starts from one slice of the dense
      MLP's gate and up rows (expert e takes slice e mod (shared width / expert width), plus
      noise of 1% of their spread, so the experts differ) and a zero ``down_proj``: routed
      experts add nothing until training moves them, whatever the router (normal(0, 0.02),
      zero expert bias) picks.

    Raises ``ValueError`` naming the first config field that does not allow this."""
    c = llada2_config
    expected = {
        "num_hidden_layers": llada_config.n_layers,
        "hidden_size": llada_config.d_model,
        "num_attention_heads": llada_config.n_heads,
        "head_dim": llada_config.d_model // llada_config.n_heads,
        "intermediate_size": llada_config.intermediate_size,
        "vocab_size": llada_state[_LLADA + "wte.weight"].shape[0],
        "partial_rotary_factor": 1.0,
        "use_qk_norm": False,
        "use_qkv_bias": False,
        "use_bias": False,
    }
    for name, value in expected.items():
        if getattr(c, name) != value:
            raise ValueError(
                f"llada2_config.{name}: expected {value!r} (from the LLaDA model), "
                f"got {getattr(c, name)!r}"
            )
    shared_width = c.moe_intermediate_size * (c.num_shared_experts or 0)
    if c.num_experts is not None and shared_width != c.intermediate_size:
        raise ValueError(
            f"llada2_config.num_shared_experts: expected num_shared_experts x "
            f"moe_intermediate_size = intermediate_size={c.intermediate_size}, got {shared_width}"
        )
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    group, head_dim = heads // kv_heads, c.head_dim
    llada_ids, llada2_ids = task_lib.token_ids(llada_config), task_lib.token_ids(c)
    gen = torch.Generator().manual_seed(seed)
    out = {
        "model.word_embeddings.weight": _special_rows(
            llada_state[_LLADA + "wte.weight"], llada_ids, llada2_ids
        ),
        "lm_head.weight": _special_rows(
            llada_state[_LLADA + "ff_out.weight"], llada_ids, llada2_ids
        ),
        "model.norm.weight": llada_state[_LLADA + "ln_f.weight"].clone(),
    }
    for i in range(c.num_hidden_layers):
        src, dst = f"{_LLADA}blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = llada_state[src + "attn_norm.weight"].clone()
        out[dst + "post_attention_layernorm.weight"] = llada_state[src + "ff_norm.weight"].clone()
        k, v = (
            _grouped_kv(llada_state[src + f"{proj}.weight"], kv_heads, group, head_dim)
            for proj in ("k_proj", "v_proj")
        )
        out[dst + "attention.query_key_value.weight"] = torch.cat(
            [llada_state[src + "q_proj.weight"], k, v]
        )
        out[dst + "attention.dense.weight"] = llada_state[src + "attn_out.weight"].clone()
        gate, up, down = (
            llada_state[src + n] for n in ("ff_proj.weight", "up_proj.weight", "ff_out.weight")
        )
        if not c.is_moe_layer(i):
            mlp = {"gate_proj": gate, "up_proj": up, "down_proj": down}
            out.update({f"{dst}mlp.{n}.weight": t.clone() for n, t in mlp.items()})
            continue
        shared = {"gate_proj": gate, "up_proj": up, "down_proj": down}
        out.update({f"{dst}mlp.shared_experts.{n}.weight": t.clone() for n, t in shared.items()})
        width = c.moe_intermediate_size
        slices = c.intermediate_size // width
        for e in range(c.num_experts):
            rows = slice((e % slices) * width, (e % slices + 1) * width)
            for name, w in (("gate_proj", gate[rows]), ("up_proj", up[rows])):
                noise = torch.randn(w.shape, generator=gen) * (0.01 * float(w.std()))
                out[f"{dst}mlp.experts.{e}.{name}.weight"] = w + noise
            out[f"{dst}mlp.experts.{e}.down_proj.weight"] = torch.zeros(c.hidden_size, width)
        out[dst + "mlp.gate.weight"] = (
            torch.randn(c.num_experts, c.hidden_size, generator=gen) * 0.02
        )
        out[dst + "mlp.gate.expert_bias"] = torch.zeros(c.num_experts)
    return out
