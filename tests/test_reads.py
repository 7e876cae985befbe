"""The report counts the bytes of weights a patch reads, stage by stage (`weight_reads`): the figure
that carries over to a GPU, where a large patch is bound by reading weights."""
from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_final_rows_come_from_the_attribution_pass_bit_for_bit_and_read_nothing(llama_trio, backend):
    """The attribution pass projects every row of the scored modules; the final projection takes the
    selected rows from it instead of reading W_a and W_b again, and gets what a projection of just
    those rows (project_for: the Pareto points, tune, fast_project) gives, bit for bit."""
    from mscp.core.adapter import Adapter
    from mscp.core.project import project_for
    from mscp.kernels import _ext

    if backend == "cpp" and not _ext.load():
        pytest.skip(f"C++ extension unavailable: {_ext.build_error()}")
    result = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], target_tokens=4, backend=backend,
                   q=0.1, **OPTS)
    report = result.report
    assert "project" not in report["weight_reads"]["stages"]
    masks = {k: m["rows"] for k, m in report["modules"].items()}
    assert sum(map(len, masks.values())) > 0
    config = __import__("mscp").PatchConfig(backend=backend)
    (tensors, edits), = project_for(config, [Adapter.load(llama_trio["adapter"])], llama_trio["base"],
                                    llama_trio["aligned"], [masks])
    assert tensors.keys() == result.tensors.keys()
    assert all(torch.equal(tensors[k], result.tensors[k]) for k in tensors)
    assert {k: e.to_dict() for k, e in edits.items()} == {k: {kk: m[kk] for kk in e.to_dict()}
                                                          for k, m in report["modules"].items()
                                                          for e in [edits[k]]}


def test_several_adapters_of_a_call_share_every_read_of_the_default_score(llama_trio, tmp_path):
    """The edits of every row and the forward and backward passes of the attribution score read each
    layer once for all the adapters of a call: three adapters read what one reads."""
    import shutil

    from mscp import patch_many

    copies = []
    for k in range(3):
        shutil.copytree(llama_trio["adapter"], tmp_path / f"adapter{k}")
        copies.append(tmp_path / f"adapter{k}")
    kw = dict(target_tokens=4, **OPTS)
    one = patch_many(llama_trio["base"], llama_trio["aligned"], copies[:1], **kw)[0].report["weight_reads"]
    three = patch_many(llama_trio["base"], llama_trio["aligned"], copies, **kw)
    assert three[0].report["weight_reads"] == three[2].report["weight_reads"]  # one count for the call
    assert three[0].report["weight_reads"]["stages"] == one["stages"]
    assert all(torch.equal(three[2].tensors[k], t) for k, t in three[0].tensors.items())  # same adapter, same repair


def test_flops_are_counted_only_when_asked_and_counting_changes_no_repair(llama_trio):
    from mscp.core.reads import count_flops

    kw = dict(target_tokens=4, **OPTS)
    plain = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw)
    with count_flops():
        counted = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw)
    assert "flops" not in plain.report["weight_reads"]
    flops = counted.report["weight_reads"]["flops"]
    assert flops["total"] == sum(flops["stages"].values()) > 0
    assert {"stream", "targets_harmful", "attribution"} <= set(flops["stages"])  # every stage that computes
    assert counted.report["modules"] == plain.report["modules"]
    assert all(torch.equal(counted.tensors[k], t) for k, t in plain.tensors.items())


def test_each_further_adapter_of_a_call_adds_its_own_passes_and_the_shared_stages_nothing(llama_trio, tmp_path):
    """Where K adapters' time goes on a machine bound by compute: the curves and the aligned model's
    answers (and its benign reference) are computed once for the call; each adapter's forward and
    backward pass and its checks once per adapter. Copies of one adapter: each further one adds
    exactly the same FLOPs."""
    import shutil

    from mscp import patch_many
    from mscp.core.reads import count_flops

    copies = [shutil.copytree(llama_trio["adapter"], tmp_path / f"adapter{k}") for k in range(3)]
    kw = dict(target_tokens=4, **OPTS)
    with count_flops():
        calls = [patch_many(llama_trio["base"], llama_trio["aligned"], copies[:k], **kw)[0] for k in (1, 2, 3)]
    one, two, three = (r.report["weight_reads"]["flops"]["stages"] for r in calls)
    for shared in ("stream", "targets_harmful"):
        assert one[shared] == two[shared] == three[shared] > 0
    for own in ("attribution", "budget_checks"):
        assert three[own] - two[own] == two[own] - one[own] > 0


