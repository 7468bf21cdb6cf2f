"""The lab experiment of TRAINING.md (third session): does the quality suite's tiny LLaDA learn
bidirectional multi-query associative recall, and what breaks its copying plateau?

A row is key-value pairs without filler, "fox K4$. cow B1&. |", then every pair again in
random order with the values masked ("cow ???. fox ???. "): the values are the targets (all of
them masked at once, plain cross-entropy). ``--mlm P`` also masks each prompt token with
probability P and adds those tokens to the loss (masked-LM pretraining of the prompt). Not part
of the package; run from the repository root with PYTHONPATH=python:

    PYTHONPATH=python python benchmarks/results/cpu-x86_64/train/mqar-lab/mqar.py \\
        --keys word --mlm 0.3 --pairs 2,4 --lr 2e-3 --minutes 20 --out /tmp/w24.pt
    PYTHONPATH=python python .../mqar.py --pairs 5,8 --diagnose /tmp/w24.pt
    PYTHONPATH=python python .../mqar.py --kind dream --keys word --mlm 0.3 --pairs 2,4 \
        --lr 2e-3 --init-llada .../mqar-lab/stage1/model.safetensors --minutes 3   # "dream-from-llada"

One JSON line per 200 steps: running loss, and on 128 held-out rows the token accuracy of the
masked values ("tok") and the fraction of rows with every value right ("exact").
"""

import argparse
import collections
import json
import random
import string
import time

import torch
import torch.nn.functional as F

from maskkv.quality import tasks as T
from maskkv.quality.train import model_overrides, token_logits
from maskkv.testing import random_model

p = argparse.ArgumentParser()
p.add_argument("--kind", default="llada", choices=("llada", "dream"))
p.add_argument("--n-kv-heads", type=int, default=None, help="default: the layout's (Dream 2)")
p.add_argument("--keys", default="word", choices=("word", "char"))  # 3-letter words | 1 letter
p.add_argument("--pairs", default="2,8", help="fewest,most pairs per row")
p.add_argument("--vlen", type=int, default=3, help="value length (1..3)")
p.add_argument("--mlm", type=float, default=0.0, help="mask probability of prompt tokens")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--minutes", type=float, default=12)
p.add_argument("--init", default=None, help="state dict to start from (optimizer starts anew)")
p.add_argument(
    "--init-llada", default=None,
    help="a LLaDA-layout model.safetensors of the lab's shape to start a --kind dream run from "
    "(converted by maskkv.quality.convert)",
)  # fmt: skip
p.add_argument("--out", default=None, help="state dict written every 200 steps and at the end")
p.add_argument(
    "--export", default=None,
    help="directory to write model.safetensors into at the end (train.py --init-from DIR)",
)  # fmt: skip
p.add_argument("--diagnose", default=None, help="state dict: accuracy by pairs and position")
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
fewest, most = map(int, a.pairs.split(","))
KEYS = list(string.ascii_lowercase) if a.keys == "char" else list(T.KEY_WORDS)


def row(rng: random.Random) -> tuple[list[int], list[bool]]:
    n = rng.randint(fewest, most)
    keys = rng.sample(KEYS, n)
    codes_list: list[str] = []
    while len(codes_list) < n:  # distinct values (a list: a set's order varies per process)
        code = "".join(rng.choice(al) for al in T.ALPHABETS[: a.vlen])
        if code not in codes_list:
            codes_list.append(code)
    pairs = [f"{k} {c}. " for k, c in zip(keys, codes_list)]
    rng.shuffle(pairs)
    ids = [special.bos, *T.encode("".join(pairs) + "|")]
    target = [False] * len(ids)
    order = list(range(n))
    rng.shuffle(order)
    for i in order:
        ids += T.encode(f"{keys[i]} ") + T.encode(codes_list[i]) + T.encode(". ")
        target += [False] * (len(keys[i]) + 1) + [True] * a.vlen + [False] * 2
    return ids, target


