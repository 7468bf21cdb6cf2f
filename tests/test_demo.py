"""``maskkv demo`` at small kernel shapes: the backend line comes before any timing, the ops are
timed warm, and every method answers the first held-out kv_retrieval question to tiny-llada-kv."""

import re

import torch

from maskkv import methods
from maskkv.cli import main
from maskkv.quality import tasks


def test_demo_prints_backend_timings_and_every_method(capsys):
    threads = torch.get_num_threads()
    argv = ["demo", "--prompt-len", "256", "--gen-length", "32", "--budget", "16"]
    assert main([*argv, "--repeats", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread count does not leak
    lines = capsys.readouterr().out.splitlines()

    backend = next(i for i, s in enumerate(lines) if s.startswith("backend "))
    timing = next(i for i, s in enumerate(lines) if s.startswith("warm, median of 1 calls"))
    assert backend < timing  # the build / load is done and said before anything is timed
    assert re.match(r"backend (cpp|torch|triton): ", lines[backend])
    assert re.search(r"select_and_gather [\d.]+ ms, ragged_attention [\d.]+ ms", lines[timing])

    example = tasks.make_examples("kv_retrieval", 1, split="test", prompt_len=512)[0]
    assert any(f"expected {example.answer} " in s for s in lines)
    rows = {}
    for s in lines:
        m = re.fullmatch(r"  (\w+) +(\S+) +(yes|no) +(.+?) +([\d.]+) ms", s)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    shown = [type(methods.get(m)).__name__ for m in methods.available()]
    assert sorted(rows) == sorted(shown)
    for name, (answer, right, kept, _) in rows.items():
        assert (answer == example.answer) == (right == "yes"), name
        if name not in ("FullCache", "NoCache"):
            assert kept.startswith("16 (3.1%)"), (name, kept)
    # The references answer it; so does MaskKV (1.00 over the suite's 100 such questions).
    assert rows["FullCache"][1] == rows["NoCache"][1] == rows["MaskKV"][1] == "yes"
    assert any(s.startswith("run the full suite: maskkv eval --model tiny-llada-kv") for s in lines)
    assert any("maskkv serve --model tiny-llada-kv" in s for s in lines)
