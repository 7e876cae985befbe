"""`mscp tune`: q chosen on the adapter's own prompts by the Pareto rule, then the patch with that q."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_organism import tiny_organism  # noqa: F401 (a fixture)

from mscp import patch
from mscp.core.config import PatchConfig
from mscp.errors import MSCPError
from mscp.harness.tune import tune

CONFIG = PatchConfig(progress=False, batch_size=4, target_tokens=2, hash_inputs=False)


def _inputs(org):
    sp = org.splits
    return dict(harmful=[sp / "harmful_localize.txt"], benign=sp / "benign_localize.txt", task=sp / "task_localize.jsonl")


@pytest.fixture(scope="module")
def tuned(tiny_organism, tmp_path_factory):  # noqa: F811
    org, _, _ = tiny_organism
    out = tmp_path_factory.mktemp("tune") / "out"
    result = tune(org.base, org.aligned, org.finetuned("benign"), out, qs=(0.2, 0.05, 0.5), config=CONFIG,
                  max_new_tokens=3, cache=out.parent / "responses", progress=False, **_inputs(org))
    return org, out, result


def test_every_candidate_is_measured_in_order(tuned):
    _, _, result = tuned
    assert [p["q"] for p in result["points"]] == [0.05, 0.2, 0.5]
    efs = [p["edit_fraction"] for p in result["points"]]
    assert 0 < efs[0] <= efs[1] <= efs[2]  # the rows of a smaller q are a prefix of a larger q's
    for p in result["points"]:
        assert set(p["calibration"]) == {"keyword_asr", "over_refusal", "task_accuracy"}


def test_the_choice_keeps_the_bounds_and_has_the_lowest_asr_among_those_that_do(tuned):
    _, _, result = tuned
    ok = [p for p in result["points"]
          if p["calibration"]["task_accuracy"] >= result["unpatched"]["task_accuracy"] - 0.03
          and p["calibration"]["over_refusal"] <= result["aligned"]["over_refusal"] + 0.05]
    best = min(ok, key=lambda p: (p["calibration"]["keyword_asr"], p["edit_fraction"]))
    assert result["chosen_q"] == best["q"]


def test_the_output_is_the_patch_at_the_chosen_q(tuned, tmp_path):
    org, out, result = tuned
    alone = patch(org.base, org.aligned, org.finetuned("benign"), tmp_path / "alone",
                  config=CONFIG.replace(q=result["chosen_q"], budget="fixed"), **_inputs(org))
    got, want = (load_file(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "alone"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    report = json.loads((out / "mscp_report.json").read_text())
    assert report["config"]["q"] == result["chosen_q"] and report["modules"] == alone.report["modules"]
    assert report["tuning"]["chosen_q"] == result["chosen_q"] and len(report["tuning"]["points"]) == 3


def test_task_prompts_without_answers_are_refused_before_any_work(tiny_organism, tmp_path):  # noqa: F811
    org, _, _ = tiny_organism
    inputs = {**_inputs(org), "task": org.splits / "task_localize.txt"}
    with pytest.raises(MSCPError, match="needs an answer for every task prompt"):
        tune(org.base, org.aligned, org.finetuned("benign"), tmp_path / "out", config=CONFIG, progress=False, **inputs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qs", [(), (0.0,), (0.1, 1.5)])
def test_candidates_outside_0_1_are_refused(tiny_organism, tmp_path, qs):  # noqa: F811
    org, _, _ = tiny_organism
    with pytest.raises(MSCPError, match="candidate q"):
        tune(org.base, org.aligned, org.finetuned("benign"), tmp_path / "out", qs=qs, config=CONFIG, progress=False,
             **_inputs(org))
