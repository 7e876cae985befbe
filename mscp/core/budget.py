"""The adaptive budget: how many rows each adapter needs, measured rather than set by q.

1. A first proposal from what the attribution pass already knows, in its unit (log-likelihood of
   the aligned model's refusals to the harmful prompts, summed over tokens):
       lost = LL_aligned - LL_finetuned      (the aligned model rides along the attribution pass)
       k    = the fewest top rows whose a_i sum to lost (closing all of it to first order is about
              what brings most refusals back: the organism's fine-tunes, docs/results/evaluation.md).
2. `budget_checks` forward passes (every adapter of the call in the same pass, no weight read per
   adapter) measure a proposal as behaviour, with the refusal's opening (its first
   REFUSAL_OPENING tokens) as the target:
       won back   (P_patched - P_finetuned) / (P_aligned - P_finetuned) on the harmful prompts,
                  P = the mean probability of the aligned model's own refusal opening;
       benign     P_patched - P_aligned on the benign prompts, P = the mean probability of the
                  aligned model's most common refusal opening there: how much more likely the
                  patched model is to refuse a benign request than the aligned model.
   A proposal that raises the benign figure above max_over_refusal is halved (towards the most
   rows seen to win back too little); one that wins back less than `recover` grows along the trend
   of the checks so far in log(rows) (doubled after the first; never past a count seen to break the
   bound); one that meets both moves back along that trend towards the goal, to look for fewer.
3. The count: the fewest checked rows that meet both; else the checked count that wins back most
   while keeping the benign bound; else the last proposal. Capped at q_max of the rows; an adapter
   that lost nothing gets none. Every check is in the report (`score_details.budget`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks
from mscp.core.project import rows_from
from mscp.core.scoring import global_safety_rows, rows_for_gain

# "I'm sorry, but" and the like: the tokens that decide whether a greedy answer is a refusal
REFUSAL_OPENING = 4


@dataclass
class Budget:
    """One adapter's budget and how it was found (the report's `budget` record)."""

    lost: float  # aligned minus fine-tuned log-likelihood of the refusals (nats, summed over tokens)
    limit: int  # q_max of the candidate rows
    candidates: int  # rows in the safety layers
    rows: int = 0  # the chosen count
    checks: list[dict] = field(default_factory=list)  # per forward pass: rows, won back, benign rise
    why: str = ""

    def to_dict(self) -> dict:
        return {"rows": self.rows, "fraction_of_candidates": self.rows / max(self.candidates, 1),
                "lost_loglik": self.lost, "goal_loglik": self.lost, "limit_rows": self.limit,
                "candidate_rows": self.candidates, "checks": self.checks, "why": self.why}


def choose_budgets(model, head, harmful: list[list[int]], refusals: list[list[int]], benign: list[list[int]],
                   runs: list, aligned_ll: float, config, *, batch_size: int, pad_id: int, progress=None
                   ) -> list[Budget]:
    """Each run's Budget (runs: the patcher's AdapterRuns, their harmful scores, fine-tuned
    log-likelihood and every row's projection already computed by the attribution pass)."""
    budgets, scores_of = [], []
    for run in runs:
        scores = {key: sc["harmful"] for key, sc in run.scores.rows.items()}
        candidates = sum(t.numel() for t in scores.values())
        lost = aligned_ll - run.scores.details["targets_loglik"]["harmful"]
        b = Budget(lost, round(config.q_max * candidates), candidates)
        b.rows = rows_for_gain(scores, lost, b.limit)  # the first proposal closes all of `lost`
        b.why = ("the fine-tune lost none of the refusals' likelihood" if lost <= 0 else "first-order estimate")
        budgets.append(b)
        scores_of.append(scores)
    openings = [r[:REFUSAL_OPENING] for r in refusals]
    usual = list(Counter(map(tuple, openings)).most_common(1)[0][0])
    prompts, targets = harmful + benign, openings + [usual] * len(benign)
    n = len(harmful)
    aligned: tuple[float, float] | None = None  # (harmful P, benign P), from the first check's pass
    references: dict[int, tuple[float, float]] = {}  # run -> fine-tuned (harmful P, benign P)
    bounds = [[0, b.limit] for b in budgets]  # per run: counts known to keep / to break the benign bound
    for _ in range(config.budget_checks):
        open_runs = [j for j, b in enumerate(budgets) if b.rows > 0 and b.rows not in [c["rows"] for c in b.checks]]
        if not open_runs:
            break
        fresh = [j for j in open_runs if j not in references]
        loras = ([None] * (aligned is None) + [(runs[j].lora, runs[j].by_layer) for j in fresh]
                 + [_patched(runs[j], scores_of[j], budgets[j].rows) for j in open_runs])
        ll = target_logliks(model, head, prompts, targets, loras, batch_size=batch_size, pad_id=pad_id,
                            progress=progress)
        if aligned is None:  # the model alone answers the same in every pass: measured once
            aligned, ll = _probabilities(ll[0], n), ll[1:]
        for j, each in zip(fresh, ll[: len(fresh)]):
            references[j] = _probabilities(each, n)
        for j, each in zip(open_runs, ll[len(fresh):]):
            _judge(budgets[j], bounds[j], _probabilities(each, n), references[j], aligned, config)
    for b in budgets:
        _conclude(b, config)
    return budgets


