"""LLaDA / Dream models: loading the official file formats, forward against an independent naive
implementation, padding, dtypes, the layer protocol and the tiny tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskkv.models import (
    DreamConfig,
    DreamModelLM,
    LLaDAConfig,
    LLaDAModelLM,
    default_position_ids,
    load_checkpoint,
)
from maskkv.testing import random_model, tiny_checkpoint

KINDS = ["llada", "dream"]
CLASSES = {"llada": LLaDAModelLM, "dream": DreamModelLM}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """kind -> single-file checkpoint directory (fp32, seed 0)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: tiny_checkpoint(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def models(ckpt):
    return {kind: load_checkpoint(ckpt[kind]) for kind in KINDS}


def _ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# An independent, deliberately plain implementation from the raw tensors: explicit per-head loops,
# RoPE as rotations of (i, i + D/2) pairs by pos * theta^(-2i/D), softmax written out.
# ------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):  # x [T, D], pos [T]
    half = x.shape[-1] // 2
    angle = pos[:, None].double() * theta ** (-2.0 * torch.arange(half).double() / x.shape[-1])
    c, s = angle.cos().float(), angle.sin().float()
    a, b = x[:, :half], x[:, half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def _naive_logits(kind, path, ids, mask=None):
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    if kind == "llada":
        p, d, hq, hkv, nl = (
            "model.transformer.",
            cfg["d_model"],
            cfg["n_heads"],
            cfg["n_kv_heads"],
            cfg["n_layers"],
        )
        eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
        names = dict(
            emb=p + "wte.weight",
            ln1="attn_norm",
            q="q_proj",
            k="k_proj",
            v="v_proj",
            o="attn_out",
            ln2="ff_norm",
            gate="ff_proj",
            up="up_proj",
            down="ff_out",
            norm=p + "ln_f.weight",
            head=p + "ff_out.weight",
            layer=p + "blocks.{}.",
        )
    else:
        d, hq, hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        nl, eps, theta = cfg["num_hidden_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        names = dict(
            emb="model.embed_tokens.weight",
            ln1="input_layernorm",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            ln2="post_attention_layernorm",
            gate="mlp.gate_proj",
            up="mlp.up_proj",
            down="mlp.down_proj",
            norm="model.norm.weight",
            head="lm_head.weight",
            layer="model.layers.{}.",
        )
    hd = d // hq

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    out = []
    for b in range(ids.shape[0]):
        real = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else mask[b].bool()
        pos = (real.long().cumsum(0) - 1).clamp(min=0)
        x = w[names["emb"]][ids[b]]
        for i in range(nl):
            L = names["layer"].format(i)
            h = _rms(x, w[L + names["ln1"] + ".weight"], eps)
            q, k, v = lin(h, L + names["q"]), lin(h, L + names["k"]), lin(h, L + names["v"])
            heads = []
            for j in range(hq):
                g = j // (hq // hkv)  # the KV head of query head j
                qj = _rope(q[:, j * hd : (j + 1) * hd], pos, theta)
                kj = _rope(k[:, g * hd : (g + 1) * hd], pos, theta)
                s = (qj @ kj.T) / math.sqrt(hd)
                s = s.masked_fill(~real[None, :], float("-inf"))
                heads.append(torch.softmax(s, dim=-1) @ v[:, g * hd : (g + 1) * hd])
            x = x + lin(torch.cat(heads, dim=-1), L + names["o"])
            h = _rms(x, w[L + names["ln2"] + ".weight"], eps)
            x = x + lin(
                torch.nn.functional.silu(lin(h, L + names["gate"])) * lin(h, L + names["up"]),
                L + names["down"],
            )
        out.append(_rms(x, w[names["norm"]], eps) @ w[names["head"]].T)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_single_and_sharded_load_identically(kind, ckpt, models, tmp_path):
    sharded = tiny_checkpoint(kind, tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (sharded / "model.safetensors").exists()
    ids = _ids(2, 9)
    ref = models[kind](ids).logits
    cls = CLASSES[kind]
    for model in (
        load_checkpoint(sharded),
        cls.from_pretrained(sharded),
        cls.from_pretrained(ckpt[kind]),
    ):
        assert type(model) is cls
        assert torch.equal(model.eval()(ids).logits, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_resolve_without_remote_code(kind, ckpt):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(ckpt[kind])
    assert "auto_map" in json.loads((ckpt[kind] / "config.json").read_text())
    assert type(config) is (LLaDAConfig if kind == "llada" else DreamConfig)
    for auto in (AutoModel, AutoModelForMaskedLM):
        assert type(auto.from_pretrained(ckpt[kind])) is CLASSES[kind]
    if kind == "llada":  # the official auto_map also names AutoModelForCausalLM
        from transformers import AutoModelForCausalLM

        assert type(AutoModelForCausalLM.from_pretrained(ckpt[kind])) is LLaDAModelLM


def test_uniform_config_names():
    llada, dream = LLaDAConfig(), DreamConfig()  # defaults: LLaDA-8B, Dream-7B
    assert (llada.num_hidden_layers, llada.num_attention_heads, llada.num_key_value_heads) == (
        32,
        32,
        32,
    )
    assert (llada.hidden_size, llada.head_dim, llada.intermediate_size) == (4096, 128, 12288)
    assert (llada.mask_token_id, llada.eos_token_id, llada.pad_token_id) == (126336, 126081, 126081)
    assert llada.rope_theta == 500000.0 and llada.rms_norm_eps == 1e-5
    assert (dream.num_hidden_layers, dream.num_attention_heads, dream.num_key_value_heads) == (
        28,
        28,
        4,
    )
    assert (dream.hidden_size, dream.head_dim, dream.intermediate_size) == (3584, 128, 18944)
    assert (dream.mask_token_id, dream.eos_token_id, dream.pad_token_id) == (151666, 151643, 151643)
    assert dream.rope_theta == 1e6 and dream.rms_norm_eps == 1e-6
    assert LLaDAModelLM.dllm_kind == "llada" and DreamModelLM.dllm_kind == "dream"


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_misnamed_tensor_is_named(kind, ckpt, tmp_path):
    victim = (
        "model.transformer.blocks.1.k_proj.weight"
        if kind == "llada"
        else "model.layers.1.self_attn.k_proj.bias"
    )
    tensors = load_file(str(ckpt[kind] / "model.safetensors"))
    for case in ("missing", "misnamed"):
        path = tiny_checkpoint(kind, tmp_path / case, tokenizer=False)
        broken = dict(tensors)
        value = broken.pop(victim)
        if case == "misnamed":
            broken[victim.replace("k_proj", "key_proj")] = value
        save_file(broken, str(path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"missing tensor '{victim}'") as err:
            load_checkpoint(path)
        if case == "misnamed":
            assert victim.replace("k_proj", "key_proj") in str(err.value)

    # A shard named in the index that does not hold its tensor.
    path = tiny_checkpoint(kind, tmp_path / "sharded", shards=2, tokenizer=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][victim]
    part = load_file(str(shard))
    part.pop(victim)
    save_file(part, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=victim):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_naive_implementation(kind, ckpt, models):
    config = models[kind].config
    if kind == "dream":  # GQA and q/k/v biases are really exercised
        assert config.num_key_value_heads < config.num_attention_heads
        bias = load_file(str(ckpt[kind] / "model.safetensors"))[
            "model.layers.0.self_attn.q_proj.bias"
        ]
        assert bias.abs().max() > 0
    ids = _ids(2, 11)
    with torch.no_grad():
        got = models[kind](ids).logits
    want = _naive_logits(kind, ckpt[kind], ids)
    assert got.shape == (2, 11, 320)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # And with a left-padded row (positions cumsum(mask) - 1, padding keys excluded).
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        got = models[kind](ids, attention_mask=mask).logits
    torch.testing.assert_close(
        got, _naive_logits(kind, ckpt[kind], ids, mask), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_row_equals_unpadded_row(kind, models):
    model, pad = models[kind], models[kind].config.pad_token_id
    long_row, short_row = _ids(1, 12, seed=1), _ids(1, 7, seed=2)
    batch = torch.cat([long_row, torch.cat([torch.full((1, 5), pad), short_row], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    assert default_position_ids(batch, mask)[1].tolist() == [0] * 6 + list(range(1, 7))
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, 5:], model(short_row).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[0], model(long_row).logits[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(padded).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_load(kind, dtype, ckpt, models):
    ids = _ids(1, 8)
    ref = models[kind](ids).logits.detach()
    for model in (
        load_checkpoint(ckpt[kind], dtype=dtype),
        load_checkpoint(ckpt[kind], dtype=str(dtype).removeprefix("torch.")),
        CLASSES[kind].from_pretrained(ckpt[kind], torch_dtype=dtype),
    ):
        assert {p.dtype for p in model.parameters()} == {dtype}
        cos, sin = model.rotary(default_position_ids(ids))
        assert cos.dtype == sin.dtype == torch.float32
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.dtype == dtype
        assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()

    # A half-precision checkpoint on disk loads in its own dtype by default.
    name = f"{kind}_{str(dtype).removeprefix('torch.')}"
    path = tiny_checkpoint(kind, ckpt[kind].parent / name, dtype=dtype, tokenizer=False)
    assert load_checkpoint(path).dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
def test_random_model_equals_tiny_checkpoint(kind, models):
    model = random_model(kind)
    assert type(model) is CLASSES[kind] and not model.training
    ids = _ids(2, 6)
    assert torch.equal(model(ids).logits, models[kind](ids).logits)
    layers = {"llada": {"n_layers": 3}, "dream": {"num_hidden_layers": 3}}[kind]
    half = random_model(kind, dtype=torch.bfloat16, **layers)
    assert half.dtype == torch.bfloat16 and len(half.layers) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_layer_protocol_on_chunks(kind, models):
    """The generation loop calls the layer steps on token chunks: a chunk's result must be the
    slice of the full-sequence result, and the protocol loop must give model(...).logits."""
    model = models[kind]
    ids = _ids(2, 10)
    pos = default_position_ids(ids)
    with torch.no_grad():
        hidden = model.embed(ids)
        cos, sin = model.rotary(pos)
        assert cos.shape == (2, 10, model.config.head_dim)
        layer = model.layers[0]
        q, k, v = layer.qkv(hidden, cos, sin)
        assert q.shape == (2, model.config.num_attention_heads, 10, model.config.head_dim)
        assert (
            k.shape == v.shape == (2, model.config.num_key_value_heads, 10, model.config.head_dim)
        )
        qc, kc, vc = layer.qkv(hidden[:, 3:7], cos[:, 3:7], sin[:, 3:7])
        for full, chunk in ((q, qc), (k, kc), (v, vc)):
            torch.testing.assert_close(chunk, full[:, :, 3:7], rtol=1e-6, atol=1e-6)

        # The protocol loop reproduces forward(), running attention per chunk of queries.
        h = hidden
        for layer in model.layers:
            q, k, v = layer.qkv(h, cos, sin)
            g = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            parts = []
            for lo, hi in ((0, 4), (4, 10)):
                a = torch.nn.functional.scaled_dot_product_attention(q[:, :, lo:hi], kk, vv)
                parts.append(layer.mlp_block(layer.attn_output(h[:, lo:hi], a)))
            h = torch.cat(parts, dim=1)
        logits = torch.cat([model.head(h[:, :5]), model.head(h[:, 5:])], dim=1)
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_round_trip_and_special_ids(kind, ckpt, models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt[kind])
    config = models[kind].config
    assert tok.mask_token_id == config.mask_token_id
    assert tok.eos_token_id == config.eos_token_id and tok.pad_token_id == config.pad_token_id
    assert len(tok) <= models[kind].get_input_embeddings().num_embeddings
    text = "Héllo,  wörld!\n\tx = 1 + 2 # ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    if kind == "llada":
        assert prompt == (
            "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        mask_token = "<|mdm_mask|>"
    else:
        assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        mask_token = "<|mask|>"
    assert tok.convert_tokens_to_ids(mask_token) == config.mask_token_id
    assert tok(mask_token * 3)["input_ids"] == [config.mask_token_id] * 3


def test_unsupported_config_is_refused():
    with pytest.raises(NotImplementedError, match="block_type"):
        LLaDAModelLM(
            LLaDAConfig(
                d_model=32,
                n_heads=2,
                n_layers=1,
                mlp_hidden_size=32,
                vocab_size=64,
                embedding_size=64,
                block_type="sequential",
            )
        )
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        DreamConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
