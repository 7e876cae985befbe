"""Several adapters in one pass: base and aligned read once, each output as if patched alone."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mscp.cli import main
from mscp.core.checkpoint import Checkpoint
from mscp.core.config import PatchConfig
from mscp.core.pipeline import patch, patch_many
from mscp.core.prompts import default_prompts
from mscp.errors import MSCPError

PROMPTS = {"harmful": default_prompts("harmful")[:8], "benign": default_prompts("benign")[:8],
           "task": default_prompts("benign")[8:16]}
OPTS = dict(prompts=PROMPTS, progress=False, hash_inputs=False, batch_size=4, score="wanda")  # the two-pass design is Wanda's; attribution: test_scores.py


@pytest.fixture(scope="module")
def adapters(llama_trio, tmp_path_factory):
    """The trio's adapter and two seeded variants (other A and B, one with fewer target modules)."""
    root = tmp_path_factory.mktemp("adapters")
    out = [llama_trio["adapter"]]
    for seed in (1, 2):
        folder = root / f"variant{seed}"
        shutil.copytree(llama_trio["adapter"], folder)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        tensors = {k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()
                   if seed == 1 or ".mlp." in k}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def together(llama_trio, adapters):
    return patch_many(llama_trio["base"], llama_trio["aligned"], adapters, **OPTS)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_each_output_of_a_multi_adapter_pass_equals_patching_that_adapter_alone(llama_trio, adapters, together, k):
    alone = patch(llama_trio["base"], llama_trio["aligned"], adapters[k], **OPTS)
    assert together[k].tensors.keys() == alone.tensors.keys()
    for key in alone.tensors:
        assert torch.equal(together[k].tensors[key], alone.tensors[key]), key
    assert together[k].report["modules"] == alone.report["modules"]
    assert together[k].report["edit_fraction"] == alone.report["edit_fraction"]


def layer_bytes(checkpoint: Checkpoint, layers) -> int:
    heads = tuple(f"model.layers.{i}." for i in layers)
    return sum(checkpoint.byte_range(name)[2] for name in checkpoint.keys() if name.startswith(heads))


def test_a_multi_adapter_pass_reads_base_once_and_the_aligned_layers_up_to_the_window_twice(llama_trio, adapters,
                                                                                              together):
    alone = patch(llama_trio["base"], llama_trio["aligned"], adapters[0], **OPTS)
    window = together[0].report["safety_layers"]
    assert together[0].report["timings_s"]["finetuned_pass"] == "after_window"
    assert together[0].report["bytes_read"]["base"] == alone.report["bytes_read"]["base"]
    again = layer_bytes(Checkpoint(llama_trio["aligned"]), range(window[-1] + 1))
    assert together[0].report["bytes_read"]["aligned"] == alone.report["bytes_read"]["aligned"] + again
    assert together[0].report["adapters_in_pass"] == 3


def test_a_single_pass_for_several_adapters_reads_the_weights_once(llama_trio, adapters):
    one_pass = patch_many(llama_trio["base"], llama_trio["aligned"], adapters[:2], finetuned_pass="with_calibration",
                          **OPTS)
    alone = patch(llama_trio["base"], llama_trio["aligned"], adapters[0], **OPTS)
    assert one_pass[0].report["bytes_read"] == alone.report["bytes_read"]
    assert one_pass[0].report["timings_s"]["finetuned_pass"] == "with_calibration"
    assert one_pass[0].report["modules"] == alone.report["modules"]


@pytest.mark.parametrize("q, p", [(0.5, 0.2), (0.3, 0.3)])
def test_the_second_pass_scores_the_window_as_the_single_pass_does(llama_trio, q, p):
    one = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], q=q, p=p, **OPTS)
    two = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], q=q, p=p,
                finetuned_pass="after_window", **OPTS)
    window = one.report["safety_layers"]
    assert two.report["safety_layers"] == window
    in_window = {k for k in one.scores if int(k.split(".layers.")[1].split(".")[0]) in window}
    assert in_window and set(two.scores) == in_window
    for key in in_window:
        assert torch.equal(two.scores[key]["harmful"], one.scores[key]["harmful"]), key
        assert torch.equal(two.scores[key]["task"], one.scores[key]["task"]), key
    assert two.report["modules"] == one.report["modules"]
    assert len(two.report["timings_s"]["finetuned_layers"]) == window[-1] + 1


def test_cli_out_dir_writes_one_folder_per_adapter(llama_trio, adapters, tmp_path):
    out_dir = tmp_path / "outs"
    argv = ["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
            "--out-dir", str(out_dir), "--quiet", "--no-hash", "--layers", "2-3"]
    for a in adapters:
        argv += ["--adapter", str(a)]
    assert main(argv) == 0
    folders = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    assert folders == sorted(a.name for a in adapters)
    for a in adapters:
        report = json.loads((out_dir / a.name / "mscp_report.json").read_text())
        assert report["paths"]["adapter"] == str(a)
        assert report["safety_layers"] == [2, 3]


def test_cli_refuses_several_adapters_with_a_single_out(llama_trio, adapters, tmp_path, capsys):
    argv = ["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
            "--out", str(tmp_path / "o"), "--adapter", str(adapters[0]), "--adapter", str(adapters[1])]
    assert main(argv) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unknown_fine_tuned_pass_is_refused():
    with pytest.raises(MSCPError, match="finetuned_pass must be one of"):
        PatchConfig(finetuned_pass="never")


def test_cli_finetuned_pass_option_reaches_the_run(llama_trio, tmp_path):
    out = tmp_path / "o"
    assert main(["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
                 "--adapter", str(llama_trio["adapter"]), "--out", str(out), "--quiet", "--no-hash",
                 "--finetuned-pass", "after_window", "--score", "wanda"]) == 0
    report = json.loads((out / "mscp_report.json").read_text())
    assert report["config"]["finetuned_pass"] == "after_window"
    assert report["timings_s"]["finetuned_pass"] == "after_window"
    assert len(report["timings_s"]["finetuned_layers"]) == report["safety_layers"][-1] + 1
