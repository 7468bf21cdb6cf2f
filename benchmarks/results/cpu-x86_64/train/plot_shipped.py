"""Training curves of the two shipped quality models (python/maskkv/assets/tiny-{llada,dream}-kv):
running one-shot exact match per task and the curriculum's longest prompt, against steps.

    python benchmarks/results/cpu-x86_64/train/plot_shipped.py   # -> shipped_models_curves.png
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
assets = here.parents[3] / "python" / "maskkv" / "assets"
RUNS = {
    "tiny-llada-kv": "LLaDA layout (MHA), from the lab's stage-1 weights",
    "tiny-dream-kv": "Dream layout (GQA 4/2), from llada3 step 10909, converted",
}
ANNEAL = {"tiny-llada-kv": 12743, "tiny-dream-kv": 1688}  # resumed with a shorter cosine
TASKS = ("kv_retrieval", "kv_retrieval_qfirst", "multi_needle", "passkey", "passkey_qfirst")
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
for ax, (name, title) in zip(axes, RUNS.items()):
    log = json.loads((assets / name / "train_log.json").read_text())["log"]
    steps = [r["step"] for r in log]
    for task in TASKS:
        ax.plot(steps, [r.get(f"exact_{task}", float("nan")) for r in log], lw=1, label=task)
    ax.axvline(ANNEAL[name], color="grey", lw=0.8, ls="--", label="learning-rate anneal")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("running one-shot exact match (training rows)")
    ax.set_title(f"{name}: {title}", fontsize=9)
    twin = ax.twinx()
    twin.plot(steps, [r["max_len"] for r in log], "k:", lw=1, label="longest prompt")
    twin.set_ylabel("curriculum's longest prompt (tokens)")
    twin.set_ylim(0, 540)
    lines = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="lower right")
fig.savefig(here / "shipped_models_curves.png", dpi=110)
print("wrote", here / "shipped_models_curves.png")
