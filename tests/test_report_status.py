"""A patch that edits nothing or almost nothing says so: the report's `status` and `warnings`, the
printed lines, and `--fail-on-noop`; skipped modules are recorded apart from projected ones."""
from __future__ import annotations

import json
import shutil

import pytest

from mscp import patch
from mscp.cli import main
from mscp.core.prompts import default_prompts
from mscp.core.report import REPORT_NAME, REPORT_VERSION, assess, check_report, read_report
from mscp.errors import MSCPError

PROMPTS = {"harmful": default_prompts("harmful")[:8], "benign": default_prompts("benign")[:8],
           "task": default_prompts("benign")[8:16]}
OPTS = dict(progress=False, hash_inputs=False, batch_size=4, layers=(2, 3), score="wanda")  # per-module selection


@pytest.fixture(scope="module")
def same_weights_trio(llama_trio, tmp_path_factory):
    """aligned = base: V is zero in every module."""
    root = tmp_path_factory.mktemp("same")
    shutil.copytree(llama_trio["base"], root / "aligned")
    return {"base": llama_trio["base"], "aligned": root / "aligned", "adapter": llama_trio["adapter"]}


def run(trio, prompts=PROMPTS, **overrides):
    return patch(trio["base"], trio["aligned"], trio["adapter"], prompts=prompts, **{**OPTS, **overrides}).report


@pytest.fixture(scope="module")
def normal(llama_trio):
    return run(llama_trio, q=0.5, p=0.2)


@pytest.fixture(scope="module")
def v_zero(same_weights_trio):
    return run(same_weights_trio, q=0.5, p=0.2)


def test_a_patch_that_edits_rows_has_status_ok_and_no_warnings(normal):
    assert normal["edited_parameters"] > 0
    assert (normal["status"], normal["warnings"]) == ("ok", [])


def test_every_module_with_v_zero_is_a_noop_that_says_why(v_zero):
    assert v_zero["status"] == "noop" and v_zero["edited_parameters"] == 0
    assert v_zero["warnings"] == ["every module in the safety layers 2-3 was skipped (V is zero): base and aligned "
                                  "weights do not differ there"]


def test_skipped_modules_are_recorded_apart_from_projected_ones(v_zero, normal):
    assert v_zero["projected_modules"] == []
    assert v_zero["skipped_modules"] == {key: "V is zero" for key in v_zero["modules"]}
    selected = [m for m in v_zero["modules"].values() if m["selected_rows"]]
    assert selected, "the selection is kept for the record"
    assert all(m["rows"] == [] and m["n_rows"] == 0 for m in v_zero["modules"].values())
    assert normal["skipped_modules"] == {}
    assert normal["projected_modules"] == [k for k, m in normal["modules"].items() if m["rows"]]


def test_an_empty_selection_everywhere_is_a_noop_that_says_why(llama_trio):
    report = run(llama_trio, q=0.0, p=0.0, score="wanda")
    assert report["status"] == "noop"
    assert report["warnings"] == ["the row selection is empty in every module: top_q(I^H) \\ top_p(I^T) kept no row "
                                  "(q=0.0, p=0.0, score wanda)"]


def test_too_few_calibration_prompts_are_a_warning(llama_trio):
    few = {"harmful": PROMPTS["harmful"][:2], "benign": PROMPTS["benign"][:2], "task": PROMPTS["task"]}
    report = run(llama_trio, prompts=few, q=0.5, p=0.2)
    assert report["status"] == "warnings"
    assert [w.split(" (")[0] for w in report["warnings"]] == ["only 2 harmful prompts", "only 2 benign prompts"]


