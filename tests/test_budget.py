"""The adaptive budget (core/budget.py): per adapter, the fewest rows whose edit wins back a share of
the refusals' log-likelihood the fine-tune lost, measured by forward passes, not set by q."""
from __future__ import annotations

import shutil

import pytest
import torch

from mscp import MSCPError, PatchConfig, patch, patch_many
from mscp.core.scoring import global_safety_rows, rows_for_gain

OPTS = dict(hash_inputs=False, batch_size=8, target_tokens=4, budget="adaptive")


def test_rows_for_gain_is_the_fewest_top_rows_whose_scores_reach_the_gain():
    scores = {"b": torch.tensor([0.5, -1.0, 3.0]), "a": torch.tensor([2.0, 0.25])}
    assert rows_for_gain(scores, 3.0, limit=5) == 1       # 3.0
    assert rows_for_gain(scores, 4.0, limit=5) == 2       # 3.0 + 2.0
    assert rows_for_gain(scores, 5.2, limit=5) == 3       # + 0.5
    assert rows_for_gain(scores, 5.2, limit=2) == 2       # capped
    assert rows_for_gain(scores, 100.0, limit=5) == 5     # never reached: the limit
    assert rows_for_gain(scores, 0.0, limit=5) == 0       # nothing lost, nothing edited
    assert rows_for_gain(scores, -1.0, limit=5) == 0


def test_a_count_selects_the_same_rows_as_the_fraction_that_gives_it():
    g = torch.Generator().manual_seed(3)
    scores = {k: torch.randn(n, generator=g) for k, n in (("x", 37), ("y", 11), ("z", 64))}
    n = 37 + 11 + 64
    for count in (0, 1, 7, 30):
        by_count = global_safety_rows(scores, None, 0.0, 0.0, count=count)
        by_q = global_safety_rows(scores, None, count / n, 0.0)
        assert {k: v.tolist() for k, v in by_count.items()} == {k: v.tolist() for k, v in by_q.items()}


def test_the_report_says_how_many_rows_and_why(llama_trio):
    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **OPTS)
    b = r.report["score_details"]["budget"]
    lost = r.report["score_details"]["targets_loglik"]["aligned"] - r.report["score_details"]["targets_loglik"]["harmful"]
    assert b["lost_loglik"] == pytest.approx(lost)
    assert b["goal_loglik"] == pytest.approx(lost)  # recover 1.0
    assert 0 <= b["rows"] <= b["limit_rows"] == round(0.2 * b["candidate_rows"])
    assert b["why"]
    edited = sum(len(m["rows"]) for m in r.report["modules"].values())
    assert edited <= b["rows"]  # rows whose score is not positive are never edited
    assert r.report["config"]["budget"] == "adaptive"
    for check in b["checks"]:  # each check measured the win of a proposed count
        assert set(check) == {"rows", "predicted_win", "measured_win"}


def test_the_measured_correction_moves_the_count_towards_the_goal(llama_trio):
    """With checks, the count is proposed again from the measured/estimated win; without, the
    first-order estimate stands. Either way the count grows with the share to win back."""
    counts = {}
    for recover in (0.25, 1.0):
        for checks in (0, 2):
            r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], recover=recover,
                      budget_checks=checks, **OPTS).report["score_details"]["budget"]
            counts[recover, checks] = r["rows"]
            assert len(r["checks"]) <= checks
    assert counts[0.25, 0] <= counts[1.0, 0]
    assert counts[0.25, 2] <= counts[1.0, 2]


def test_adapters_of_one_call_get_their_own_budgets_and_the_same_as_alone(llama_trio, tmp_path):
    shutil.copytree(llama_trio["adapter"], tmp_path / "a")
    shutil.copytree(llama_trio["adapter"], tmp_path / "b")
    alone = patch(llama_trio["base"], llama_trio["aligned"], tmp_path / "a", **OPTS)
    both = patch_many(llama_trio["base"], llama_trio["aligned"], [tmp_path / "a", tmp_path / "b"], **OPTS)
    for r in both:
        assert r.report["score_details"]["budget"]["rows"] == alone.report["score_details"]["budget"]["rows"]
        assert all(torch.equal(r.tensors[k], t) for k, t in alone.tensors.items())


def test_the_budget_needs_the_attribution_score():
    with pytest.raises(MSCPError, match="adaptive budget needs the attribution score"):
        PatchConfig(budget="adaptive", score="wanda")
    with pytest.raises(MSCPError, match="recover"):
        PatchConfig(recover=0.0)
    with pytest.raises(MSCPError, match="q_max"):
        PatchConfig(q_max=1.5)
