"""Held-out value accuracy of the lab runs (mqar.py logs) against steps: mqar_curves.png."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
RUNS = {
    "w24": "MLM 0.3, 2-4 pairs, lr 2e-3",
    "w24nomlm": "same, no MLM",
    "word": "no MLM, 2-8 pairs, lr 1e-3",
    "wordmlm": "MLM 0.15, 2-8 pairs, lr 1e-3",
    "char": "1-letter keys, no MLM, 2-8 pairs, lr 1e-3",
    "c1": "1-letter keys and values, MLM 0.3, 2-4 pairs, lr 2e-3",
}
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, label in RUNS.items():
    rows = [json.loads(line) for line in (here / f"{name}.log").read_text().splitlines()]
    ax.plot([r["step"] for r in rows], [r["tok"] for r in rows], label=f"{name}: {label}")
w24b = [json.loads(line) for line in (here / "w24b.log").read_text().splitlines()]
ax.plot([7400 + r["step"] for r in w24b], [r["tok"] for r in w24b], "C0--", label="w24 resumed")
# The Dream-layout runs of w24's recipe: GQA in three parts (each resumed from the previous
# one's weights with a fresh optimizer), and MHA.
dream: list[dict] = []
for part in ("dream.log", "dream_b.log", "dream_c.log"):
    rows = [json.loads(line) for line in (here / part).read_text().splitlines()]
    offset = dream[-1]["step"] if dream else 0
    dream += [r | {"step": offset + r["step"]} for r in rows]
ax.plot([r["step"] for r in dream], [r["tok"] for r in dream], "k:", label="Dream, GQA 4/2")
mha = [json.loads(line) for line in (here / "dream_mha.log").read_text().splitlines()]
ax.plot([r["step"] for r in mha], [r["tok"] for r in mha], "k-.", label="Dream, MHA")
# The Dream layout from random weights with masked-LM 0.5 (fourth session).
mlm05 = [json.loads(line) for line in (here / "dream_mlm05.log").read_text().splitlines()]
ax.plot([r["step"] for r in mlm05], [r["tok"] for r in mlm05], "c-",
        label="Dream, GQA 4/2, MLM 0.5, from scratch")  # fmt: skip
# The Dream layout (GQA 4/2) started from w24's converted weights (stage1; --init-llada).
conv = [json.loads(line) for line in (here / "dream_from_llada.log").read_text().splitlines()]
ax.plot([r["step"] for r in conv], [r["tok"] for r in conv], "m-o", ms=3,
        label="Dream, GQA 4/2, from w24's converted weights")  # fmt: skip
ax.set_xlabel("step (batch 32)")
ax.set_ylabel("held-out value-token accuracy")
ax.set_ylim(0, 1)
ax.set_title("Multi-query recall, 4 layers d128, one CPU core (LLaDA layout unless Dream)")
ax.legend(fontsize=7, loc="upper right")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(here / "mqar_curves.png", dpi=110)
print(f"wrote {here / 'mqar_curves.png'}")