def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [row(rng) for _ in range(size)]
    length = max(len(ids) for ids, _ in rows)
    x = torch.full((size, length), special.eos)
    m = torch.zeros(size, length, dtype=torch.bool)
    for i, (ids, target) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        m[i, : len(target)] = torch.tensor(target)
    return x, m


# The trainer's default shape (train.model_overrides): 4 layers, d 128, 4 heads (Dream: 2 KV
# heads), MLP 256, RoPE theta 10000; the same weights as ``train.py`` would start from.
shape = model_overrides(a.kind, n_heads=4, n_kv_heads=a.n_kv_heads)
model = random_model(a.kind, seed=0, **shape).train()
special = T.token_ids(model.config)  # BOS / EOS / mask ids of the layout


for path in (a.init, a.diagnose):
    if path:
        model.load_state_dict(torch.load(path))
if a.init_llada:
    from safetensors.torch import load_file

    from maskkv.quality.convert import dream_state_from_llada

    llada_config = random_model("llada", **model_overrides("llada", n_heads=4)).config
    state = dream_state_from_llada(load_file(a.init_llada), llada_config, model.config)
    model.load_state_dict(state)

if a.diagnose:  # accuracy of each value position, by the number of pairs in the row
    model.eval()
    x, m = batch(random.Random(7), 256)
    with torch.no_grad():
        hit = token_logits(model, torch.where(m, special.mask, x)).argmax(-1) == x
    acc = collections.defaultdict(list)
    for b in range(len(x)):
        idx = m[b].nonzero().flatten().tolist()
        for k, i in enumerate(idx):
            acc[(len(idx) // a.vlen, k % a.vlen)].append(float(hit[b, i]))
    for (n, pos), v in sorted(acc.items()):
        print(f"{n} pairs, value position {pos}: {sum(v) / len(v):.3f} ({len(v)} tokens)")
    raise SystemExit

named = list(model.named_parameters())
decayed = [w for n, w in named if w.dim() >= 2 and "wte" not in n]
rest = [w for n, w in named if not (w.dim() >= 2 and "wte" not in n)]
opt = torch.optim.AdamW(
    [{"params": decayed, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
    lr=a.lr, betas=(0.9, 0.95),
)  # fmt: skip
rng = random.Random(0)
held_out = batch(random.Random(12345), 128)


def evaluate() -> tuple[float, float]:
    model.eval()
    x, m = held_out
    with torch.no_grad():
        hit = token_logits(model, torch.where(m, special.mask, x)).argmax(-1) == x
    model.train()
    return float(hit[m].float().mean()), float((hit | ~m).all(1).float().mean())


t0, step, running = time.time(), 0, None
while time.time() - t0 < a.minutes * 60:
    x, m = batch(rng, a.bs)
    prompt_masked = (torch.rand(x.shape) < a.mlm) & ~m & (x != special.eos)
    prompt_masked[:, 0] = False  # BOS
    masked = m | prompt_masked
    for group in opt.param_groups:
        group["lr"] = a.lr * min(1.0, (step + 1) / 100)
    logits = token_logits(model, torch.where(masked, special.mask, x))
    loss = F.cross_entropy(logits[masked].float(), x[masked])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    step += 1
    if step % 200 == 0:
        tok, exact = evaluate()
        if a.out:
            torch.save(model.state_dict(), a.out)
        minutes = round((time.time() - t0) / 60, 2)
        print(json.dumps({"step": step, "min": minutes, "loss": round(running, 3),
                          "tok": round(tok, 3), "exact": round(exact, 3)}), flush=True)  # fmt: skip
if a.out:
    torch.save(model.state_dict(), a.out)
if a.export:
    from pathlib import Path

    from safetensors.torch import save_file

    Path(a.export).mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, f"{a.export}/model.safetensors", metadata={"format": "pt"})
