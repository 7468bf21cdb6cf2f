"""The lm-eval model ``maskkv`` (maskkv.eval_harness): model_args checks, generate_until against
unbatched ``maskkv.generate``, the Monte Carlo likelihood against an exact forward, the offline
lm-eval task against ``maskkv eval``, and a 2-process ``accelerate launch`` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lm_eval.api.instance import Instance  # noqa: E402

from maskkv.eval_harness import TASKS_DIR, MaskKVLM, parse_model_args  # noqa: E402
from maskkv.quality import tasks as task_lib  # noqa: E402
from maskkv.quality.evaluate import (  # noqa: E402
    ASSETS,
    DEFAULT_MODEL,
    evaluate_method,
    load_model,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(DEFAULT_MODEL)
# The quality suite's decoding (gen_length 8, 8 steps, one block) and the BOS its prompts carry.
BASE_ARGS = f"pretrained={TINY},add_bos_token=true,gen_length=8,steps=8"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _results(out_dir: Path) -> dict:
    (path,) = out_dir.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"pretrained": TINY, "budjet": 8}, "budjet"),
        ({"pretrained": TINY, "method": "nosuchmethod"}, "nosuchmethod"),
        ({"pretrained": "/nonexistent/ckpt"}, "/nonexistent/ckpt"),
        ({"pretrained": TINY, "budget": 0}, "budget"),
        ({"pretrained": TINY, "gen_length": 8, "block_length": 3}, "block_length"),
        ({"pretrained": TINY, "dtype": "float8"}, "dtype"),
        ({"pretrained": TINY, "cache": "h2o"}, "cache"),
        ({"pretrained": TINY, "cache": "prompt", "refresh_prompt": True}, "refresh_prompt"),
        ({"pretrained": TINY, "cache": "dual", "threshold": 1.5}, "tau"),
        ({"pretrained": TINY, "threshold": 0.9, "factor": 1.0}, "threshold"),
        ({}, "pretrained"),
    ],
)
def test_bad_model_args_fail_before_loading(args, named, monkeypatch):
    import maskkv.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the model_args were checked")

    monkeypatch.setattr(maskkv.models, "load_checkpoint", no_load)
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        MaskKVLM(**args)


def test_checkpoint_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match=f"pretrained: {tmp_path} has no config.json"):
        parse_model_args(pretrained=str(tmp_path))


# ------------------------------------------------------------------------------ requests


@pytest.fixture(scope="module")
def lm():
    return MaskKVLM(pretrained=TINY, add_bos_token=True, method="maskkv", budget=16, batch_size=4)


def test_generate_until_matches_unbatched_generate(lm):
    """Ragged prompts (left-padded in one batch), per-request lengths and stop sequences give
    what ``maskkv.generate`` gives each prompt alone, cut by the same rules."""
    from maskkv.generation import generate

    examples = [
        task_lib.make_example("passkey", 2 * 10**9 + i, n)
        for i, n in enumerate([96, 160, 128, 200, 112])
    ]
    stops = [[], [], [examples[2].answer[1]], [], ["zz", examples[4].answer[2]]]
    lengths = [8, 8, 8, 16, 8]
    requests = [
        Instance(
            "generate_until",
            {},
            (ex.prompt, {"until": stop, "max_gen_toks": g, "do_sample": False}),
            i,
        )
        for i, (ex, stop, g) in enumerate(zip(examples, stops, lengths))
    ]
    outs = lm.generate_until(requests, disable_tqdm=True)
    for ex, stop, g, text in zip(examples, stops, lengths, outs):
        ids = torch.tensor([task_lib.encode_prompt(ex)])
        resp = generate(
            lm.model, ids, method=lm.method, gen_length=g, block_length=g, steps=g
        ).responses[0]
        expected = task_lib.parse_answer(resp.tolist())
        for s in stop:
            expected = expected.split(s)[0]
        assert text == expected
    # The model answers these, so the stop sequences really cut: row 2 keeps one character.
    assert outs[0] == examples[0].answer and outs[1] == examples[1].answer
    assert outs[2] == examples[2].answer[:1]
    assert outs[4] == examples[4].answer[:2]


def test_generate_until_runs_llada2_on_the_engine():
    """The block-causal tiny-llada2-kv: generate_until runs on the serving engine (its default
    DualCache) and gives what ``maskkv.generate`` gives each prompt alone with the same
    defaults (LLaDA2's sampler, blocks of 32 from the first prompt token), ragged prompts and
    lengths, model_args' block length."""
    from maskkv.generation import generate

    lm2 = MaskKVLM(pretrained=str(ASSETS / "tiny-llada2-kv"), method="maskkv", budget=16,
                   batch_size=3, block_length=8)  # fmt: skip
    engine = lm2._engine()
    assert engine is not None and engine.policy.name == "dual"
    examples = [
        task_lib.make_example("passkey", 2 * 10**9 + i, n) for i, n in enumerate([96, 150, 120])
    ]
    lengths = [8, 13, 6]
    requests = [
        Instance("generate_until", {}, (ex.prompt, {"until": [], "max_gen_toks": g}), i)
        for i, (ex, g) in enumerate(zip(examples, lengths))
    ]
    outs = lm2.generate_until(requests, disable_tqdm=True)
    assert all(outs)  # the model answers (a code of three characters)
    for ex, g, text in zip(examples, lengths, outs):
        ids = torch.tensor([lm2._encode(ex.prompt)])
        resp = generate(lm2.model, ids, method=lm2.method, gen_length=g, block_length=8)
        assert text == lm2._decode_response(resp.responses[0].tolist(), [])


def test_loglikelihood_one_token_is_exact(lm):
    """With one continuation token every Monte Carlo sample masks exactly it (weight 1), so the
    estimate is the exact log-probability of a forward over [context, MASK]."""
    exact_lm = MaskKVLM(pretrained=TINY, add_bos_token=True, method="nocache", mc_num=4)
    ex = task_lib.make_example("passkey", 2 * 10**9 + 7, 96)
    requests = [Instance("loglikelihood", {}, (ex.prompt, c), i) for i, c in enumerate("AQ")]
    got = [lp for lp, _ in exact_lm.loglikelihood(requests, disable_tqdm=True)]
    ids = torch.tensor([task_lib.encode_prompt(ex) + [task_lib.MASK_ID]])
    with torch.no_grad():
        logp = torch.log_softmax(exact_lm.model(ids).logits[0, -1].float(), -1)
    want = [float(logp[ord(c)]) for c in "AQ"]
    assert got == pytest.approx(want, abs=1e-4)


def test_loglikelihood_prefers_the_answer(lm):
    """Multi-token estimate under MaskKV's pruned cache: the true code is far likelier than a
    wrong one (the trained model copies it from the prompt). Continuations in the training
    format: the code, then EOS up to 8 tokens (the EOS text is read as the EOS token)."""
    ex = task_lib.make_example("passkey", 2 * 10**9 + 3, 160)
    wrong = "".join(a[(a.index(c) + 1) % len(a)] for a, c in zip(task_lib.ALPHABETS, ex.answer))
    pad = "<|endoftext|>" * 5
    lm.opts["mc_num"], lm.opts["mc_batch_size"] = 8, 8
    requests = [
        Instance("loglikelihood", {}, (ex.prompt, c + pad), i)
        for i, c in enumerate([ex.answer, wrong])
    ]
    assert lm._encode_pair(ex.prompt, ex.answer + pad)[1] == task_lib.encode_answer(ex, 8)
    (right_lp, greedy), (wrong_lp, _) = lm.loglikelihood(requests, disable_tqdm=True)
    assert greedy is False
    assert right_lp > -1.0 and wrong_lp < right_lp - 20


def test_loglikelihood_rolling_is_refused(lm):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


# ------------------------------------------------------------------------------ lm-eval runs


@pytest.fixture(scope="module")
def reference_accuracy():
    """``maskkv eval``'s accuracy (``evaluate_method``) for SnapKV at budget 64 on the first N
    held-out examples: a method that gets some, not all, right on this model."""
    model = load_model(TINY, "cpu")

    def accuracy(task: str, n: int, prompt_len: int = task_lib.DEFAULT_PROMPT_LEN) -> float:
        examples = task_lib.make_examples(task, n, split="test", prompt_len=prompt_len)
        length = task_lib.TASK_GEN_LENGTH[task]
        row = evaluate_method(
            model, "snapkv", 64, examples, gen_length=length, steps=length, recall=False
        )
        return row["accuracy"]

    return accuracy


def test_offline_lm_eval_task_matches_maskkv_eval(tmp_path, reference_accuracy):
    cmd = [
        sys.executable, "-m", "maskkv.eval_harness", "--model", "maskkv",
        "--model_args", f"{BASE_ARGS},method=snapkv,budget=64",
        "--include_path", str(TASKS_DIR), "--tasks", "maskkv_passkey,maskkv_passkey_qfirst",
        "--batch_size", "25", "--limit", "100", "--device", "cpu", "--output_path", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env(), cwd=tmp_path, capture_output=True)
    results = _results(tmp_path)
    for task in ("passkey", "passkey_qfirst"):
        got = results[f"maskkv_{task}"]["exact_match,strip"]
        want = reference_accuracy(task, 100)
        assert 0 < want < 1  # the comparison can tell a right answer from a wrong one
        assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "tasks,gen_length",
    [(("kv_retrieval", "kv_retrieval_qfirst"), 8), (("multi_needle",), 12)],
)
def test_offline_retrieval_tasks_match_maskkv_eval(tmp_path, reference_accuracy, tasks, gen_length):
    # The question-routed tasks at the models' 512 tokens, in one block of the task's length
    # (multi_needle answers in 12 tokens), as `maskkv eval` runs them.
    n = 25
    args = f"pretrained={TINY},add_bos_token=true,gen_length={gen_length},steps={gen_length}"
    cmd = [
        sys.executable, "-m", "maskkv.eval_harness", "--model", "maskkv",
        "--model_args", f"{args},method=snapkv,budget=64", "--include_path", str(TASKS_DIR),
        "--tasks", ",".join(f"maskkv_{t}" for t in tasks),
        "--batch_size", "25", "--limit", str(n), "--device", "cpu", "--output_path", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env(), cwd=tmp_path, capture_output=True)
    results = _results(tmp_path)
    for task in tasks:
        got = results[f"maskkv_{task}"]["exact_match,strip"]
        assert got == pytest.approx(reference_accuracy(task, n, 512), abs=1e-12), task


