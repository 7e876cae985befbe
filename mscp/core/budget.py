"""The adaptive budget: how many rows each adapter needs, measured rather than set by q.

1. A first proposal from what the attribution pass already knows, in its unit (log-likelihood of
   the aligned model's refusals to the harmful prompts, summed over tokens):
       lost = LL_aligned - LL_finetuned      (LL_aligned from the logits that generated the
                                              refusals; the attribution pass gives LL_finetuned and
                                              the references below)
       k0   = the fewest top rows whose a_i sum to lost (closing all of it to first order is about
              what brings most refusals back: the organism's fine-tunes, docs/results/evaluation.md).
2. `budget_checks` forward passes (every adapter of the call and every count in the same pass: the
   weights are read once a pass, or not at all when the model stays resident) measure
   `budget_probes` counts per adapter as behaviour, with the
   refusal's opening (its first REFUSAL_OPENING tokens) as the target:
       won back   (P_patched - P_finetuned) / (P_aligned - P_finetuned) on the harmful prompts,
                  P = the mean probability of the aligned model's own refusal opening;
       benign     P_patched - P_aligned on the benign prompts, P = the mean probability of the
                  aligned model's most common refusal opening there: how much more likely the
                  patched model is to refuse a benign request than the aligned model.
       greedy     G_patched - G_aligned, G = the share of the benign prompts that greedy decoding
                  opens with that refusal (each of its tokens the most likely): the refusals a user
                  would see, which a mean probability can under-read (a few prompts tipping over).
   `benign_guard` says which of the two max_over_refusal bounds (the benign bound below).
   The first pass probes counts evenly in log(rows) up to 4 k0, k0 4^(j/n) for j = 1..n (the
   first-order estimate falls 2-4x short: curvature).
   Each later pass probes counts spaced evenly in log(rows) inside the bracket the checks so far
   left: above the most rows seen to win back too little, below the fewest seen to meet both (or,
   failing that, to break the benign bound). With no such ceiling yet it probes up to where the
   trend of the two largest checks in log(rows) reaches `recover`, or sooner where the trend of
   the benign rise reaches the bound. With budget_refine off (the default), an adapter is checked
   again only while no count has met both bounds (fewer passes for more rows).
3. The count: the fewest checked rows that meet both; else the checked count that wins back most
   while keeping the benign bound; else the fewest checked. Capped where the top rows' edits reach
   max_edit of the LoRA's parameters (the most rows any probe takes); an adapter
   that lost nothing gets none. Every check is in the report (`score_details.budget`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from mscp.core.adapter import Adapter
from mscp.core.attribution import TargetFit, target_logliks
from mscp.core.project import rows_from
from mscp.core.scoring import global_safety_rows, rows_for_gain

# "I'm sorry, but" and the like: the tokens that decide whether a greedy answer is a refusal
REFUSAL_OPENING = 4


@dataclass
class Budget:
    """One adapter's budget and how it was found (the report's `budget` record)."""

    lost: float  # aligned minus fine-tuned log-likelihood of the refusals (nats, summed over tokens)
    limit: int  # the most top rows whose edits stay within max_edit of the LoRA's parameters
    candidates: int  # rows in the safety layers
    rows: int = 0  # the first proposal, then the chosen count
    checks: list[dict] = field(default_factory=list)  # per count checked: pass, rows, won back, benign rises
    why: str = ""

    def to_dict(self) -> dict:
        return {"rows": self.rows, "fraction_of_candidates": self.rows / max(self.candidates, 1),
                "lost_loglik": self.lost, "goal_loglik": self.lost, "limit_rows": self.limit,
                "candidate_rows": self.candidates, "checks": self.checks, "why": self.why}


def benign_refusal_targets(refusals: list[list[int]], n: int) -> list[list[int]]:
    """The targets of n benign prompts: the most common opening (first REFUSAL_OPENING tokens) of
    the aligned model's refusals, whose probability on a benign prompt says how likely the model is
    to refuse it."""
    usual = Counter(tuple(r[:REFUSAL_OPENING]) for r in refusals).most_common(1)[0][0]
    return [list(usual)] * n


def choose_budgets(model, head, sets: list[tuple[list[list[int]], list[list[int]]]], runs: list, ranks: list[dict],
                   aligned: list, finetuned: list[list], config, *, batch_size: int, pad_id: int,
                   progress=None) -> list[Budget]:
    """Each run's Budget. sets: the attribution pass's [(harmful prompts, the aligned model's
    refusals), (benign prompts, benign_refusal_targets)]; runs: the patcher's AdapterRuns, their
    harmful scores, fine-tuned log-likelihood and every row's projection already computed by that
    pass; ranks: each run's selection order (scoring.safety_rank); aligned, finetuned (per run): the
    SetScores of the aligned model (its generation's on the harmful set) and of each fine-tuned one
    (the pass's) on `sets`, whose refusal openings are the checks' references."""
    aligned_ll = aligned[0].total
    reference = _readings(*_openings(aligned))
    references = [_readings(*_openings(per_set)) for per_set in finetuned]
    budgets = []
    for run, rank in zip(runs, ranks):
        harmful_scores = {key: sc["harmful"] for key, sc in run.scores.rows.items()}
        candidates = sum(t.numel() for t in harmful_scores.values())
        lost = aligned_ll - run.scores.details["targets_loglik"]["harmful"]
        b = Budget(lost, row_limit(run.lora, rank, config.max_edit), candidates)
        b.rows = rows_for_gain(harmful_scores, lost, b.limit, rank=rank)  # the first proposal closes all of `lost`
        b.why = ("the fine-tune lost none of the refusals' likelihood" if lost <= 0 else "first-order estimate")
        budgets.append(b)
    (harmful, refusals), (benign, benign_targets) = sets[0], sets[1] if len(sets) > 1 else ([], [])
    prompts, targets = harmful + benign, [r[:REFUSAL_OPENING] for r in refusals] + benign_targets
    n = len(harmful)
    for step in range(config.budget_checks):
        patched = [(j, k) for j, counts in _next_probes(budgets, config).items() for k in counts]
        if not patched:
            break
        ll = target_logliks(model, head, prompts, targets, [_patched(runs[j], ranks[j], k) for j, k in patched],
                            batch_size=batch_size, pad_id=pad_id, progress=progress)
        for (j, k), fit in zip(patched, ll):
            _record(budgets[j], step, k, _readings(TargetFit(fit.loglik[:n], fit.greedy[:n]),
                                                   TargetFit(fit.loglik[n:], fit.greedy[n:])),
                    references[j], reference)
    for b in budgets:
        _conclude(b, config)
    return budgets


def _record(b: Budget, step: int, rows: int, patched: tuple, finetuned: tuple, aligned: tuple) -> None:
    """One check of `rows` rows, in the report's form."""
    lost = aligned[0] - finetuned[0]
    b.checks.append({"pass": step, "rows": rows, "won_back": (patched[0] - finetuned[0]) / lost if lost > 0 else 1.0,
                     "benign_refusal_rise": patched[1] - aligned[1],
                     "benign_greedy_refusal_rise": patched[2] - aligned[2],
                     "refusal_probability": {"harmful": patched[0], "benign": patched[1]},
                     "greedy_refusal_share": {"benign": patched[2]},
                     "references": {"aligned": list(aligned), "finetuned": list(finetuned)}})


def _next_probes(budgets: list[Budget], config) -> dict[int, list[int]]:
    """The counts the next pass checks, per adapter (by index) still being searched: one that lost
    something, and (budget_refine off) whose checks have not yet met both bounds."""
    return {j: _probes(b, config) for j, b in enumerate(budgets)
            if b.rows > 0 and (config.budget_refine or not _sorted(b, config)[1])}


def _probes(b: Budget, config) -> list[int]:
    """The counts the next pass checks (module doc, step 2): new ones only, within [1, limit]."""
    n = config.budget_probes
    seen = {c["rows"] for c in b.checks}
    if not b.checks:  # above the first-order estimate, which fell 2-4x short on every fine-tune
        wanted = [b.rows * 4 ** (i / n) for i in range(1, n + 1)]
    else:
        kept, met, broke = _sorted(b, config)
        low = max((c["rows"] for c in kept if c["won_back"] < config.recover), default=0)
        ceiling = min(c["rows"] for c in met or broke) if met or broke else None
        if ceiling is not None:  # inside (low, ceiling), evenly in log(rows); from 0: evenly
            wanted = ([low * (ceiling / low) ** (i / (n + 1)) for i in range(1, n + 1)] if low > 0
                      else [ceiling * i / (n + 1) for i in range(1, n + 1)])
        else:  # every count won back too little: up to where the trend of the two largest reaches recover
            by_rows = sorted(kept, key=lambda c: c["rows"])
            top, below = by_rows[-1], by_rows[-2] if len(by_rows) > 1 else by_rows[-1]
            doublings = min(_doublings_to(below, top, "won_back", config.recover),
                            _doublings_to(below, top, "benign_refusal_rise", config.max_over_refusal))
            # a little past the nearer trend, at most 2 doublings a probe; with no trend, one a probe
            goal = top["rows"] * 2 ** (min(max(1.1 * doublings, 0.5), 2.0 * n) if math.isfinite(doublings) else n)
            wanted = [top["rows"] * (goal / top["rows"]) ** (i / n) for i in range(1, n + 1)]
    return sorted({min(max(1, round(k)), b.limit) for k in wanted} - seen)


def _sorted(b: Budget, config) -> tuple[list[dict], list[dict], list[dict]]:
    """b's checks that kept the benign bound, those of them that also won back `recover`, and those
    that broke the benign bound."""
    kept = [c for c in b.checks if _keeps_benign(c, config)]
    broke = [c for c in b.checks if not _keeps_benign(c, config)]
    return kept, [c for c in kept if c["won_back"] >= config.recover], broke


def _bound(config) -> str:
    """The benign bound in words, for `why`."""
    read = {"probability": "mean probability", "greedy": "greedy share", "both": "mean probability and greedy share"}
    return f" (+{config.max_over_refusal:g}, {read[config.benign_guard]})"


def _keeps_benign(check: dict, config) -> bool:
    """The benign bound, as `benign_guard` reads it."""
    rises = {"probability": [check["benign_refusal_rise"]], "greedy": [check["benign_greedy_refusal_rise"]]}
    rises["both"] = rises["probability"] + rises["greedy"]
    return all(rise <= config.max_over_refusal for rise in rises[config.benign_guard])


def _doublings_to(below: dict, top: dict, figure: str, goal: float) -> float:
    """How many doublings of top's rows bring `figure` to `goal` along the trend from `below` to
    `top` in log(rows) (inf where it does not rise)."""
    if top["rows"] <= below["rows"] or top[figure] <= below[figure]:
        return math.inf
    return (goal - top[figure]) / ((top[figure] - below[figure]) / math.log2(top["rows"] / below["rows"]))


def row_limit(lora: Adapter, rank: dict[str, torch.Tensor], max_edit: float) -> int:
    """The most rows, taken in `rank`'s order (global_safety_rows'), whose edits change at most
    max_edit of the LoRA's parameters: a row of lora_B holds r of them."""
    keys = sorted(rank)
    if not keys:
        return 0
    order = torch.sort(torch.cat([rank[k].double() for k in keys]), descending=True, stable=True).indices
    width = torch.cat([torch.full((rank[k].numel(),), lora.tensors[k].shape[1], dtype=torch.float64) for k in keys])
    return int((torch.cumsum(width[order], 0) <= max_edit * lora.n_parameters()).sum())


def _conclude(b: Budget, config) -> None:
    """The count from the checks (module doc, step 3)."""
    if not b.checks:
        b.why += " (capped at max_edit)" if b.rows == b.limit and b.rows else ""
        return
    kept, met, _ = _sorted(b, config)
    if met:
        best = min(met, key=lambda c: c["rows"])
        b.rows, b.why = best["rows"], (f"the fewest checked rows that win back {config.recover:g} of the refusals "
                                       f"({best['won_back']:.2f}) within the benign bound{_bound(config)}")
    elif kept:
        best = max(kept, key=lambda c: (c["won_back"], -c["rows"]))
        b.rows, b.why = best["rows"], (f"no checked count won back {config.recover:g} within the benign "
                                       f"bound{_bound(config)}; the most it won back ({best['won_back']:.2f})")
    else:
        b.rows = min(c["rows"] for c in b.checks)
        b.why = (f"every checked count raised benign refusals above the bound{_bound(config)}; the fewest checked, "
                 f"{b.rows} rows")


def _readings(harmful: TargetFit, benign: TargetFit | None = None) -> tuple[float, float, float]:
    """(mean probability of the refusal openings on the harmful prompts, on the benign prompts, the
    share of benign prompts greedy decoding opens with one), from per-prompt fits."""
    def mean(values: torch.Tensor | None) -> float:
        return float(values.double().mean()) if values is not None and values.numel() else 0.0

    return (mean(harmful.loglik.exp()), mean(benign.loglik.exp() if benign else None),
            mean(benign.greedy if benign else None))


def _openings(per_set: list) -> list[TargetFit]:
    """The refusal openings' fits of a model's SetScores, per set."""
    return [TargetFit(each.opening, each.greedy) for each in per_set]


def _patched(run, rank: dict, count: int) -> tuple[Adapter, dict]:
    """The run's adapter with its top `count` rows projected (from the attribution pass's projection
    of every row: no weight is read), as a LoRA for a forward pass."""
    masks = global_safety_rows(rank, None, 0.0, 0.0, count=count)
    tensors, _ = rows_from(run.lora, run.scores.every_row, masks)
    return Adapter(run.lora.config, tensors), run.by_layer
