"""Small random checkpoints in the official LLaDA / Dream / LLaDA2 / LLaDA-MoE file formats, for
tests and demos.

No weights can be downloaded in CI, so tests build a tiny model with the same files the official
repositories ship: a config.json with every official field (tiny sizes; special-token ids remapped
into the tiny vocabulary), safetensors weights under the official names (one file, or shards with
an index), and a byte-level tokenizer with the official special tokens and chat template.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["KINDS", "random_model", "tiny_checkpoint", "tiny_config_dict"]

#: Checkpoint kinds -> config.json ``model_type`` of the official files (LLaDA-MoE's says "llada";
#: its ``architectures`` entry tells it apart).
KINDS = {"llada": "llada", "dream": "Dream", "llada2": "llada2_moe", "lladamoe": "llada"}

# Token ids 0..255 are the 256 bytes (byte-level BPE without merges, so any text round-trips);
# the special tokens follow, then reserved filler tokens up to the vocabulary size.
_NUM_BYTES = 256

_LLADA_SPECIALS = [  # name -> tiny id 256.. (official ids in comments)
    "<|startoftext|>",  # bos 126080
    "<|endoftext|>",  # eos / pad 126081
    "<|mdm_mask|>",  # mask 126336
    "<|start_header_id|>",  # 126346
    "<|end_header_id|>",  # 126347
    "<|eot_id|>",  # 126348
]
# LLaDA2.x and LLaDA-MoE share the Ling tokenizer (official ids 156892 EOS, 156895 mask); the
# tiny one puts BOS / EOS / mask where the tiny LLaDA tokenizer has them, so the quality suite's
# LLaDA-layout weights carry over without moving rows.
_LING_SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",  # eos / pad 156892
    "<|mask|>",  # mask 156895
    "<role>",
    "</role>",
    "<|role_end|>",
]
_DREAM_SPECIALS = [
    "<|endoftext|>",  # eos / pad / config bos 151643
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645
    "<|beginoftext|>",  # tokenizer bos 151665
    "<|mask|>",  # mask 151666
]

# The official LLaDA-8B-Instruct chat template (Llama-3 style).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Dream-v0-Instruct's (Qwen2.5) ChatML template, without the tool-calling branches.
DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


# A Ling-style chat template for the tiny LLaDA2 / LLaDA-MoE tokenizer (role tags, role end).
LING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<role>' + message['role'] | upper + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


def tiny_config_dict(kind: str, **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny checkpoint: every field of the official one, tiny sizes.

    LLaDA: 2 layers, d_model 64, 4 heads (head_dim 16), MLP 128, vocab 320.
    Dream: 2 layers, hidden 64, 4 query / 2 KV heads (GQA, head_dim 16), MLP 128, vocab 320.
    LLaDA2: 2 layers (the first dense, MLP 128; then 8 experts of 32, top-2 within 2 of 4
    groups, one shared expert), hidden 64, 4 query / 2 KV heads of 16, half of each head
    rotated, q/k norms, vocab 320.
    LLaDA-MoE: 2 layers (dense MLP 128, then 8 experts of 32, top-2, expert bias, a shared
    expert of 32), hidden 64, 4 heads of 16, half rotated, q/k norms, vocab 320.
    Overrides replace fields (unknown names are added).
    """
    base = _NUM_BYTES
    if kind == "llada":
        config: dict[str, Any] = {
            "activation_type": "silu",
            "alibi": False,
            "alibi_bias_max": 8.0,
            "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0,
            "attention_layer_norm": False,
            "attention_layer_norm_with_affine": True,
            "auto_map": {
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                "AutoModel": "modeling_llada.LLaDAModelLM",
            },
            "bias_for_layer_norm": False,
            "block_group_size": 1,
            "block_type": "llama",
            "d_model": 64,
            "embedding_dropout": 0.0,
            "embedding_size": 320,
            "eos_token_id": base + 1,
            "flash_attention": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "init_cutoff_factor": None,
            "init_device": "meta",
            "init_fn": "mitchell",
            "init_std": 0.02,
            "input_emb_norm": False,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": True,
            "mask_token_id": base + 2,
            "max_sequence_length": 4096,
            "mlp_hidden_size": 128,
            "mlp_ratio": 4,
            "model_type": "llada",
            "multi_query_attention": None,
            "n_heads": 4,
            "n_kv_heads": 4,
            "n_layers": 2,
            "pad_token_id": base + 1,
            "precision": "amp_bf16",
            "residual_dropout": 0.0,
            "rms_norm_eps": 1e-05,
            "rope": True,
            "rope_full_precision": True,
            "rope_theta": 500000.0,
            "scale_logits": False,
            "transformers_version": "4.46.3",
            "use_cache": False,
            "vocab_size": 320,
            "weight_tying": False,
        }
    elif kind == "dream":
        config = {
            "architectures": ["DreamModel"],
            "attention_dropout": 0.0,
            "auto_map": {
                "AutoConfig": "configuration_dream.DreamConfig",
                "AutoModel": "modeling_dream.DreamModel",
            },
            "bos_token_id": base,
            "eos_token_id": base,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "mask_token_id": base + 4,
            "max_position_embeddings": 131072,
            "max_window_layers": 2,
            "model_type": "Dream",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "pad_token_id": base,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.46.2",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 320,
        }
    elif kind == "llada2":
        config = {
            "architectures": ["LLaDA2MoeModelLM"],
            "attention_dropout": 0.0,
            "auto_map": {
                "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
            },
            "embedding_dropout": 0.0,
            "eos_token_id": base + 1,
            "first_k_dense_replace": 1,
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "mask_token_id": base + 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "model_type": "llada2_moe",
            "moe_intermediate_size": 32,
            "moe_router_enable_expert_bias": True,
            "n_group": 4,
            "norm_head": False,
            "norm_softmax": False,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_shared_experts": 1,
            "output_dropout": 0.0,
            "output_router_logits": False,
            "pad_token_id": base + 1,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 600000,
            "rotary_dim": 8,
            "routed_scaling_factor": 2.5,
            "router_dtype": "fp32",
            "score_function": "sigmoid",
            "tie_word_embeddings": False,
            "topk_group": 2,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.56.1",
            "use_bias": False,
            "use_cache": False,
            "use_qk_norm": True,
            "use_qkv_bias": False,
            "use_rmsnorm": True,
            "use_sliding_window": False,
            "vocab_size": 320,
        }
    elif kind == "lladamoe":
        config = {
            "architectures": ["LLaDAMoEModelLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "auto_map": {
                "AutoConfig": "configuration_lladamoe.LLaDAConfig",
                "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
            },
            "clip_qkv": None,
            "dense_intermediate_size": 128,
            "eos_token_id": base + 1,
            "expert_intermediate_size": 32,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "mask_token_id": base + 2,
            "max_position_embeddings": 4096,
            "model_type": "llada",
            "moe_layer_freq": [0, 1],
            "moe_router_enable_expert_bias": True,
            "moe_router_score_function": "softmax",
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "pad_token_id": base + 1,
            "partial_rotary_factor": 0.5,
            "qk_layernorm": True,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 50000.0,
            "routed_scaling_factor": 1,
            "router_aux_loss_coef": 0.01,
            "router_num_group": -2,
            "router_topk_group": -2,
            "shared_expert_intermediate_size": 32,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.46.3",
            "use_cache": False,
            "vocab_size": 320,
        }
    else:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    config.update(overrides)
    if kind == "llada" and "vocab_size" in overrides and "embedding_size" not in overrides:
        config["embedding_size"] = config["vocab_size"]
    return config


