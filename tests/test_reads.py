"""The report counts the bytes of weights a patch reads, stage by stage (`weight_reads`): the figure
that carries over to a GPU, where a large patch is bound by reading weights."""
from __future__ import annotations

import pytest

from mscp import patch
from mscp.core.checkpoint import Checkpoint

OPTS = dict(hash_inputs=False, batch_size=8)


def one_pass(trio) -> int:
    return Checkpoint(trio["base"]).tensor_bytes + Checkpoint(trio["aligned"]).tensor_bytes


def test_the_stages_add_up_to_what_the_checkpoints_counted(llama_trio):
    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **OPTS).report
    reads = r["weight_reads"]
    assert reads["total"] == sum(reads["stages"].values()) == sum(r["bytes_read"].values())
    assert reads["one_pass"] == one_pass(llama_trio)
    assert reads["passes"] == pytest.approx(reads["total"] / reads["one_pass"], abs=1e-4)


def test_the_single_pass_score_reads_about_one_pass(llama_trio):
    """The paper's setting: one stream of both models, then the projected modules again."""
    r = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], score="wanda", q=0.3, p=0.3, rho=0.2,
              **OPTS).report
    assert set(r["weight_reads"]["stages"]) <= {"stream", "project", "other"}
    assert 0.5 < r["weight_reads"]["passes"] < 1.5


def test_the_default_score_reads_the_aligned_model_once_per_target_token_unless_cached(llama_trio, tmp_path):
    kw = dict(target_tokens=4, cache=tmp_path / "cache", **OPTS)
    first = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw).report["weight_reads"]
    again = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw).report["weight_reads"]
    assert first["stages"]["targets_harmful"] > 0 and "targets_harmful" not in again["stages"]
    assert "stream" not in again["stages"]  # the curves come from the cache: neither model streams for them
    assert again["total"] < first["total"]


def test_layers_kept_across_tokens_give_the_same_repair_and_read_the_model_once(llama_trio):
    """resident_gb=0 reloads every layer for every generated token; the default keeps them loaded
    (the tiny model fits): the same answers, so the same rows and tensors, from one read."""
    kw = dict(target_tokens=4, **OPTS)
    reload = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], resident_gb=0, **kw)
    kept = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw)
    assert kept.report["modules"] == reload.report["modules"]
    assert all(kept.tensors[k].equal(t) for k, t in reload.tensors.items())
    aligned = Checkpoint(llama_trio["aligned"]).tensor_bytes
    assert kept.report["weight_reads"]["stages"]["targets_harmful"] <= aligned
    assert reload.report["weight_reads"]["stages"]["targets_harmful"] >= 2 * aligned
