"""Where an eviction method loses a task, measured: which evidence each layer and KV head keeps,
which answer characters go wrong and at which pass, what the later passes' queries read that the
step-1 vote evicted, which part of the rule drops it, and why other decoding rules and cache
policies recover (CPU, about 10 minutes on one core).

    python benchmarks/diagnose_eviction.py                     # tiny-dream-kv, multi_needle
    python benchmarks/diagnose_eviction.py --model tiny-llada-kv

Writes ``benchmarks/results/<device>/diagnosis-<model>-<task>.json`` and two PNGs next to it
(``.png``: answer errors, reveal passes, attention on evicted keys, ablations, policies;
``-survival.png``: evidence kept per layer, KV head and needle). Greedy decoding with the quality
suite's sampler (``maskkv eval``): one block, one token per pass, passes = the answer length.

Sections of the JSON:

- ``answers``: per method and budget, exact match (also by number of needles asked), the error
  rate of every answer character, the pass at which it was revealed (pass 0 is step 1, the
  uncached one) and the kept prompt KV per layer and KV head (by number of needles asked).
- ``survival``: per method, budget, layer and KV head, the share of each asked needle's value
  characters (and keys, and the question) that the first selection kept.
- ``evicted_attention``: the FullCache generation replayed pass by pass with explicit attention
  (checked against the engine's logits); per pass, query group and layer, the attention mass on
  the prompt, on the asked values, and on what a method evicted from that query's KV head
  (all evicted keys, and the evicted values). Query groups: ``shifted`` (Dream's last prompt
  position, which predicts the first answer character), ``masked`` and ``decoded`` response
  positions.
- ``ablations``: exact match per budget when one part of MaskKV's rule changes (layer budgets,
  head split, pooling, maximum instead of sum over the voting queries, who votes), and an oracle
  that ranks keys by what the FullCache generation's later passes attended to.
- ``policies``: per decoding rule and cache policy, exact match, first-character accuracy, the
  kind of pass at which the first answer character was revealed, and how far the logits that
  revealed it are from step 1's (``first_char_logits_as_step1``: the share within 1e-4, i.e.
  read off the uncached pass or its reused features).

The score ablations run the engine's own loop with a ``Denoiser`` subclass whose selection ranks
keys by another score (diagnostic only).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from diagnosis_plots import plot, plot_survival  # noqa: E402

import maskkv  # noqa: E402
import maskkv_kernels as mk  # noqa: E402
from maskkv import methods as method_lib  # noqa: E402
from maskkv.generation import FirstPassMemo  # noqa: E402
from maskkv.generation.dream import sample_dream  # noqa: E402
from maskkv.generation.engine import Denoiser  # noqa: E402
from maskkv.generation.llada import sample_llada  # noqa: E402
from maskkv.quality import evaluate  # noqa: E402
from maskkv.quality import tasks as task_lib  # noqa: E402

BATCH = 25
GROUPS = ("shifted", "masked", "decoded")


# ----------------------------------------------------------------------------- the setting


@dataclass
class Setting:
    """One model, one task's held-out examples, and what every section needs about them."""

    model: object
    path: Path
    profile: object
    examples: list
    ids: torch.Tensor  # [N, P] prompts
    targets: torch.Tensor  # [N, G] answer tokens, EOS after the answer
    answer_len: torch.Tensor  # [N] characters of each answer
    value: torch.Tensor  # bool [N, needles, 3, P]: the asked values' characters
    key: torch.Tensor  # bool [N, needles, P]: the asked keys
    question: torch.Tensor  # bool [N, P]
    asked: torch.Tensor  # bool [N, needles]: needle j asked in row b
    G: int
    shift: int  # 1 for Dream (the last prompt position is recomputed with the tail)
    memos: list[FirstPassMemo]

    @property
    def N(self) -> int:
        return self.ids.shape[0]

    @property
    def P(self) -> int:
        return self.ids.shape[1]

    @property
    def Pc(self) -> int:
        return self.P - self.shift

    @property
    def batches(self) -> list[slice]:
        return [slice(s, min(s + BATCH, self.N)) for s in range(0, self.N, BATCH)]

    @property
    def mask_id(self) -> int:
        return self.model.config.mask_token_id