@pytest.mark.parametrize("modules, prompts, expected", [
    ({}, {"harmful": 8}, ("noop", "the adapter has no LoRA module in the safety layers 2-3: nothing to project")),
    ({"a": dict(n_rows=3, rank=2, skipped=None), "b": dict(n_rows=0, rank=2, skipped="V is zero")}, {"harmful": 8},
     ("warnings", "1 of 2 modules in the safety layers were skipped (V is zero)")),
    ({"a": dict(n_rows=3, rank=2, skipped=None), "b": dict(n_rows=0, rank=2, skipped=None)}, {"harmful": 8},
     ("warnings", "the row selection is empty in 1 of 2 modules (q=0.3, p=0.3)")),
    ({"a": dict(n_rows=3, rank=2, skipped=None)}, {"task": 1}, ("warnings", "only 1 task prompt (fewer than 8): the "
                                                                "layer curves and row scores rest on too little data")),
])
def test_assess_names_each_cause(modules, prompts, expected):
    edited = sum(m["n_rows"] * m["rank"] for m in modules.values())
    status, warnings = assess(modules, prompts, [2, 3], {"q": 0.3, "p": 0.3, "score": "wanda"}, edited)
    assert (status, warnings[0]) == expected


def test_attribution_leaving_most_modules_empty_is_no_warning():
    """attribution ranks all modules' rows together: few modules holding rows is what it does."""
    modules = {"a": dict(n_rows=3, rank=2, skipped=None), "b": dict(n_rows=0, rank=2, skipped=None),
               "c": dict(n_rows=0, rank=2, skipped=None)}
    assert assess(modules, {"harmful": 8}, [2, 3], {"q": 0.02, "p": 0.02, "score": "attribution"}, 6) == ("ok", [])


def patch_argv(trio, out, *more):
    return ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter", str(trio["adapter"]),
            "--out", str(out), "--quiet", "--no-hash", "--layers", "2-3", *more]


@pytest.mark.parametrize("flag, code", [([], 0), (["--fail-on-noop"], 3)], ids=["default", "fail-on-noop"])
def test_the_command_line_prints_a_noop_and_fails_on_it_when_asked(same_weights_trio, tmp_path, capsys, flag, code):
    out = tmp_path / "out"
    assert main(patch_argv(same_weights_trio, out, *flag)) == code
    captured = capsys.readouterr()
    assert "status: noop" in captured.out
    assert "mscp: warning: every module in the safety layers 2-3 was skipped" in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("mscp: error:")]
    assert len(errors) == (1 if code else 0)
    if code:
        assert errors[0].startswith("mscp: error: the patch edited nothing (status noop: every module")
    assert json.loads((out / "mscp_report.json").read_text())["status"] == "noop", "the output is written either way"


def test_fail_on_noop_lets_a_patch_that_edits_pass(llama_trio, tmp_path, capsys):
    assert main(patch_argv(llama_trio, tmp_path / "out", "--fail-on-noop", "--q", "0.5", "--p", "0.2")) == 0
    assert "status: ok" in capsys.readouterr().out


# -- the report's schema version ----------------------------------------------------------------------
def test_a_report_carries_its_schema_version_and_reads_back(normal, tmp_path):
    assert normal["report_version"] == REPORT_VERSION
    (tmp_path / REPORT_NAME).write_text(json.dumps(normal))
    assert read_report(tmp_path) == read_report(tmp_path / REPORT_NAME) == json.loads(json.dumps(normal))
    older = {k: v for k, v in normal.items() if k != "report_version"}  # written before the key was recorded
    assert check_report(older, "old") is older


@pytest.mark.parametrize("report, message", [
    pytest.param([1], r"^R is not an mscp report \(a JSON array, not an object\)$", id="not-an-object"),
    pytest.param({"report_version": "1", "status": "ok"}, r"^R is not an mscp report \(report_version '1'\)$",
                 id="version-a-string"),
    pytest.param({"report_version": REPORT_VERSION + 1, "status": "ok", "mscp_version": "9.0"},
                 rf"^R is an mscp report of version {REPORT_VERSION + 1}, written by a newer mscp \(9\.0\); "
                 rf"this one reads versions up to {REPORT_VERSION}$", id="future-version"),
    pytest.param({"report_version": 1}, r"^R is not an mscp report \(no 'status'\)$", id="no-status"),
])
def test_a_report_of_another_schema_is_one_line(report, message):
    with pytest.raises(MSCPError, match=message):
        check_report(report, "R")
