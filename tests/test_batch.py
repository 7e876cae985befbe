"""Many adapters into --out-dir, here (--executor local) and on a real Ray cluster (--executor ray):
every output bit-identical to patching its adapter alone (with as many torch threads: sums split
across threads round differently), failures per adapter, retries, resume, and the run summary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY

from mscp.cli import main
from mscp.errors import MSCPError
from mscp.executors.batch import (
    SUMMARY_NAME,
    BatchSpec,
    list_adapters,
    output_names,
    patch_group,
    run_batch,
)
from mscp.harness.synth import SynthSpec, write_adapters

QUICK = ["--quiet", "--no-hash", "--batch-size", "8", "--score", "wanda"]  # the batch machinery, not the score: the cheap one
COMPARED = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def adapters(llama_trio, tmp_path_factory):
    """The trio's adapter, two more drawn for the same base, and one without weights."""
    root = tmp_path_factory.mktemp("batch-adapters")
    good = [llama_trio["adapter"], *write_adapters(root, SynthSpec(family="llama", **TINY), 2)]
    broken = root / "broken"
    shutil.copytree(good[1], broken)
    (broken / "adapter_model.safetensors").unlink()
    return good, broken


def patch_alone(trio, adapters, root: Path, threads: int) -> list[Path]:
    """Each adapter patched alone by `mscp patch --adapter A --out O` with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = []
        for k, adapter in enumerate(adapters):
            out = root / f"alone-{k}"
            assert main(["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]),
                         "--adapter", str(adapter), "--out", str(out), *QUICK]) == 0
            outs.append(out)
        return outs
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def alone(llama_trio, adapters, tmp_path_factory):
    """The specification of a local batch: each adapter alone, with this process's threads."""
    return patch_alone(llama_trio, adapters[0], tmp_path_factory.mktemp("alone"), torch.get_num_threads())


@pytest.fixture(scope="module")
def alone_one_thread(llama_trio, adapters, tmp_path_factory):
    """The specification of a Ray batch with --cpus-per-task 1: each adapter alone, one thread."""
    return patch_alone(llama_trio, adapters[0], tmp_path_factory.mktemp("alone1"), 1)


def batch_argv(trio, source, out_dir, *more):
    return ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapters", str(source),
            "--out-dir", str(out_dir), *QUICK, *more]


def list_file(tmp_path, entries) -> Path:
    path = tmp_path / "adapters.txt"
    path.write_text("# adapters of the week\n" + "".join(f"{e}  # one\n" for e in entries) + "\n")
    return path


def same_outputs(batch_out: Path, alone_out: Path) -> None:
    for name in COMPARED:
        assert (batch_out / name).read_bytes() == (alone_out / name).read_bytes(), name
    ours, theirs = (json.loads((p / "mscp_report.json").read_text()) for p in (batch_out, alone_out))
    assert ours["modules"] == theirs["modules"]
    assert ours["safety_layers"] == theirs["safety_layers"]


def summary_of(out_dir: Path) -> dict:
    return json.loads((out_dir / SUMMARY_NAME).read_text())


# -- the list of adapters ---------------------------------------------------------------------------
def test_an_adapter_list_file_takes_comments_relative_folders_and_hub_ids(tmp_path):
    (tmp_path / "a").mkdir()
    source = list_file(tmp_path, ["a", "org/adapter@v2"])
    assert list_adapters(str(source)) == [str(tmp_path / "a"), "org/adapter@v2"]


