"""The adaptive budget: how many rows each adapter needs, measured rather than set by q.

The attribution pass already knows, in one unit (log-likelihood of the aligned model's refusals to
the harmful prompts):
    lost    what the fine-tune lost: the aligned model's own log-likelihood of its refusals minus
            the fine-tuned model's (the aligned model rides along the attribution's forward pass);
    a_i     what editing row i wins back, to first order (core/attribution.py).
The budget is the fewest top rows whose a_i sum to `recover * lost`. First-order estimates of
many edits together are off by a factor (the edits interact through the layers), so a forward
pass measures what the proposed selection really wins back, the factor is corrected from it, and
the count is proposed again: `budget_checks` passes, every adapter of the call in the same pass.
The count is capped at q_max of the rows; an adapter that lost nothing gets no rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks
from mscp.core.project import rows_from
from mscp.core.scoring import global_safety_rows, rows_for_gain

# what one measured round may correct the first-order estimate by: a check that wins back nothing
# (or everything at once) would otherwise send the count to 0 or the cap in one step
MAX_CORRECTION = 8.0


@dataclass
class Budget:
    """One adapter's budget and how it was found (the report's `budget` record)."""

    lost: float  # aligned minus fine-tuned log-likelihood of the refusals (nats, summed over tokens)
    goal: float  # recover * lost: what the edit must win back
    limit: int  # q_max of the candidate rows
    candidates: int  # rows in the safety layers
    rows: int = 0  # the chosen count
    checks: list[dict] = field(default_factory=list)  # per forward pass: rows, predicted and measured win
    why: str = ""

    def to_dict(self) -> dict:
        return {"rows": self.rows, "fraction_of_candidates": self.rows / max(self.candidates, 1),
                "lost_loglik": self.lost, "goal_loglik": self.goal, "limit_rows": self.limit,
                "candidate_rows": self.candidates, "checks": self.checks, "why": self.why}


def choose_budgets(model, head, prompts: list[list[int]], refusals: list[list[int]], runs: list, aligned_ll: float,
                   config, *, batch_size: int, pad_id: int, progress=None) -> list[Budget]:
    """Each run's Budget (runs: the patcher's AdapterRuns, their harmful scores, fine-tuned
    log-likelihood and every row's projection already computed by the attribution pass)."""
    budgets, harmful = [], []
    for run in runs:
        scores = {key: sc["harmful"] for key, sc in run.scores.rows.items()}
        candidates = sum(t.numel() for t in scores.values())
        lost = aligned_ll - run.scores.details["targets_loglik"]["harmful"]
        goal = config.recover * lost
        limit = round(config.q_max * candidates)
        budget = Budget(lost, goal, limit, candidates)
        budget.rows = rows_for_gain(scores, goal, limit)
        budget.why = ("the fine-tune lost none of the refusals' likelihood" if lost <= 0 else
                      "first-order estimate" + (" (capped at q_max)" if budget.rows == limit else ""))
        budgets.append(budget)
        harmful.append(scores)
    ratios = [1.0] * len(runs)  # measured win / first-order estimate, per adapter
    for _ in range(config.budget_checks):
        open_runs = [j for j, b in enumerate(budgets) if b.rows > 0 and b.rows not in [c["rows"] for c in b.checks]]
        if not open_runs:
            break
        loras = [None] + [_patched(runs[j], harmful[j], budgets[j].rows, config) for j in open_runs]
        measured = target_logliks(model, head, prompts, refusals, loras, batch_size=batch_size, pad_id=pad_id,
                                  progress=progress)
        for j, patched_ll in zip(open_runs, measured[1:]):
            b = budgets[j]
            won = patched_ll - runs[j].scores.details["targets_loglik"]["harmful"]
            predicted = _predicted(harmful[j], b.rows)
            b.checks.append({"rows": b.rows, "predicted_win": predicted, "measured_win": won})
            ratios[j] = min(max(won / predicted if predicted > 0 else 1.0, 1 / MAX_CORRECTION), MAX_CORRECTION)
            b.rows = rows_for_gain(harmful[j], b.goal / ratios[j], b.limit)
            b.why = (f"corrected by the measured/estimated win {ratios[j]:.2f} at {b.checks[-1]['rows']} rows"
                     + (" (capped at q_max)" if b.rows == b.limit else ""))
    return budgets


def _patched(run, harmful: dict, count: int, config) -> tuple[Adapter, dict]:
    """The run's adapter with its top `count` rows projected (from the attribution pass's projection
    of every row: no weight is read), as a LoRA for a forward pass."""
    masks = global_safety_rows(harmful, None, 0.0, 0.0, count=count)
    tensors, _ = rows_from(run.lora, run.scores.every_row, masks)
    return Adapter(run.lora.config, tensors), run.by_layer


def _predicted(harmful: dict, count: int) -> float:
    """The first-order win of the top `count` rows."""
    import torch

    h = torch.cat([harmful[k].double() for k in sorted(harmful)])
    return float(torch.sort(h, descending=True, stable=True).values[:count].clamp(min=0).sum())