def every_row_of(llama_trio, config, cache=None):
    """Each adapter's projection of every row of the window (Scores.every_row) through the patcher's
    stages, and the patcher's reads and timings."""
    from mscp.core.patcher import Patcher

    patcher = Patcher.open(llama_trio["base"], llama_trio["aligned"], [llama_trio["adapter"]], config=config,
                           cache=cache)
    patcher.localize()
    patcher.score(patcher.runs)
    return patcher.runs[0], patcher.reads.record(), patcher.timings


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_every_row_edits_in_the_stream_are_project_fors_bit_for_bit(llama_trio, backend, tmp_path):
    """With the window known before the sweep (every layer, the default; or --layers), the edits of
    every row are projected while the sweep has each layer of both models loaded: no stage reads
    W_a and W_b again for them, and they are what project_for gives, every row and every edit bit
    for bit; the patch with them gives the rows and tensors of the patch without (the curves from
    the cache: no sweep, so the stage of its own)."""
    from mscp import PatchConfig
    from mscp.core.adapter import Adapter
    from mscp.core.project import project_for
    from mscp.kernels import _ext

    if backend == "cpp" and not _ext.load():
        pytest.skip(f"C++ extension unavailable: {_ext.build_error()}")
    for options in ({}, {"layers": (1, 2)}):
        config = PatchConfig(target_tokens=4, backend=backend, hash_inputs=False, batch_size=8, **options)
        run, reads, timings = every_row_of(llama_trio, config)
        assert "edits_all_rows" not in reads["stages"] and "edits_all_rows_in_stream" in timings
        tensors, edits = run.scores.every_row
        masks = {k: range(e.d_out) for k, e in edits.items()}
        assert 0 < len(masks) <= len(run.lora.modules)
        assert len(masks) < len(run.lora.modules) or not options  # layers 1-2: only their modules
        (want_tensors, want_edits), = project_for(config, [Adapter.load(llama_trio["adapter"])], llama_trio["base"],
                                                  llama_trio["aligned"], [masks])
        assert tensors.keys() == want_tensors.keys()
        assert all(torch.equal(tensors[k], want_tensors[k]) and tensors[k].dtype == want_tensors[k].dtype
                   for k in tensors)
        assert list(edits) == list(want_edits)
        assert {k: e.to_dict() for k, e in edits.items()} == {k: e.to_dict() for k, e in want_edits.items()}

    kw = dict(target_tokens=4, backend=backend, q=0.1, cache=tmp_path / "cache", **OPTS)
    folded = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw)
    separate = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **kw)  # cached curves
    assert "edits_all_rows" not in folded.report["weight_reads"]["stages"]
    assert separate.report["weight_reads"]["stages"]["edits_all_rows"] > 0
    assert folded.report["modules"] == separate.report["modules"]
    assert sum(m["n_rows"] for m in folded.report["modules"].values()) > 0
    assert folded.tensors.keys() == separate.tensors.keys()
    assert all(torch.equal(folded.tensors[k], t) for k, t in separate.tensors.items())


def test_every_row_edits_get_a_stage_of_their_own_where_the_stream_cannot_hold_them(llama_trio):
    """The window chosen from the curves (rho < 1) is known only after the sweep; a compute dtype
    other than the checkpoint's gives the layers cast weights, not the tensors the projection reads.
    Either way the edits of every row are projected in their own stage, as before."""
    from mscp import PatchConfig

    for options in ({"rho": 0.5}, {"dtype": "bfloat16"}):
        config = PatchConfig(target_tokens=4, hash_inputs=False, batch_size=8, **options)
        _run, reads, timings = every_row_of(llama_trio, config)
        assert reads["stages"]["edits_all_rows"] > 0 and "edits_all_rows_in_stream" not in timings