def test_a_glob_lists_the_matching_folders_in_order(tmp_path):
    for name in ("b", "a", "c.txt"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("")
    assert list_adapters(str(tmp_path / "*")) == [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize("entries, message", [([], "names no adapter"), (["a", "a"], "is listed twice")])
def test_a_bad_adapter_list_is_one_line(tmp_path, entries, message):
    (tmp_path / "a").mkdir()
    with pytest.raises(MSCPError, match=message):
        list_adapters(str(list_file(tmp_path, entries)))


def test_a_pattern_matching_nothing_is_refused(tmp_path):
    with pytest.raises(MSCPError, match="neither a file nor a pattern matching any folder"):
        list_adapters(str(tmp_path / "nothing-*"))


@pytest.mark.parametrize("adapters, names", [
    (["/x/a", "/y/b"], ["a", "b"]),
    (["/x/a", "/y/a"], ["00-a", "01-a"]),
    (["org/lora", "org/lora@v2"], ["org--lora", "org--lora--v2"]),
])
def test_output_folders_are_named_after_the_adapters(adapters, names):
    assert output_names(adapters) == names


# -- the local executor ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(llama_trio, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    good, broken = adapters
    source = list_file(root, [*map(str, good), str(broken)])
    out_dir = root / "out"
    rc = main(batch_argv(llama_trio, source, out_dir, "--adapters-per-task", "2"))
    return rc, out_dir, source


def test_a_local_batch_writes_every_good_adapter_and_fails_the_broken_one_alone(local_run, adapters, capsys):
    rc, out_dir, _ = local_run
    good, broken = adapters
    assert rc == 1
    summary = summary_of(out_dir)
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "not_run": 0, "total": 4}
    failed = [e for e in summary["adapters"] if e["status"] == "failed"]
    assert [e["adapter"] for e in failed] == [str(broken)]
    assert "no adapter_model.safetensors" in failed[0]["error"] and "\n" not in failed[0]["error"]
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == sorted(Path(a).name for a in good)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_output_of_a_local_batch_equals_patching_that_adapter_alone(local_run, adapters, alone, k):
    _, out_dir, _ = local_run
    same_outputs(out_dir / Path(adapters[0][k]).name, alone[k])


def test_the_window_of_a_batch_is_computed_once_and_recorded(local_run, alone):
    _, out_dir, _ = local_run
    summary = summary_of(out_dir)
    window = json.loads((alone[0] / "mscp_report.json").read_text())["safety_layers"]
    assert summary["safety_layers"] == window
    assert summary["window"].startswith(f"layers {window[0]}-{window[-1]}: computed once for the batch")
    report = json.loads((Path(summary["adapters"][0]["out"]) / "mscp_report.json").read_text())
    assert report["batch"]["window"] == summary["window"]


def test_a_rerun_skips_complete_outputs_and_tries_the_failed_one_again(local_run, llama_trio, capsys):
    rc, out_dir, source = local_run
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file() and p.name != SUMMARY_NAME}
    assert main(batch_argv(llama_trio, source, out_dir, "--adapters-per-task", "2")) == 1
    assert "0 done, 3 skipped (complete), 1 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_rerun_with_every_output_complete_patches_nothing(local_run, adapters, llama_trio, tmp_path):
    _, out_dir, _ = local_run
    source = list_file(tmp_path, [str(a) for a in adapters[0]])
    assert main(batch_argv(llama_trio, source, out_dir)) == 0
    summary = summary_of(out_dir)
    assert summary["counts"] == {"done": 0, "skipped": 3, "failed": 0, "not_run": 0, "total": 3}
    assert summary["window"] == "not needed: every output was complete"


def test_a_rerun_with_another_config_refuses_to_replace_outputs_without_overwrite(local_run, llama_trio, capsys):
    _, out_dir, source = local_run
    assert main(batch_argv(llama_trio, source, out_dir, "--q", "0.4")) == 2
    assert "exists but was not made from these inputs and config" in capsys.readouterr().err


def flaky_task(marker_dir: Path, fail_on: str | None = None, times: int = 1):
    """A group function that raises `times` times (for a group holding `fail_on`, or any) before
    patching; every attempt leaves a file in marker_dir, so the test can count them."""
    def task(spec, jobs, note=""):
        if fail_on is None or any(fail_on in j.adapter for j in jobs):
            tag = Path(jobs[0].adapter).name
            attempts = len(list(marker_dir.glob(f"{tag}.*")))
            (marker_dir / f"{tag}.{attempts}").touch()
            if attempts < times:
                raise OSError(f"transient failure {attempts}")
        return patch_group(spec, jobs, note)
    return task


def spec_of(trio, **config) -> BatchSpec:
    from mscp.core.config import PatchConfig

    return BatchSpec(str(trio["base"]), str(trio["aligned"]),
                     PatchConfig(progress=False, hash_inputs=False, batch_size=8, **config).to_dict())


