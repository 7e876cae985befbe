"""The adaptive budget (core/budget.py): per adapter, the fewest rows whose edit wins back a share of
the refusals' log-likelihood the fine-tune lost, measured by forward passes, not set by q."""
from __future__ import annotations

import math
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
    assert b["goal_loglik"] == pytest.approx(lost)  # the first proposal closes all of it, to first order
    assert 0 <= b["rows"] <= b["limit_rows"] == round(0.2 * b["candidate_rows"])
    assert b["why"]
    edited = sum(len(m["rows"]) for m in r.report["modules"].values())
    assert edited <= b["rows"]  # rows whose score is not positive are never edited
    assert r.report["config"]["budget"] == "adaptive"
    assert len(b["checks"]) <= 3
    for check in b["checks"]:  # each check measured a proposed count against both references
        aligned, finetuned = check["references"]["aligned"], check["references"]["finetuned"]
        p = check["refusal_probability"]
        assert check["benign_refusal_rise"] == pytest.approx(p["benign"] - aligned[1])
        if aligned[0] > finetuned[0]:
            assert check["won_back"] == pytest.approx((p["harmful"] - finetuned[0]) / (aligned[0] - finetuned[0]))
    if b["checks"]:  # the chosen count is a checked one, unless every check broke the benign bound
        assert b["rows"] in [c["rows"] for c in b["checks"]] or "every checked count" in b["why"]


def test_the_checks_follow_the_rule_of_the_module_doc():
    """Grow a count that wins back too little (doubled after one check, a little past the trend of
    two), halve one that raises benign refusals too far, move one that meets both back along the
    trend; conclude on the fewest checked rows that met both."""
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _conclude, _judge

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03)
    aligned, finetuned = (0.9, 0.05), (0.1, 0.0)
    b, bounds = Budget(10.0, limit=1000, candidates=5000, rows=100), [0, 1000]
    _judge(b, bounds, (0.3, 0.06), finetuned, aligned, cfg)       # won back 0.25: too few
    assert b.rows == 220 and bounds == [100, 1000]                # doubled, 10 % past
    _judge(b, bounds, (0.85, 0.10), finetuned, aligned, cfg)      # benign +0.05: too many
    assert b.rows == 160 and bounds == [100, 219]
    _judge(b, bounds, (0.8, 0.07), finetuned, aligned, cfg)       # 0.875 won back, +0.02: enough
    t = (0.8 - 0.25) / (0.875 - 0.25)                             # back along the trend from 100 rows
    assert b.rows == round(100 * 1.6 ** t)
    _conclude(b, cfg)
    assert b.rows == 160 and "fewest checked rows" in b.why
    lone = Budget(10.0, limit=1000, candidates=5000, rows=300)
    _judge(lone, [0, 1000], (0.9, 0.2), finetuned, aligned, cfg)  # breaks the bound, nothing else checked
    _conclude(lone, cfg)
    assert lone.rows == 150 and "every checked count" in lone.why
    trend = Budget(10.0, limit=100_000, candidates=500_000, rows=1000)
    bounds = [0, 100_000]
    _judge(trend, bounds, (0.3, 0.0), finetuned, aligned, cfg)    # 0.25
    _judge(trend, bounds, (0.5, 0.0), finetuned, aligned, cfg)    # 0.5 at 2200: +0.25 per 2.2x
    per_doubling = 0.25 / math.log2(2.2)
    assert trend.rows == round(2200 * min(2 ** (0.3 / per_doubling) * 1.1, 4.0))


def test_without_checks_the_count_is_the_first_order_estimate_of_the_whole_loss(llama_trio):
    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], budget_checks=0, **OPTS)
    b = r.report["score_details"]["budget"]
    harmful = {k: sc["harmful"] for k, sc in r.scores.items()}
    assert b["checks"] == [] and b["goal_loglik"] == pytest.approx(b["lost_loglik"])
    assert b["rows"] == rows_for_gain(harmful, b["lost_loglik"], b["limit_rows"])


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
    for bad in (0.0, 1.5):
        with pytest.raises(MSCPError, match="recover"):
            PatchConfig(recover=bad)
    with pytest.raises(MSCPError, match="max_over_refusal"):
        PatchConfig(max_over_refusal=-0.1)
    with pytest.raises(MSCPError, match="q_max"):
        PatchConfig(q_max=1.5)


def test_a_q_given_without_a_budget_means_the_fixed_budget():
    """q is the fixed budget's row count: the API's keyword and the command line's --q choose it,
    since the default (auto: adaptive with the attribution score) would ignore q."""
    import argparse

    from mscp.cli.options import add_config_options, config_from_args
    from mscp.core.config import with_overrides

    assert PatchConfig().adaptive_budget and not PatchConfig(score="wanda").adaptive_budget
    assert with_overrides(PatchConfig(), {"q": 0.05}).budget == "fixed"
    assert with_overrides(PatchConfig(), {"q": 0.05, "budget": "adaptive"}).budget == "adaptive"
    assert with_overrides(PatchConfig(), {"p": 0.01}).budget == "auto"
    p = argparse.ArgumentParser()
    add_config_options(p)
    assert config_from_args(p.parse_args(["--q", "0.05"])).budget == "fixed"
    assert config_from_args(p.parse_args([])).budget == "auto"
    assert config_from_args(p.parse_args(["--q", "0.05", "--budget", "adaptive"])).budget == "adaptive"
