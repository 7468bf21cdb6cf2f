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
# The Dream-layout run of w24's recipe, in two parts (the second resumed from the first's weights).
dream = [json.loads(line) for line in (here / "dream.log").read_text().splitlines()]
resumed = [json.loads(line) for line in (here / "dream_b.log").read_text().splitlines()]
dream += [r | {"step": dream[-1]["step"] + r["step"]} for r in resumed]
ax.plot(
    [r["step"] for r in dream], [r["tok"] for r in dream], "k:", label="Dream layout, w24's recipe"
)
ax.set_xlabel("step (batch 32)")
ax.set_ylabel("held-out value-token accuracy")
ax.set_ylim(0, 1)
ax.set_title("Multi-query recall, 4-layer d128 LLaDA, one CPU core")
ax.legend(fontsize=7, loc="upper left")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(here / "mqar_curves.png", dpi=110)
print(f"wrote {here / 'mqar_curves.png'}")