def _judge(b: Budget, bounds: list[int], patched: tuple, finetuned: tuple, aligned: tuple, config) -> None:
    """Record one check of b.rows and propose the next count."""
    lost = aligned[0] - finetuned[0]
    won = (patched[0] - finetuned[0]) / lost if lost > 0 else 1.0
    rise = patched[1] - aligned[1]
    k = b.rows
    b.checks.append({"rows": k, "won_back": won, "benign_refusal_rise": rise,
                     "refusal_probability": {"harmful": patched[0], "benign": patched[1]},
                     "references": {"aligned": list(aligned), "finetuned": list(finetuned)}})
    low, high = bounds  # the most rows seen to win back too little; the most rows not seen to break the bound
    if rise > config.max_over_refusal:  # too many: between what was too few and this
        bounds[1] = k - 1
        b.rows = max(1, (low + k) // 2)
        return
    fewer = [c for c in b.checks[:-1] if c["rows"] < k and c["won_back"] < won
             and c["benign_refusal_rise"] <= config.max_over_refusal]
    if won < config.recover:  # too few: along the trend of the last two checks in log(rows), else double
        bounds[0] = k
        factor = 2.0
        if fewer:
            prev = max(fewer, key=lambda c: c["rows"])
            per_doubling = (won - prev["won_back"]) / math.log2(k / prev["rows"])
            factor = 2 ** ((config.recover - won) / per_doubling) if per_doubling > 0 else 4.0
        factor = min(max(factor * 1.1, 1.25), 4.0)  # a little past the trend: the count must meet, not approach
        b.rows = min(round(k * factor), b.limit, high)
    else:  # enough: along the same trend back to the goal, above what was too few
        target = low + 1
        if fewer:
            prev = max(fewer, key=lambda c: c["rows"])
            t = (config.recover - prev["won_back"]) / (won - prev["won_back"])
            target = round(prev["rows"] * (k / prev["rows"]) ** t)
        b.rows = max(low + 1, min(target if fewer else (low + k) // 2, k))


def _conclude(b: Budget, config) -> None:
    """The count from the checks (module doc, step 3)."""
    if not b.checks:
        b.why += " (capped at q_max)" if b.rows == b.limit and b.rows else ""
        return
    kept = [c for c in b.checks if c["benign_refusal_rise"] <= config.max_over_refusal]
    met = [c for c in kept if c["won_back"] >= config.recover]
    if met:
        best = min(met, key=lambda c: c["rows"])
        b.rows, b.why = best["rows"], (f"the fewest checked rows that win back {config.recover:g} of the refusals "
                                       f"({best['won_back']:.2f}) within the benign bound")
    elif kept:
        best = max(kept, key=lambda c: (c["won_back"], -c["rows"]))
        b.rows, b.why = best["rows"], (f"no checked count won back {config.recover:g} within the benign bound; "
                                       f"the most it won back ({best['won_back']:.2f})")
    else:
        b.why = f"every checked count raised benign refusals above the bound; the last proposal, {b.rows} rows"


def _probabilities(ll: torch.Tensor, n_harmful: int) -> tuple[float, float]:
    """(mean probability of the refusal openings on the harmful prompts, on the benign prompts)."""
    p = ll.exp()
    return float(p[:n_harmful].mean()), float(p[n_harmful:].mean()) if p.numel() > n_harmful else 0.0


def _patched(run, harmful: dict, count: int) -> tuple[Adapter, dict]:
    """The run's adapter with its top `count` rows projected (from the attribution pass's projection
    of every row: no weight is read), as a LoRA for a forward pass."""
    masks = global_safety_rows(harmful, None, 0.0, 0.0, count=count)
    tensors, _ = rows_from(run.lora, run.scores.every_row, masks)
    return Adapter(run.lora.config, tensors), run.by_layer
