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
    assert b["goal_loglik"] == pytest.approx(lost)  # the first proposal closes all of it, to first order
    assert 0 <= b["rows"] <= b["limit_rows"] <= b["candidate_rows"]
    assert r.report["edit_fraction"] <= PatchConfig().max_edit
    assert b["why"]
    edited = sum(len(m["rows"]) for m in r.report["modules"].values())
    assert edited <= b["rows"]  # rows whose score is not positive are never edited
    assert r.report["config"]["budget"] == "adaptive"
    config = PatchConfig()
    assert len(b["checks"]) <= config.budget_checks * config.budget_probes
    assert {c["pass"] for c in b["checks"]} <= set(range(config.budget_checks))
    for check in b["checks"]:  # each check measured a proposed count against both references
        aligned, finetuned = check["references"]["aligned"], check["references"]["finetuned"]
        p = check["refusal_probability"]
        assert check["benign_refusal_rise"] == pytest.approx(p["benign"] - aligned[1])
        share = check["greedy_refusal_share"]["benign"]
        assert check["benign_greedy_refusal_rise"] == pytest.approx(share - aligned[2])
        assert 0 <= share <= 1 and 0 <= aligned[2] <= 1 and 0 <= finetuned[2] <= 1
        if aligned[0] > finetuned[0]:
            assert check["won_back"] == pytest.approx((p["harmful"] - finetuned[0]) / (aligned[0] - finetuned[0]))
    if b["checks"]:  # the chosen count is a checked one, unless every check broke the benign bound
        assert b["rows"] in [c["rows"] for c in b["checks"]] or "every checked count" in b["why"]


def check(rows, won, rise, step=0, greedy_rise=0.0):
    return {"pass": step, "rows": rows, "won_back": won, "benign_refusal_rise": rise,
            "benign_greedy_refusal_rise": greedy_rise}


@pytest.mark.parametrize("guard, kept", [("probability", [100, 200]), ("greedy", [100, 400]), ("both", [100])])
def test_the_benign_guard_bounds_the_figure_it_names(guard, kept):
    """benign_guard: the mean probability's rise, the greedy refusals' share's rise, or both, each
    within max_over_refusal."""
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _sorted

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03, benign_guard=guard)
    b = Budget(10.0, limit=1000, candidates=5000, rows=100)
    b.checks = [check(100, 0.5, 0.01, greedy_rise=0.0), check(200, 0.9, 0.02, greedy_rise=0.0625),
                check(400, 0.95, 0.05, greedy_rise=0.02)]
    ok, met, broke = _sorted(b, cfg)
    assert [c["rows"] for c in ok] == kept
    assert [c["rows"] for c in broke] == sorted({100, 200, 400} - set(kept))
    assert [c["rows"] for c in met] == [r for r in kept if r != 100]


def test_the_first_pass_probes_evenly_in_log_rows_above_the_estimate_up_to_four_times_it():
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _probes

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03, budget_probes=3, benign_guard="probability")
    assert _probes(Budget(10.0, limit=1000, candidates=5000, rows=100), cfg) == [159, 252, 400]
    assert _probes(Budget(10.0, limit=300, candidates=5000, rows=100), cfg) == [159, 252, 300]  # capped at the limit
    cfg.budget_probes = 2
    assert _probes(Budget(10.0, limit=1000, candidates=5000, rows=100), cfg) == [200, 400]


@pytest.mark.parametrize("refine", [True, False])
def test_without_refine_an_adapter_is_checked_again_only_while_no_count_met_both_bounds(refine):
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _next_probes

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03, budget_probes=3, budget_refine=refine,
                          benign_guard="probability")
    met, short, broke, lost_none = (Budget(10.0, limit=10_000, candidates=50_000, rows=100) for _ in range(4))
    met.checks = [check(100, 0.5, 0.0), check(200, 0.7, 0.01), check(400, 0.9, 0.02)]
    short.checks = [check(100, 0.2, 0.0), check(200, 0.3, 0.0), check(400, 0.4, 0.0)]
    broke.checks = [check(100, 0.5, 0.0), check(200, 0.9, 0.05)]  # won back, but past the benign bound
    lost_none.rows = 0
    assert sorted(_next_probes([met, short, broke, lost_none], cfg)) == ([0, 1, 2] if refine else [1, 2])


def test_later_passes_probe_inside_the_bracket_the_checks_left():
    """Above the most rows seen to win back too little, below the fewest seen to meet both (or to
    break the benign bound), evenly in log(rows); with no ceiling, up to where the trend of the two
    largest checks reaches `recover`."""
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _probes

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03, budget_probes=3, benign_guard="probability")
    b = Budget(10.0, limit=100_000, candidates=500_000, rows=100)
    b.checks = [check(100, 0.5, 0.0), check(200, 0.7, 0.01), check(400, 0.9, 0.02)]   # met at 400
    assert _probes(b, cfg) == [round(200 * 2 ** (i / 4)) for i in (1, 2, 3)]
    b.checks = [check(100, 0.5, 0.0), check(200, 0.7, 0.01), check(400, 0.9, 0.05)]   # 400 breaks the bound
    assert _probes(b, cfg) == [round(200 * 2 ** (i / 4)) for i in (1, 2, 3)]
    b.checks = [check(100, 0.9, 0.0), check(200, 0.95, 0.01)]                          # met at once: look lower
    assert _probes(b, cfg) == [25, 50, 75]
    b.checks = [check(100, 0.2, 0.0), check(200, 0.3, 0.0), check(400, 0.4, 0.0)]      # all too few: the trend
    doublings = (0.8 - 0.4) / 0.1 * 1.1                                                # +0.1 per doubling
    goal = 400 * 2 ** doublings
    assert _probes(b, cfg) == [round(400 * (goal / 400) ** (i / 3)) for i in (1, 2, 3)]
    b.checks = [check(100, 0.2, 0.0), check(200, 0.3, 0.01), check(400, 0.4, 0.02)]    # the benign rise nears
    goal = 400 * 2 ** (1.1 * (0.03 - 0.02) / 0.01)                                     # the bound first
    assert _probes(b, cfg) == [round(400 * (goal / 400) ** (i / 3)) for i in (1, 2, 3)]
    b.checks = [check(100, 0.2, 0.0), check(200, 0.2, 0.0)]                            # no trend: 3 doublings
    assert _probes(b, cfg) == [400, 800, 1600]
    b.checks = [check(1600, 0.3, 0.0), check(1601, 0.99, 0.0)]                         # nothing left between
    assert _probes(b, cfg) == []