def make_setting(model_name: str, task: str, n: int, split: str) -> Setting:
    path = Path(model_name) if Path(model_name).exists() else evaluate.ASSETS / model_name
    model = evaluate.load_model(path, "cpu")
    ids_of_model = task_lib.token_ids(model.config)
    prompt_len = evaluate.trained_max_prompt_len(path) or task_lib.DEFAULT_PROMPT_LEN
    examples = task_lib.make_examples(task, n, split=split, prompt_len=prompt_len)
    ids = torch.tensor([task_lib.encode_prompt(e, ids_of_model) for e in examples])
    G = task_lib.TASK_GEN_LENGTH[task]
    P = ids.shape[1]
    needles = max(len(e.spans) for e in examples)
    value = torch.zeros(n, needles, 3, P, dtype=torch.bool)
    key = torch.zeros(n, needles, P, dtype=torch.bool)
    question = torch.zeros(n, P, dtype=torch.bool)
    for b, e in enumerate(examples):  # token positions are character positions + 1 (the BOS)
        for j, (lo, hi) in enumerate(e.spans):
            for c in range(hi - lo):
                value[b, j, c, lo + 1 + c] = True
            if e.num_pairs:  # "fox K4$.": the key ends one space before the value
                key[b, j, lo - 3 : lo] = True
        if e.prompt.endswith("?"):  # "...|fox,cow?"
            q_lo, q_hi = e.prompt.rfind("|") + 1, len(e.prompt)
        else:  # "fox,cow?|..."
            q_lo, q_hi = 0, e.prompt.index("|")
        question[b, q_lo + 1 : q_hi + 1] = True
    return Setting(
        model=model, path=path, profile=method_lib.LayerProfile.find(path), examples=examples,
        ids=ids,
        targets=torch.tensor([task_lib.encode_answer(e, G, ids_of_model) for e in examples]),
        answer_len=torch.tensor([len(e.answer) for e in examples]),
        value=value, key=key, question=question,
        asked=torch.tensor([[j < len(e.spans) for j in range(needles)] for e in examples]),
        G=G, shift=1 if getattr(model, "dllm_kind", "llada") == "dream" else 0,
        memos=[FirstPassMemo() for _ in range(0, n, BATCH)],
    )  # fmt: skip


# ----------------------------------------------------------------------------- generation


class Recorder:
    """Wraps a ``Denoiser``: keeps the sequence before every pass, the positions asked and the
    logits it returned."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.states: list[torch.Tensor] = []
        self.needs: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        self.states.append(x.clone())
        self.needs.append(need.clone())
        out = self.denoiser(x, need)
        self.logits.append(out.clone())
        return out

    def logits_at(self, n: int, row: int, position: int) -> torch.Tensor:
        """The logits pass ``n`` returned for response ``position`` of batch row ``row``."""
        need = self.needs[n]
        index = int(need[:row].sum()) + int(need[row, :position].sum())
        return self.logits[n][index]

    def begin_block(self, lo: int, hi: int) -> None:
        self.denoiser.begin_block(lo, hi)


@dataclass
class Run:
    """One method's generation of every example, recorded pass by pass."""

    seqs: torch.Tensor  # [N, P + G]
    recorders: list[Recorder]  # one per batch

    def responses(self, s: Setting) -> torch.Tensor:
        return self.seqs[:, s.P :]

    def correct(self, s: Setting) -> torch.Tensor:
        eos = task_lib.token_ids(s.model.config).eos
        return torch.tensor(
            [
                task_lib.parse_answer(r, eos) == e.answer
                for e, r in zip(s.examples, self.responses(s).tolist())
            ]
        )

    def reveal_pass(self, s: Setting) -> torch.Tensor:
        """int [N, G]: the pass after which each response position first holds a token."""
        out = []
        for rec, seqs in zip(self.recorders, self.seqs.split(BATCH)):
            states = [x[:, s.P :] for x in rec.states[1:]] + [seqs[:, s.P :]]
            at = torch.full(states[-1].shape, -1, dtype=torch.long)
            for i, x in enumerate(states):
                at[(at < 0) & (x != s.mask_id)] = i
            out.append(at)
        return torch.cat(out)

    def kept(self, s: Setting) -> list[torch.Tensor]:
        """Per layer, bool [N, Hkv, Pc]: the prompt keys the first selection kept per KV head."""
        per_batch = []
        for rec, rows in zip(self.recorders, s.batches):
            stats = rec.denoiser.stats
            B = rows.stop - rows.start
            layers = []
            for pos, lens in zip(stats.first_kept_positions, stats.kept_lengths):
                Hkv = lens.shape[-1]
                seg = torch.arange(B * Hkv).repeat_interleave(lens.reshape(-1).long())
                kept = torch.zeros(B * Hkv, s.Pc, dtype=torch.bool)
                kept[seg, pos.long()] = True
                layers.append(kept.reshape(B, Hkv, s.Pc))
            per_batch.append(layers)
        return [torch.cat(parts) for parts in zip(*per_batch)]


