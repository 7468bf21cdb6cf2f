"""The two figures of ``diagnose_eviction.py`` (its JSON in, PNG out).

- ``plot``: (a) error rate of every answer character, (b) the pass that reveals the first
  character, (c) per layer, the later FullCache passes' attention on values each method evicted,
  (d) the last layer pass by pass, (e) the rule ablations against budget, (f) exact match per
  decoding rule and cache policy.
- ``plot_survival``: heatmaps of the asked values' characters kept per layer and KV head.
"""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    focus = cfg["focus_budget"]
    # (a) error rate of every answer character
    ax = axes[0][0]
    shown = [r for r in result["answers"] if r["budget"] in (None, *cfg["budgets"][:3])]
    width = 0.8 / len(shown)
    for i, r in enumerate(shown):
        errs = [e if e is not None else 0 for e in r["char_error"]]
        label = r["method"] if r["budget"] is None else f"{r['method']} {r['budget']}"
        ax.bar([c + i * width for c in range(len(errs))], errs, width, label=label)
    ax.set_xlabel("answer character (value j: letter, digit, symbol; then ',')")
    ax.set_ylabel("error rate")
    ax.set_title("(a) which answer characters go wrong")
    ax.legend(fontsize=7, ncol=2)
    # (b) pass at which the first answer character is revealed
    ax = axes[0][1]
    for r in result["answers"]:
        if r["budget"] in (None, focus):
            hist = r["first_char_reveal_hist"]
            label = r["method"] if r["budget"] is None else f"{r['method']} {r['budget']}"
            ax.plot(range(len(hist)), hist, marker="o", label=label)
    ax.set_xlabel("pass (0 = step 1, uncached)")
    ax.set_ylabel("examples")
    ax.set_title("(b) when the first answer character is revealed")
    ax.legend(fontsize=8)
    # (c) per layer: attention of the later FullCache passes on the values each method evicted
    passes = result["evicted_attention"]["passes"]
    later = passes[1:]
    layers = len(passes[0]["masked"]["prompt"])

    def mean_over_passes(group: str, what: str) -> list[float]:
        got = [p[group][what] for p in later if p[group].get(what) is not None]
        return [sum(v[layer] for v in got) / len(got) for layer in range(layers)]

    ax = axes[0][2]
    bars = [(g, name) for g in ("shifted", "masked") for name in ("maskkv", "tailvote")]
    bars = [(g, n) for g, n in bars if any(p[g].get(f"{n}:evicted_evidence") for p in later)]
    for i, (g, name) in enumerate(bars):
        ys = mean_over_passes(g, f"{name}:evicted_evidence")
        ax.bar([layer + i * 0.2 for layer in range(layers)], ys, 0.2,
               label=f"{g} query, values {name} evicted")  # fmt: skip
    ax.set_xticks([layer + 0.3 for layer in range(layers)], [f"layer {i}" for i in range(layers)])
    ax.set_ylabel("attention on evicted values (mean over passes 1+)")
    ax.set_title(f"(c) FullCache's later passes read values the budget-{focus} vote evicted",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    # (d) the last layer, pass by pass: the shifted query reads the same values at every pass
    ax = axes[1][0]
    last = layers - 1
    for g, style in (("shifted", "-"), ("masked", "--")):
        if not any(p[g].get("evidence") for p in passes):
            continue
        for what, color in (("evidence", "k"), ("maskkv:evicted_evidence", "C1"),
                            ("tailvote:evicted_evidence", "C2")):  # fmt: skip
            ys = [None if p[g].get(what) is None else p[g][what][last] for p in passes]
            label = {"evidence": "all asked values"}.get(what, what.replace(":evicted_evidence",
                                                                           " evicted"))  # fmt: skip
            ax.plot(range(len(ys)), ys, style, color=color, label=f"{g} query: {label}")
    ax.set_xlabel("pass of the FullCache generation (0 = step 1, the vote)")
    ax.set_ylabel(f"attention on asked values, layer {last}")
    ax.set_title(f"(d) layer {last}, pass by pass", fontsize=9)
    ax.legend(fontsize=7)
    # (e) ablations
    ax = axes[1][1]
    for i, r in enumerate(result["ablations"]):
        ax.plot(r["budgets"], r["accuracy"], marker="o", label=r["label"], color=f"C{i % 10}",
                linestyle="-" if i < 10 else ":")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg["budgets"], [str(b) for b in cfg["budgets"]])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("budget (prompt KV pairs per layer and KV head)")
    ax.set_ylabel("exact match")
    ax.set_title("(e) one part of the rule changed at a time")
    ax.legend(fontsize=6)
    # (f) decoding rules and cache policies
    ax = axes[1][2]
    settings = list(dict.fromkeys(r["setting"] for r in result["policies"]))
    names = list(dict.fromkeys(r["method"] for r in result["policies"]))
    for i, name in enumerate(names):
        ys = [next(r["accuracy"] for r in result["policies"]
                   if r["setting"] == st and r["method"] == name) for st in settings]  # fmt: skip
        ax.bar([j + i * 0.27 for j in range(len(settings))], ys, 0.27, label=name)
    ax.set_xticks([j + 0.27 for j in range(len(settings))], settings, fontsize=7, rotation=12)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact match")
    ax.set_title(f"(f) decoding rules and cache policies, budget {focus}, blocks of "
                 f"{cfg['policy_block_length']}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.suptitle(f"{cfg['model']}, {cfg['task']}: {cfg['num_examples']} {cfg['split']} examples, "
                 f"{cfg['prompt_len']}-token prompts")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_survival(result: dict, path: Path) -> Path:
    """Heatmaps: rows = (layer, KV head), columns = (needle, character); share kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    rows = [r for r in result["survival"] if r["budget"] in cfg["budgets"][:3]]
    fig, axes = plt.subplots(
        2, len(rows) // 2, figsize=(4.2 * (len(rows) // 2) + 1.5, 7.5), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for ax, r in zip([a for line in axes for a in line], rows):
        grid, ylabels = [], []
        for layer, entry in enumerate(r["layers"]):
            for head, needles in enumerate(entry["value"]):
                grid.append([c for needle in needles for c in needle])
                ylabels.append(f"L{layer} h{head}")
        needles = len(r["layers"][0]["value"][0])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(3 * needles),
                      [f"v{j + 1}.{c}" for j in range(needles) for c in "LDS"], fontsize=7)  # fmt: skip
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
        ax.set_title(f"{r['method']}, budget {r['budget']}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of prompts with the character kept")
    fig.suptitle(f"{cfg['model']}, {cfg['task']}: asked values kept per layer and KV head\n"
                 "(v1.L = the first value's letter, D its digit, S its symbol)")  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