def tiny_checkpoint(
    kind: str,
    path: str | os.PathLike,
    *,
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a small random checkpoint in the official format and return its directory.

    kind: "llada", "dream", "llada2" or "lladamoe". shards: 1 writes `model.safetensors`; n > 1 writes
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. seed fixes the weights
    (the same seed gives the same tensors whatever the sharding or dtype). dtype: weight dtype on
    disk.
    tokenizer: also write tokenizer.json / tokenizer_config.json (AutoTokenizer loads them; the
    mask token id equals config.mask_token_id). overrides: config.json fields (see
    `tiny_config_dict`), e.g. n_layers=4 or num_hidden_layers=4.
    Weights: see `_random_weights` (std 0.02, norms about 1, LM head scaled for unit logits).
    """
    from safetensors.torch import save_file

    from maskkv.models import model_class_for

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_dict = tiny_config_dict(kind, **overrides)
    if kind != "llada" and "torch_dtype" not in overrides:
        config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")

    model_class = model_class_for(config_dict["model_type"], config_dict.get("architectures"))
    config = model_class.config_class(**config_dict)
    with torch.device("meta"):
        reference = model_class(config)
    tensors = {
        name: t.to(dtype).contiguous()
        for name, t in _random_weights(reference, seed, torch.device("cpu"))
    }

    _write_safetensors(tensors, path, shards, save_file)
    with open(path / "config.json", "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer:
        _write_tokenizer(kind, config_dict, path)
    return path


def random_model(
    kind: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    full_size: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """A model with random weights built directly on `device`, without files (for benchmarks and
    tests that do not need to exercise loading). Returns it in eval mode.

    full_size=False: the tiny config of `tiny_checkpoint` (same seed, same weights: on the CPU
    `random_model(kind, seed=s)` equals loading `tiny_checkpoint(kind, path, seed=s)`).
    full_size=True: the real shapes, i.e. the config defaults (LLaDA-8B: 32 layers, d 4096,
    32/32 heads, FFN 12288; Dream-7B: 28 layers, d 3584, 28/4 heads, FFN 18944).
    overrides: config fields, e.g. n_layers=4.
    """
    from maskkv.models import model_class_for

    if full_size:
        model_class = model_class_for(KINDS.get(kind, kind), _ARCHITECTURES.get(kind))
        config = model_class.config_class(**overrides)
    else:
        config_dict = tiny_config_dict(kind, **overrides)
        model_class = model_class_for(config_dict["model_type"], config_dict.get("architectures"))
        config = model_class.config_class(**config_dict)
    # Built on the meta device and materialised once in the target dtype: no fp32 copy of a
    # full-size model ever exists, and transformers' own init does not run first.
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in _random_weights(model, seed, torch.device(device)):
            params[name].copy_(value)
    return model.eval()


_ARCHITECTURES = {"lladamoe": ["LLaDAMoEModelLM"]}


def _random_weights(model: torch.nn.Module, seed: int, device: torch.device):
    """Yield (name, fp32 tensor) for every tensor of `model`, in state-dict order, from one
    seeded generator (so the values do not depend on sharding or on the target dtype).

    normal(0, 0.02) for embeddings and projections (biases too, so Dream's q/k/v biases are
    exercised); norm weights 1 + normal(0, 0.1); the LM head and the MoE routers normal(0,
    d ** -0.5), so the logits and router scores have a spread of about 1 (with 0.02 every token
    and every expert would be almost equally likely; the expert biases stay at 0.02).
    """
    head_names = ("lm_head.weight", "model.transformer.ff_out.weight")
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, t in model.state_dict().items():
        value = torch.randn(t.shape, generator=generator, device=device, dtype=torch.float32)
        # In place: a full-size embedding is 2 GB in fp32.
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            value.mul_(0.1).add_(1.0)
        elif name in head_names or name.endswith("mlp.gate.weight"):
            value.mul_(1.0 / math.sqrt(t.shape[-1]))
        else:
            value.mul_(0.02)
        yield name, value


def _write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, shards: int, save_file
) -> None:
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
        return
    names = list(tensors)
    shards = min(shards, len(names))
    bounds = [round(i * len(names) / shards) for i in range(shards + 1)]
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[bounds[i] : bounds[i + 1]]}
        save_file(part, str(path / file), metadata=metadata)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer(kind: str, config: dict[str, Any], path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = {"llada": _LLADA_SPECIALS, "dream": _DREAM_SPECIALS}.get(kind, _LING_SPECIALS)
    vocab_size = config.get("embedding_size") or config["vocab_size"]
    if kind == "llada":
        vocab_size = min(vocab_size, config["vocab_size"])
    if vocab_size < _NUM_BYTES + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is too small for the tiny tokenizer "
            f"({_NUM_BYTES} bytes + {len(specials)} special tokens)"
        )

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(_NUM_BYTES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fillers = [f"<|reserved_token_{i}|>" for i in range(vocab_size - _NUM_BYTES - len(specials))]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials + fillers]
    )

    ids = {t: _NUM_BYTES + i for i, t in enumerate(specials)}
    if kind == "llada":
        named = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mdm_mask|>",
        }
        template = LLADA_CHAT_TEMPLATE
    elif kind in ("llada2", "lladamoe"):
        named = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
        }
        template = LING_CHAT_TEMPLATE
    else:
        named = {
            "bos_token": "<|beginoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
        }
        template = DREAM_CHAT_TEMPLATE
    # The config's special ids must be the tokenizer's (overrides may move them: then they must
    # still name these tokens).
    for field, token in (
        ("mask_token_id", named["mask_token"]),
        ("eos_token_id", named["eos_token"]),
    ):
        if config.get(field) != ids[token]:
            raise ValueError(
                f"config {field}={config.get(field)} but the tiny tokenizer "
                f"puts {token} at {ids[token]}"
            )

    # Written by hand (not with save_pretrained) so the files are the same whatever the installed
    # transformers version, in the layout the official repositories use.
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(specials + fillers, start=_NUM_BYTES)
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **named,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get(
            "max_sequence_length", config.get("max_position_embeddings", 131072)
        ),
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(path / "special_tokens_map.json", "w") as f:
        json.dump(named, f, indent=2)
        f.write("\n")