def generate(s: Setting, method, *, block=None, rule=None, policy=None,
             denoiser_cls=Denoiser, score_for_rows=None) -> Run:  # fmt: skip
    """Greedy generation of every example through the engine's own loop, recorded."""
    seqs, recs = [], []
    for i, rows in enumerate(s.batches):
        extra = {} if score_for_rows is None else {"score_fn": score_for_rows(rows)}
        den = denoiser_cls(s.model, method, s.P, profile=s.profile, cache=policy,
                           first_pass=s.memos[i], **extra)  # fmt: skip
        rec = Recorder(den)
        kw = dict(mask_id=s.mask_id, gen_length=s.G, steps=s.G, block_length=block or s.G,
                  decoding=rule)  # fmt: skip
        if s.shift:
            seqs.append(sample_dream(rec, s.ids[rows], **kw, **evaluate.sampler_kwargs(s.model)))
        else:
            seqs.append(sample_llada(rec, s.ids[rows], **kw))
        recs.append(rec)
    return Run(torch.cat(seqs), recs)


def method_of(name: str, budget: int | None, **params):
    return method_lib.get(name, **params) if budget is None else method_lib.get(
        name, budget=budget, **params)  # fmt: skip


# ----------------------------------------------------------------------------- answers, survival


def answers_row(s: Setting, run: Run, name: str, budget: int | None) -> dict:
    correct = run.correct(s)
    wrong = run.responses(s) != s.targets  # [N, G]
    reveal = run.reveal_pass(s)
    in_answer = torch.arange(s.G)[None] < s.answer_len[:, None]
    needles = s.asked.sum(1)
    per_char = [(wrong[in_answer[:, c], c], reveal[in_answer[:, c], c]) for c in range(s.G)]
    kept_by_needles = None  # mean kept prompt KV per layer and KV head, by needles asked
    if budget is not None:
        kept = torch.cat([rec.denoiser.stats.kept_lengths.float() for rec in run.recorders], 1)
        kept_by_needles = {
            int(n): kept[:, needles == n].mean(1).tolist() for n in needles.unique()
        }  # fmt: skip
    return dict(
        method=name, budget=budget, accuracy=float(correct.double().mean()),
        accuracy_by_needles={int(n): float(correct[needles == n].double().mean())
                             for n in needles.unique()},
        char_error=[float(w.double().mean()) if len(w) else None for w, _ in per_char],
        char_reveal_pass=[float(r.double().mean()) if len(r) else None for _, r in per_char],
        first_char_reveal_hist=torch.bincount(reveal[:, 0], minlength=s.G).tolist(),
        kept_per_layer_and_head_by_needles=kept_by_needles,
    )  # fmt: skip