def test_the_count_is_the_fewest_checked_rows_that_meet_both():
    from types import SimpleNamespace

    from mscp.core.budget import Budget, _conclude

    cfg = SimpleNamespace(recover=0.8, max_over_refusal=0.03, benign_guard="probability")
    b = Budget(10.0, limit=1000, candidates=5000)
    b.checks = [check(100, 0.5, 0.0), check(300, 0.85, 0.02), check(200, 0.81, 0.01, 1), check(400, 0.9, 0.05)]
    _conclude(b, cfg)
    assert b.rows == 200 and "fewest checked rows" in b.why
    b.checks = [check(100, 0.5, 0.0), check(200, 0.6, 0.01), check(400, 0.9, 0.05)]
    _conclude(b, cfg)
    assert b.rows == 200 and "the most it won back (0.60)" in b.why
    b.checks = [check(300, 0.9, 0.05), check(200, 0.85, 0.04)]
    _conclude(b, cfg)
    assert b.rows == 200 and "every checked count" in b.why


def test_without_checks_the_count_is_the_first_order_estimate_of_the_whole_loss(llama_trio):
    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], budget_checks=0, **OPTS)
    b = r.report["score_details"]["budget"]
    from mscp.core.scoring import safety_rank

    harmful = {k: sc["harmful"] for k, sc in r.scores.items()}
    rank = safety_rank(r.scores, PatchConfig().benign_penalty)
    assert b["checks"] == [] and b["goal_loglik"] == pytest.approx(b["lost_loglik"])
    assert b["rows"] == rows_for_gain(harmful, b["lost_loglik"], b["limit_rows"], rank=rank)


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
    with pytest.raises(MSCPError, match="max_edit"):
        PatchConfig(max_edit=1.5)


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


def test_benign_penalty_ranks_rows_by_harmful_score_less_their_benign_refusal_rise():
    from mscp.core.scoring import safety_rank

    harmful = torch.tensor([3.0, 2.0, 1.0, 0.5])
    rows = {"m": {"harmful": harmful, "benign_refusal": torch.tensor([2.5, -1.0, 0.0, 0.0])}}
    assert global_safety_rows(safety_rank(rows, 0.0), None, 0.0, 0.0, count=2)["m"].tolist() == [0, 1]
    rank = safety_rank(rows, 1.0)                 # row 0: 3 - 2.5; a fall of benign refusals earns nothing
    assert rank["m"].tolist() == [0.5, 2.0, 1.0, 0.5]
    assert global_safety_rows(rank, None, 0.0, 0.0, count=2)["m"].tolist() == [1, 2]
    assert rows_for_gain({"m": harmful}, 2.5, limit=4, rank=rank) == 2      # 2.0 + 1.0, in the rank's order
    never = safety_rank(rows, 2.0)                # row 0: 3 - 5 < 0, never edited, so it adds nothing
    assert global_safety_rows(never, None, 0.0, 0.0, count=4)["m"].tolist() == [1, 2, 3]
    assert rows_for_gain({"m": harmful}, 3.5, limit=4, rank=never) == 3


def test_a_patch_with_a_benign_penalty_scores_benign_refusals_in_the_same_pass_and_selects_by_them(llama_trio):
    from mscp.core.scoring import safety_rank

    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], benign_penalty=1.0, **OPTS)
    assert all(set(sc) == {"harmful", "benign_refusal"} for sc in r.scores.values())
    assert "benign_refusal" in r.report["score_details"]["targets_loglik"]
    rows = global_safety_rows(safety_rank(r.scores, 1.0), None, 0.0, 0.0, count=r.report["score_details"]["budget"]["rows"])
    assert {k: m.get("selected_rows", m["rows"]) for k, m in r.report["modules"].items()} == \
        {k: rows.get(k, torch.tensor([], dtype=torch.long)).tolist() for k in r.report["modules"]}


def test_the_row_limit_keeps_the_edits_within_max_edit_of_the_loras_parameters():
    from types import SimpleNamespace

    from mscp.core.budget import row_limit

    rank = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0, 0.5, 4.0])}
    lora = SimpleNamespace(tensors={"a": torch.zeros(2, 4), "b": torch.zeros(3, 2)}, n_parameters=lambda: 40)
    # in rank order: b[2] (2 parameters), a[0] (4), b[0] (2), a[1] (4), b[1] (2): 2, 6, 8, 12, 14
    assert [row_limit(lora, rank, f) for f in (0.0, 0.05, 0.2, 0.25, 1.0)] == [0, 1, 3, 3, 5]