@pytest.mark.parametrize("times, status", [(1, "done"), (5, "failed")], ids=["fails-once", "fails-always"])
def test_a_local_task_that_raises_is_retried_then_fails_only_its_adapters(llama_trio, adapters, tmp_path, times,
                                                                          status):
    good, _ = adapters
    markers = tmp_path / "markers"
    markers.mkdir()
    summary = run_batch(spec_of(llama_trio, layers=(3, 4)), [str(a) for a in good[:2]], tmp_path / "out",
                        per_task=1, retries=2, progress=False, task=flaky_task(markers, fail_on=Path(good[1]).name,
                                                                              times=times))
    statuses = {Path(e["adapter"]).name: e["status"] for e in summary["adapters"]}
    assert statuses == {Path(good[0]).name: "done", Path(good[1]).name: status}
    assert len(list(markers.iterdir())) == min(times + 1, 3)
    if status == "failed":
        error = summary["adapters"][1]["error"]
        assert error == "OSError: transient failure 2 (after 3 attempts)"


def test_fail_on_noop_fails_a_batch_whose_patches_edit_nothing(llama_trio, adapters, tmp_path, capsys):
    source = list_file(tmp_path, [str(adapters[0][0])])
    assert main(batch_argv(llama_trio, source, tmp_path / "out", "--q", "0", "--fail-on-noop", "--layers", "3-4")) == 3
    err = capsys.readouterr().err
    assert "mscp: error: 1 adapter(s) edited nothing (status noop)" in err
    assert summary_of(tmp_path / "out")["noop"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "x", "--adapters", "y"], "not both"),
    (["--adapter", "x", "--out", "o", "--executor", "ray"], "--executor ray needs --out-dir"),
    (["--adapters", "y", "--out", "o"], "several adapters need --out-dir"),
])
def test_batch_options_that_do_not_fit_are_one_line(llama_trio, tmp_path, capsys, argv, message):
    base = ["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"])]
    if "--out" not in argv:
        argv = [*argv, "--out-dir", str(tmp_path / "d")]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


# -- on a real Ray cluster ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mscp[ray]'; `make test` installs it)")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(ray_cluster, llama_trio, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    good, broken = adapters
    source = list_file(root, [*map(str, good), str(broken)])
    out_dir = root / "out"
    rc = main(batch_argv(llama_trio, source, out_dir, "--executor", "ray", "--adapters-per-task", "2"))
    return rc, out_dir, source


def test_a_ray_batch_writes_every_good_adapter_and_fails_the_broken_one_alone(ray_run, adapters):
    rc, out_dir, _ = ray_run
    assert rc == 1
    summary = summary_of(out_dir)
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "not_run": 0, "total": 4}
    assert summary["executor"]["kind"] == "ray" and summary["executor"]["tasks"] == 2
    assert summary["executor"]["cluster_cpus"] == 2


@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_output_of_a_ray_batch_equals_patching_that_adapter_alone(ray_run, adapters, alone_one_thread, k):
    _, out_dir, _ = ray_run
    same_outputs(out_dir / Path(adapters[0][k]).name, alone_one_thread[k])
    report = json.loads((out_dir / Path(adapters[0][k]).name / "mscp_report.json").read_text())
    assert report["torch_threads"] == 1


def test_a_ray_rerun_skips_the_complete_outputs(ray_run, llama_trio):
    _, out_dir, source = ray_run
    assert main(batch_argv(llama_trio, source, out_dir, "--executor", "ray")) == 1
    assert summary_of(out_dir)["counts"]["skipped"] == 3


def test_a_ray_task_that_raises_is_retried_then_fails_only_its_adapters(ray_cluster, llama_trio, adapters, tmp_path):
    good, _ = adapters
    markers = tmp_path / "markers"
    markers.mkdir()
    names = [Path(a).name for a in good]
    task = flaky_task(markers, fail_on=names[2], times=5)
    once = flaky_task(markers, fail_on=names[1], times=1)
    summary = run_batch(spec_of(llama_trio, layers=(3, 4)), [str(a) for a in good], tmp_path / "out",
                        executor="ray", per_task=1, retries=2, progress=False,
                        task=lambda spec, jobs, note="": once(spec, jobs, note) if names[1] in jobs[0].adapter
                        else task(spec, jobs, note))
    assert [e["status"] for e in summary["adapters"]] == ["done", "done", "failed"]
    assert summary["adapters"][2]["error"] == "OSError: transient failure 2 (after 3 attempts)"
    attempts = sorted(p.name for p in markers.iterdir())
    assert attempts == [f"{names[1]}.0", f"{names[1]}.1", f"{names[2]}.0", f"{names[2]}.1", f"{names[2]}.2"]