def survival(s: Setting, kept: list[torch.Tensor]) -> list[dict]:
    """Per layer: shares of the asked values' characters kept per KV head ([Hkv][needle][char])
    and in any head ([needle][char]), of the asked keys per head ([Hkv][needle]), and of the
    question per head ([Hkv])."""
    layers = []
    w = s.asked.float()  # [N, n]
    for k in kept:  # [N, Hkv, Pc]
        Pc = k.shape[-1]
        kf = k.float()
        value = torch.einsum("bhp,bncp->bhnc", kf, s.value[..., :Pc].float())  # 0/1 per char
        key = s.key[..., :Pc].float()
        key_kept = torch.einsum("bhp,bnp->bhn", kf, key) / key.sum(-1).clamp_min(1)[:, None]
        q = s.question[:, :Pc].float()
        q_kept = torch.einsum("bhp,bp->bh", kf, q) / q.sum(-1).clamp_min(1)[:, None]
        per_head = (value * w[:, None, :, None]).sum(0) / w.sum(0)[:, None].clamp_min(1)
        any_head = (value.amax(1) * w[..., None]).sum(0) / w.sum(0)[:, None].clamp_min(1)
        layers.append(
            dict(
                value=per_head.tolist(),
                value_any_head=any_head.tolist(),
                key=((key_kept * w[:, None]).sum(0) / w.sum(0).clamp_min(1)).tolist(),
                question=q_kept.mean(0).tolist(),
            )
        )
    return layers


# ----------------------------------------------------------------------------- attention replay


