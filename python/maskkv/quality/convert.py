"""Start a Dream-layout model from a trained LLaDA-layout one (``train.py --kind dream
--init-from LLADA_DIR``).

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

__all__ = ["dream_state_from_llada", "is_llada_state"]

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
        out = t.clone()
        for name in ("eos", "mask", "bos"):  # bos last: it wins a shared BOS / EOS id
            out[getattr(dream_ids, name)] = t[getattr(llada_ids, name)]
        return out

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
            w = llada_state[src + f"{proj}.weight"].view(kv_heads, group, head_dim, d)
            out[dst + f"self_attn.{proj}.weight"] = w.mean(1).reshape(kv_heads * head_dim, d)
        for proj, width in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            out[dst + f"self_attn.{proj}.bias"] = torch.zeros(width * head_dim)
    return out
