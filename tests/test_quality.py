"""The quality suite: synthetic tasks are deterministic and parse back, the committed tiny LLaDA
loads and solves held-out examples with FullCache, every method runs, training and the CLI work."""

import argparse
import json

import pytest
import torch

from maskkv import methods
from maskkv.models import load_checkpoint
from maskkv.quality import evaluate, tasks
from maskkv.quality.train import TrainConfig, save, train

# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_examples_are_deterministic_and_well_formed(task):
    a = tasks.make_examples(task, 5, split="test", prompt_len=96)
    b = tasks.make_examples(task, 5, split="test", prompt_len=96)
    assert a == b
    assert len({e.prompt for e in a}) == 5  # different seeds, different prompts
    for ex in a:
        assert len(tasks.encode_prompt(ex)) == 96
        lo, hi = ex.evidence
        assert ex.prompt[lo:hi] == ex.answer
        assert ex.prompt.count(ex.answer) == 1
        assert [ex.answer[i] in alphabet for i, alphabet in enumerate(tasks.ALPHABETS)]
    # Held-out and training examples never share a seed.
    train_seeds = {e.seed for e in tasks.make_examples(task, 5, split="train", prompt_len=96)}
    assert not train_seeds & {e.seed for e in a}


def test_question_position():
    last = tasks.make_example("passkey", 7, prompt_len=64)
    first = tasks.make_example("passkey_qfirst", 7, prompt_len=64)
    assert last.prompt.endswith("|code?") and first.prompt.startswith("code?|")


def test_parse_answer():
    ex = tasks.make_example("passkey", 1, prompt_len=64)
    ids = tasks.encode_answer(ex, 8)
    assert ids[3:] == [tasks.EOS_ID] * 5
    assert tasks.parse_answer(ids) == ex.answer
    assert tasks.parse_answer(tasks.encode(" Q7#") + [tasks.MASK_ID]) == "Q7#"  # no EOS
    assert tasks.parse_answer([tasks.EOS_ID] + tasks.encode("Q7#")) == ""
    with pytest.raises(ValueError, match="gen_length"):
        tasks.encode_answer(ex, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        tasks.make_example("nope", 0)
    with pytest.raises(ValueError, match="prompt_len"):
        tasks.make_example("passkey", 0, prompt_len=8)
    with pytest.raises(ValueError, match="split"):
        tasks.make_examples("passkey", 1, split="dev")


# ----------------------------------------------------------------------------- committed model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return evaluate.load_model(evaluate.DEFAULT_MODEL, "cpu")


def test_asset_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in evaluate.DEFAULT_MODEL.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert methods.PROFILE_FILENAME in files and "README.md" in files
    assert sum(files.values()) <= 4 * 2**20


def test_fullcache_solves_held_out_examples(model):
    # Measured (benchmarks/results/cpu-x86_64/quality.json, 100 held-out examples per task):
    # FullCache exact match 1.00 on passkey and 1.00 on passkey_qfirst, so 16/16 here. The
    # threshold leaves room for other CPUs' and GPUs' float rounding, not for a broken model.
    for task in tasks.TASKS:
        examples = tasks.make_examples(task, 16, split="test")
        row = evaluate.evaluate_method(model, "fullcache", None, examples, batch_size=16)
        assert row["accuracy"] >= 0.8, (task, row)
        assert row["evidence_recall"] == 1.0


def test_every_method_runs_at_one_budget(model):
    examples = tasks.make_examples("passkey", 4, split="test")
    profile = methods.LayerProfile.find(evaluate.DEFAULT_MODEL)
    assert profile is not None and profile.num_layers == model.config.n_layers
    accuracy = {}
    for name in methods.available():
        budget = None if name in evaluate.UNBUDGETED else 16
        row = evaluate.evaluate_method(model, name, budget, examples, profile=profile)
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["evidence_recall"] <= 1.0
        assert len(row["evidence_recall_any_head_per_layer"]) == model.config.n_layers
        if budget is not None:
            assert row["kept_per_head"] == pytest.approx(16, abs=1e-6)  # mean over layers
        accuracy[name] = row["accuracy"]
    # Measured on 100 held-out examples per task: MaskKV 1.00 at every budget 8..64, the window
    # methods <= 0.12 (they rarely keep the code in layer 0, where the answer reads it). A quality
    # regression guard for the mask-query selection path, not a claim about other models.
    assert accuracy["maskkv"] >= 0.75 and accuracy["fullcache"] >= 0.75


def test_evidence_recall_counts_kept_positions(model):
    examples = tasks.make_examples("passkey", 2, split="test")
    ids = torch.tensor([tasks.encode_prompt(e) for e in examples])
    spans = [(e.evidence[0] + 1, e.evidence[1] + 1) for e in examples]
    # A budget covering the whole prompt keeps everything.
    everything = methods.get("snapkv", budget=ids.shape[1])
    assert evaluate.evidence_recall(model, everything, ids, spans, 8) == 1.0
    # Budget 1 with a 1-token window keeps only the last prompt token, never the code.
    last_only = methods.get("snapkv", budget=1, window=1)
    assert evaluate.evidence_recall(model, last_only, ids, spans, 8) == 0.0


# ----------------------------------------------------------------------------- training, CLI


def test_train_and_save_roundtrip(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=2, min_prompt_len=40, max_prompt_len=48, warmup=1)
    cfg.model.update(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=32)
    trained, log = train(cfg, progress=False, log_every=1)
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for r in log for k, v in r.items() if "loss" in k)
    path = save(trained, tmp_path / "m", cfg, log)
    loaded = load_checkpoint(path)
    x = torch.tensor([tasks.encode_prompt(tasks.make_example("passkey", 0, 48))])
    torch.testing.assert_close(loaded(x).logits, trained(x).logits)
    assert json.loads((path / "train_log.json").read_text())["config"]["steps"] == 2


def test_eval_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    evaluate.add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "q.json"
    args = parser.parse_args(
        [
            "eval",
            "--methods",
            "fullcache,maskkv",
            "--budgets",
            "8",
            "--num-examples",
            "2",
            "--tasks",
            "passkey",
            "--prompt-len",
            "96",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-plot",
        ]
    )
    args.func(args)
    result = json.loads(out.read_text())
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [
        ("fullcache", None),
        ("maskkv", 8),
    ]
    assert "rel.full" in capsys.readouterr().out