def test_accelerate_two_processes(tmp_path, reference_accuracy):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo): lm-eval splits the requests
    by rank, gathers every sample, and the accuracy is the single-process one."""
    n = 40
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517",
        "-m", "maskkv.eval_harness", "--model", "maskkv",
        "--model_args", f"{BASE_ARGS},method=snapkv,budget=64",
        "--include_path", str(TASKS_DIR), "--tasks", "maskkv_passkey",
        "--batch_size", "25", "--limit", str(n), "--output_path", str(tmp_path), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on rank 1" in proc.stderr and "on rank 0" in proc.stderr
    (samples,) = tmp_path.rglob("samples_maskkv_passkey_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == list(range(n))
    got = _results(tmp_path)["maskkv_passkey"]["exact_match,strip"]
    assert got == pytest.approx(reference_accuracy("passkey", n), abs=1e-12)


def test_chat_template_is_the_checkpoints(lm):
    """lm-eval's --apply_chat_template text is the tokenizer's own template, and its tokens
    start with exactly one BOS (the template's; add_bos_token adds no second one)."""
    chat = [{"role": "user", "content": "code?"}]
    text = lm.apply_chat_template(chat)
    assert text == lm.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    ids = lm._encode(text)
    assert ids[0] == task_lib.BOS_ID and ids[1] != task_lib.BOS_ID
    assert lm.tokenizer.decode(ids) == text


def test_cache_policy_args_map_onto_generate():
    """cache= / refresh_prompt= / threshold= become maskkv.generate's cache= and decoding=."""
    import maskkv

    opts = parse_model_args(pretrained=TINY, cache="dual", refresh_prompt=True, threshold=0.9)
    kw = opts["policy_kwargs"]
    assert kw["cache"] == maskkv.DualCache(refresh_prompt=True)
    assert kw["decoding"] == maskkv.Threshold(0.9)
    kw = parse_model_args(pretrained=TINY, cache="dllm", prompt_interval=10, factor=1.0)
    assert kw["policy_kwargs"]["cache"] == maskkv.DLLMCache(prompt_interval=10)
    assert kw["policy_kwargs"]["decoding"] == maskkv.Factor(1.0)
    with pytest.raises(ValueError, match="cache: expected one of"):
        parse_model_args(pretrained=TINY, cache="quad")
    with pytest.raises(ValueError, match="threshold, factor"):
        parse_model_args(pretrained=TINY, threshold=0.9, factor=1.0)