def tail_attention(model, memo: FirstPassMemo, x: torch.Tensor, Pc: int):
    """The tail's pass over [step-1 prompt KV ‖ tail] with explicit attention: what a FullCache
    later pass computes. Returns (per layer probs fp32 [B, Hq, T, Pc + T], hidden [B, T, d])."""
    B, L = x.shape
    cos, sin = model.rotary(torch.arange(Pc, L).expand(B, L - Pc))
    h = model.embed(x[:, Pc:])
    probs = []
    for i, layer in enumerate(model.layers):
        _, k_full, v_full, _ = memo.layers[i]
        q, k, v = layer.qkv(h, cos, sin)
        G = q.shape[1] // k.shape[1]
        keys = torch.cat([k_full[:, :, :Pc], k], 2).repeat_interleave(G, 1).float()
        values = torch.cat([v_full[:, :, :Pc], v], 2).repeat_interleave(G, 1).float()
        p = (q.float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        h = layer.mlp_block(layer.attn_output(h, (p @ values).to(h.dtype)))
        probs.append(p)
    return probs, h


def replay_fullcache(s: Setting, full: Run, kept_by: dict[str, list[torch.Tensor]]):
    """Per pass of the FullCache generation: attention mass per query group and layer (see the
    module docstring), and the oracle scores (attention summed over the later passes, the tail
    queries and the query heads of each KV head: per layer [N, Hkv, Pc + 1], last column the
    mass on the tail). Returns (passes, oracle, max |logit error| of the replay)."""
    layers = len(s.model.layers)
    sums: dict[tuple, torch.Tensor] = {}  # (pass, group, what) -> [layers] summed over queries
    counts: dict[tuple, torch.Tensor] = {}  # (pass, group) -> queries
    oracle: list[torch.Tensor] | None = None
    max_err = 0.0
    for i, rows in enumerate(s.batches):
        rec = full.recorders[i]
        evidence = s.value[rows].any(2).any(1)[:, : s.Pc].float()  # [B, Pc]
        for n, x in enumerate(rec.states):
            probs, h = tail_attention(s.model, s.memos[i], x, s.Pc)
            need_rows, need_cols = (x[:, s.P :] == s.mask_id).nonzero(as_tuple=True)
            # Response position r is predicted at tail index r (Dream: from position P + r - 1).
            logits = s.model.head(h[need_rows, need_cols][None])[0]
            max_err = max(max_err, float((logits - rec.logits[n]).abs().max()))
            tail = x[:, s.Pc :]
            shifted = torch.zeros_like(tail, dtype=torch.bool)
            shifted[:, : s.shift] = True
            masked = (tail == s.mask_id) & ~shifted
            groups = dict(shifted=shifted, masked=masked, decoded=~shifted & ~masked)
            per_query: dict[str, list[torch.Tensor]] = {}  # what -> per layer [B, T]
            for layer, p in enumerate(probs):
                pp = p[..., : s.Pc]  # [B, Hq, T, Pc]
                G = p.shape[1] // kept_by["maskkv"][layer].shape[1]
                per_query.setdefault("prompt", []).append(pp.sum(-1).mean(1))
                per_query.setdefault("evidence", []).append(
                    torch.einsum("bhtp,bp->bht", pp, evidence).mean(1))  # fmt: skip
                for name, kept in kept_by.items():
                    evicted = (~kept[layer][rows]).repeat_interleave(G, 1).float()
                    per_query.setdefault(f"{name}:evicted", []).append(
                        torch.einsum("bhtp,bhp->bht", pp, evicted).mean(1))  # fmt: skip
                    per_query.setdefault(f"{name}:evicted_evidence", []).append(
                        torch.einsum("bhtp,bhp->bht", pp, evicted * evidence[:, None]).mean(1))  # fmt: skip
            for g, sel in groups.items():
                counts[n, g] = counts.get((n, g), 0) + int(sel.sum())
                for what, vals in per_query.items():
                    got = torch.tensor([float(v[sel].sum()) for v in vals])
                    sums[n, g, what] = sums.get((n, g, what), torch.zeros(layers)) + got
            if n >= 1:  # the passes that read the pruned cache
                B, Hkv = x.shape[0], kept_by["maskkv"][0].shape[1]
                if oracle is None:
                    oracle = [torch.zeros(s.N, Hkv, s.Pc + 1) for _ in range(layers)]
                for layer, p in enumerate(probs):
                    cols = torch.cat([p[..., : s.Pc], p[..., s.Pc :].sum(-1, keepdim=True)], -1)
                    oracle[layer][rows] += cols.reshape(B, Hkv, -1, *cols.shape[2:]).sum((2, 3))
    passes = [
        {"pass": n, **{g: {"queries": counts[n, g]} for g in GROUPS}}
        for n in range(len(full.recorders[0].states))
    ]
    for (n, g, what), total in sums.items():
        c = counts[n, g]
        passes[n][g][what] = (total / c).tolist() if c else None
    return passes, oracle, max_err


# ----------------------------------------------------------------------------- score ablations


class ScoredDenoiser(Denoiser):
    """A Denoiser whose first selection ranks prompt keys by ``score_fn`` (diagnostic ablations).

    score_fn(layer, q_tail, k, Pc) -> (scores fp32 [B, Hkv, Pc], tail mass fp32 [B, Hkv]); the
    head budgets are the method's split computed from them."""

    def __init__(self, *args, score_fn, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.score_fn = score_fn
        self._layer = 0

    def select_prompt(self, q, k, v, layer_budget, lse=None):
        layer = self._layer
        self._layer = (self._layer + 1) % len(self.model.layers)
        if layer_budget is None or layer_budget >= self.Pc:
            return super().select_prompt(q, k, v, layer_budget, lse)
        scores, tail_mass = self.score_fn(layer, q[:, :, self.Pc :], k, self.Pc)
        scores = scores.contiguous()
        budgets = self.method.allocate_head_budgets(
            scores, layer_budget, mask_mass=tail_mass.contiguous()
        )
        return mk.topk_gather(scores, k, v, budgets)


def vote_probs(q_tail, k, skip: int) -> torch.Tensor:
    """fp32 [B, Hkv, G, M, L]: attention of the voting rows (the tail less its first ``skip``
    rows) over every key."""
    q = q_tail[:, :, skip:]
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    logits = q.float() @ k.float().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * D**-0.5
    return logits.softmax(-1).reshape(B, Hkv, Hq // Hkv, M, -1)


def max_vote(skip: int):
    def fn(layer, q_tail, k, Pc):
        p = vote_probs(q_tail, k, skip)
        return p.amax((2, 3))[..., :Pc], p.sum((2, 3))[..., Pc:].sum(-1)

    return fn


def pooled_vote(skip: int, kernel: int = 7):
    def fn(layer, q_tail, k, Pc):
        p = vote_probs(q_tail, k, skip).sum((2, 3))
        return F.max_pool1d(p[..., :Pc], kernel, 1, kernel // 2), p[..., Pc:].sum(-1)

    return fn


def oracle_vote(oracle: list[torch.Tensor], rows: slice):
    def fn(layer, q_tail, k, Pc):
        scores = oracle[layer][rows]
        return scores[..., :Pc], scores[..., Pc]

    return fn


def ablations(s: Setting, budgets: list[int], oracle) -> list[dict]:
    """Exact match per budget with one part of the rule changed at a time."""
    skip = s.shift  # mask votes: the tail less Dream's shifted row
    scored = dict(denoiser_cls=ScoredDenoiser)
    variants = [
        ("MaskKV (paper)", "maskkv", {}, {}),
        ("layer budgets uniform", "maskkv", dict(uniform_layers=True), {}),
        ("layer budgets, boundary groups 1 + 1", "maskkv",
         dict(boundary_first=1, boundary_last=1), {}),
        ("head split uniform", "maskkv", dict(alpha=1.0), {}),
        ("scores max-pooled (kernel 7)", "maskkv", {},
         dict(scored, score_for_rows=lambda rows: pooled_vote(skip))),
        ("max over voting queries, not sum", "maskkv", {},
         dict(scored, score_for_rows=lambda rows: max_vote(skip))),
        ("head split by the votes (adaptive)", "tailvote", dict(head_split="adaptive"),
         dict(scored, score_for_rows=lambda rows: _mask_votes(skip))),
        ("tail votes, preference split", "tailvote", dict(head_split="preference"), {}),
        ("tail votes, boundary groups 1 + 1", "tailvote",
         dict(head_split="preference", boundary_first=1, boundary_last=1), {}),
        ("TailVote (tail votes, adaptive split)", "tailvote", {}, {}),
        ("oracle: later passes' attention, preference split", "maskkv", {},
         dict(scored, score_for_rows=lambda rows: oracle_vote(oracle, rows))),
        ("oracle: later passes' attention, adaptive split", "tailvote", {},
         dict(scored, score_for_rows=lambda rows: oracle_vote(oracle, rows))),
    ]  # fmt: skip
    rows = []
    for label, name, params, kw in variants:
        accs, first = [], []
        for b in budgets:
            run = generate(s, method_of(name, b, **params), **kw)
            accs.append(float(run.correct(s).double().mean()))
            first.append(float((run.responses(s)[:, 0] == s.targets[:, 0]).double().mean()))
        layer_budgets = method_of(name, budgets[0], **params).layer_budgets(
            len(s.model.layers), s.Pc, s.profile
        )
        rows.append(dict(label=label, method=name, params=params, budgets=budgets,
                         accuracy=accs, first_char_accuracy=first,
                         layer_budgets_at_first_budget=layer_budgets))  # fmt: skip
        print(f"ablation {label}: {accs} (first character {first})", flush=True)
    return rows


def _mask_votes(skip: int):
    """MaskKV's own sum of votes (the tail less the shifted rows), for a split ablation."""

    def fn(layer, q_tail, k, Pc):
        p = vote_probs(q_tail, k, skip).sum((2, 3))
        return p[..., :Pc], p[..., Pc:].sum(-1)

    return fn


# ----------------------------------------------------------------------------- policies


POLICIES = {
    "fixed, prompt cache": (maskkv.FixedSteps(), maskkv.PromptCache()),
    "threshold(0.9), prompt cache": (maskkv.Threshold(0.9), maskkv.PromptCache()),
    "fixed, dual cache": (maskkv.FixedSteps(), maskkv.DualCache()),
    "fixed, dLLM-Cache(50,5,0.25)": (maskkv.FixedSteps(), maskkv.DLLMCache(50, 5, 0.25)),
}
POLICY_BLOCK = 4  # as benchmarks/bench_quality_policies.py


def policies(s: Setting, budget: int) -> list[dict]:
    rows = []
    for label, (rule, policy) in POLICIES.items():
        for name in ("fullcache", "maskkv", "tailvote"):
            method = method_of(name, None if name == "fullcache" else budget)
            run = generate(s, method, block=POLICY_BLOCK, rule=rule, policy=policy)
            reveal = run.reveal_pass(s)[:, 0]
            kinds = [rec.denoiser.stats.step_kinds for rec in run.recorders]
            by_kind: dict[str, int] = {}
            drift = []  # how far the revealing logits are from step 1's (the uncached pass)
            for b in range(s.N):
                rec, at = run.recorders[b // BATCH], int(reveal[b])
                by_kind[kinds[b // BATCH][at]] = by_kind.get(kinds[b // BATCH][at], 0) + 1
                diff = rec.logits_at(at, b % BATCH, 0) - rec.logits_at(0, b % BATCH, 0)
                drift.append(float(diff.abs().max()))
            row = dict(
                setting=label, method=name, budget=getattr(method, "budget", None),
                accuracy=float(run.correct(s).double().mean()),
                first_char_accuracy=float(
                    (run.responses(s)[:, 0] == s.targets[:, 0]).double().mean()),
                first_char_reveal_hist=torch.bincount(reveal).tolist(),
                first_char_reveal_kind=by_kind, pass_kinds=kinds[0],
                first_char_logits_as_step1=sum(d < 1e-4 for d in drift) / s.N,
                first_char_logits_drift_median=sorted(drift)[s.N // 2],
            )  # fmt: skip
            rows.append(row)
            print(f"{label}, {name}: exact {row['accuracy']:.2f}, first character "
                  f"{row['first_char_accuracy']:.2f}, revealed in {by_kind}, with step 1's "
                  f"logits for {row['first_char_logits_as_step1']:.2f}", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- main


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=evaluate.DREAM_MODEL.name, help="an asset or a directory")
    ap.add_argument("--task", default="multi_needle", choices=task_lib.RETRIEVAL_TASKS)
    ap.add_argument("--num-examples", type=int, default=100)
    ap.add_argument("--split", default="test", choices=sorted(task_lib.SPLIT_SEEDS))
    ap.add_argument("--budgets", default="8,16,24,64")
    ap.add_argument("--focus-budget", type=int, default=16, help="budget of the pass replay")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (PNGs next to it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", method_lib.MissingProfileWarning)
    t0 = time.perf_counter()
    s = make_setting(args.model, args.task, args.num_examples, args.split)
    budgets = [int(b) for b in args.budgets.split(",")]
    focus = args.focus_budget
    result: dict = {"answers": [], "survival": []}
    kept_by: dict[str, list[torch.Tensor]] = {}
    full = None
    for name, budget in [("fullcache", None)] + [
        (m, b) for m in ("maskkv", "tailvote") for b in sorted(set(budgets) | {focus})
    ]:
        run = generate(s, method_of(name, budget))
        full = run if name == "fullcache" else full
        row = answers_row(s, run, name, budget)
        result["answers"].append(row)
        print(f"{name} {budget}: exact {row['accuracy']:.2f} "
              f"{row['accuracy_by_needles']}, character errors "
              f"{[round(e, 2) for e in row['char_error'] if e is not None]}", flush=True)  # fmt: skip
        if budget is not None:
            kept = run.kept(s)
            result["survival"].append(dict(method=name, budget=budget, layers=survival(s, kept)))
            if budget == focus:
                kept_by[name] = kept
    passes, oracle, err = replay_fullcache(s, full, kept_by)
    result["evicted_attention"] = dict(budget=focus, replay_max_abs_logit_error=err, passes=passes)
    print(f"FullCache passes replayed with explicit attention: max |logit error| {err:.1e}")
    result["ablations"] = ablations(s, budgets, oracle)
    result["policies"] = policies(s, focus)
    config = dict(
        model=s.path.name, task=args.task, split=args.split, num_examples=s.N, prompt_len=s.P,
        gen_length=s.G, budgets=budgets, focus_budget=focus, threads=args.threads,
        sampler=evaluate._sampler_description(s.model), policy_block_length=POLICY_BLOCK,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    result = {"config": config, **result}
    device = torch.device("cpu")
    out = Path(args.out) if args.out else common.out_dir(device) / (
        f"diagnosis-{s.path.name}-{args.task}.json")  # fmt: skip
    evaluate.save(result, out, env=common.environment(device))
    print(f"wrote {out}")
    print(f"wrote {plot(result, out.with_suffix('.png'))}")
    print(f"wrote {plot_survival(result, out.with_name(out.stem + '-survival.png'))}")


if __name__ == "__main__":
    main()
