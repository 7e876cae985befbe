"""`mscp patch` end to end: the three output files, the report's fields, inputs untouched."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file

from mscp import fast_project
from mscp.cli import main
from mscp.core.checkpoint import sha256_file
from mscp.core.prompts import default_prompts


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    harmful = default_prompts("harmful")
    (d / "harm_a.txt").write_text("\n".join(harmful[:8]) + "\n")
    (d / "harm_b.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in harmful[8:16]))
    (d / "benign.csv").write_text("goal,other\n" + "".join(f'"{p}",x\n' for p in default_prompts("benign")[:10]))
    (d / "task.txt").write_text("\n".join(default_prompts("benign")[10:]) + "\n")
    return d


@pytest.fixture(scope="module")
def cli_run(llama_trio, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "patched"
    before = tree_digest(*llama_trio.values(), prompt_files)
    rc = main(["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
               "--adapter", str(llama_trio["adapter"]), "--out", str(out),
               "--harmful", str(prompt_files / "harm_a.txt"), str(prompt_files / "harm_b.jsonl"),
               "--benign", str(prompt_files / "benign.csv"), "--task", str(prompt_files / "task.txt"),
               "--q", "0.4", "--p", "0.2", "--quiet"])
    return rc, out, before, json.loads((out / "mscp_report.json").read_text())


def test_patch_writes_the_adapter_config_weights_and_report(cli_run):
    rc, out, _, _ = cli_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "mscp_report.json", "report.html"]


def test_inputs_are_byte_identical_after_a_patch(cli_run, llama_trio, prompt_files):
    _, _, before, _ = cli_run
    assert tree_digest(*llama_trio.values(), prompt_files) == before


def test_output_adapter_config_is_the_input_config(cli_run, llama_trio):
    _, out, _, _ = cli_run
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (llama_trio["adapter"] / "adapter_config.json").read_text())


@pytest.mark.parametrize("field", ["safety_layers", "layer_curves", "modules", "edit_fraction", "config",
                                   "versions", "inputs_sha256"])
def test_report_has_field(cli_run, field):
    assert field in cli_run[3]


def test_report_curves_have_every_criterion_per_layer(cli_run):
    report = cli_run[3]
    assert len(report["layer_curves"]) == report["n_layers"]
    for rec in report["layer_curves"]:
        assert {"c_harmful", "c_benign", "sigma", "li_gap"} <= set(rec)


def test_report_modules_are_keyed_by_lora_b_names_with_rows_and_norm_v(cli_run, llama_trio):
    report = cli_run[3]
    adapter = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    assert report["modules"]
    for key, rec in report["modules"].items():
        assert key in adapter and key.endswith("lora_B.weight")
        assert all(isinstance(r, int) and 0 <= r < adapter[key].shape[0] for r in rec["rows"])
        assert rec["norm_v"] > 0


def test_report_records_the_config_given_on_the_command_line(cli_run):
    config = cli_run[3]["config"]
    from mscp.core.config import PatchConfig

    assert (config["q"], config["p"], config["alpha"], config["rho"]) == (0.4, 0.2, 1.0, PatchConfig().rho)


def test_report_counts_prompts_from_every_file_format(cli_run):
    assert cli_run[3]["prompts"] == {"harmful": 16, "benign": 10, "task": 14}


def test_report_checksums_every_input_file(cli_run, llama_trio, prompt_files):
    sums = cli_run[3]["inputs_sha256"]
    shards = sorted(llama_trio["base"].glob("*.safetensors"))
    assert shards and all(sums["base"][str(p)] == sha256_file(p) for p in shards)
    assert sums["adapter"][str(llama_trio["adapter"] / "adapter_model.safetensors")] == sha256_file(
        llama_trio["adapter"] / "adapter_model.safetensors")
    assert sums["prompts:harmful"][str(prompt_files / "harm_b.jsonl")] == sha256_file(prompt_files / "harm_b.jsonl")


def test_written_adapter_loads_in_peft_and_changes_only_masked_rows(cli_run, llama_trio):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _, report = cli_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_trio["aligned"])), str(out))
    key = next(k for k, m in report["modules"].items() if m["rows"])
    module = model.get_submodule(key.removesuffix(".lora_B.weight"))
    written = load_file(str(out / "adapter_model.safetensors"))[key]
    torch.testing.assert_close(module.lora_B["default"].weight.detach(), written)


def test_fast_project_from_paths_equals_the_patch_output_given_its_masks(cli_run, llama_trio):
    _, out, _, report = cli_run
    masks = {k: m["rows"] for k, m in report["modules"].items()}
    tensors = fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], masks)
    written = load_file(str(out / "adapter_model.safetensors"))
    assert tensors.keys() == written.keys()
    for k in written:
        assert torch.equal(tensors[k], written[k])


def test_fast_project_accepts_in_memory_state_dicts(llama_trio):
    from mscp.core.checkpoint import Checkpoint

    adapter = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    base_ck, aligned_ck = Checkpoint(llama_trio["base"]), Checkpoint(llama_trio["aligned"])
    base = {k: base_ck.get(k) for k in base_ck.keys()}
    aligned = {k: aligned_ck.get(k) for k in aligned_ck.keys()}
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    masks = {key: [0, 5, 17, 40]}
    snapshot = {k: v.clone() for k, v in adapter.items()}
    from_dicts = fast_project(adapter, base, aligned, masks)
    from_paths = fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], masks)
    assert all(torch.equal(from_dicts[k], from_paths[k]) for k in from_paths)
    assert all(torch.equal(adapter[k], snapshot[k]) for k in adapter), "the input dict must not be modified"
    assert not torch.equal(from_dicts[key][masks[key]], adapter[key][masks[key]])


def test_fast_project_rejects_a_mask_key_that_is_not_a_lora_b_of_the_adapter(llama_trio):
    from mscp.errors import MSCPError

    with pytest.raises(MSCPError, match="not a lora_B tensor"):
        fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"],
                     {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": [1]})


def test_main_module_runs_as_a_console_script(llama_trio, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mscp", "patch", "--base", str(llama_trio["base"]),
                           "--aligned", str(llama_trio["aligned"]), "--adapter", str(llama_trio["adapter"]),
                           "--out", str(tmp_path / "o"), "--layers", "1-2", "--quiet", "--no-hash"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "safety layers: 1-2 of 5" in done.stdout


@pytest.mark.parametrize("where, value", [("base", float("nan")), ("aligned", float("inf")), ("aligned", float("-inf"))])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("rows", [[3, 7], []], ids=["rows", "no-rows"])
def test_fast_project_names_the_model_whose_weight_is_not_finite(llama_trio, where, value, backend, rows):
    """The projection reads the weights unchecked; a NaN/Inf still fails, through the non-finite ||V||."""
    from mscp.core.checkpoint import Checkpoint
    from mscp.errors import MSCPError

    weight = "model.layers.2.mlp.up_proj.weight"
    models = {}
    for name in ("base", "aligned"):
        ck = Checkpoint(llama_trio[name])
        models[name] = {k: ck.get(k) for k in ck.keys()}
    models[where][weight].view(-1)[11] = value
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    with pytest.raises(MSCPError, match=rf"^{where} tensor {weight} contains NaN or Inf$"):
        fast_project(llama_trio["adapter"], models["base"], models["aligned"], {key: rows}, backend=backend)


@pytest.mark.parametrize("command", [["organism", "build"], ["demo"], ["demo", "--continual"], ["demo", "--pareto"]])
def test_finetune_names_an_organism_fine_tune(command, capsys):
    from mscp.cli import build_parser
    from mscp.harness.organism import FINETUNES

    parser = build_parser()
    assert parser.parse_args(command).finetune is None  # the default fine-tune, chosen in one place
    args = parser.parse_args([*command, "--finetune", "harmful-32"])
    assert args.finetune in (["harmful-32"], "harmful-32") and "harmful-32" in FINETUNES
    assert main([*command, "--finetune", "bogus"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_command_line_knows_every_fine_tune():
    from mscp.cli.organism import FINETUNE_NAMES
    from mscp.harness.organism import DEFAULT_FINETUNE, FINETUNES

    assert FINETUNE_NAMES == tuple(FINETUNES) and DEFAULT_FINETUNE in FINETUNES

def test_version(capsys):
    from mscp import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mscp {__version__}"


@pytest.mark.parametrize("suffix, text", [(".yaml", "q: 0.45\np: 0.05\nrho: 0.4\n"),
                                          (".json", '{"q": 0.45, "p": 0.05, "rho": 0.4}')])
def test_config_file_values_are_used_and_flags_override_them(llama_trio, tmp_path, suffix, text):
    cfg = tmp_path / f"patch{suffix}"
    cfg.write_text(text)
    out = tmp_path / "out"
    rc = main(["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
               "--adapter", str(llama_trio["adapter"]), "--out", str(out), "--config", str(cfg), "--p", "0.1",
               "--quiet", "--no-hash"])
    assert rc == 0
    recorded = json.loads((out / "mscp_report.json").read_text())["config"]
    assert (recorded["q"], recorded["p"], recorded["rho"]) == (0.45, 0.1, 0.4)  # file, flag, file


@pytest.mark.parametrize("text, message", [("q: 2\n", "q must be a fraction"), ("bogus: 1\n", "unknown field 'bogus'"),
                                           ("- 1\n", "mapping of PatchConfig fields"), ("q: [\n", "not valid YAML")])
def test_a_bad_config_file_is_one_line(llama_trio, tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc = main(["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
               "--adapter", str(llama_trio["adapter"]), "--out", str(tmp_path / "out"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--continual", "--judge", "keyword"], "--judge has no effect with --continual"),
    (["demo", "--pareto", "--q", "0.5"], "--q has no effect with --pareto"),
    (["demo", "--layers", "1-2"], "--layers has no effect with mscp demo"),
    (["demo", "--continual", "--safe-lora-tau", "0.3"], "--safe-lora-tau has no effect with --continual"),
    (["demo", "--q", "-0.5"], "q must be a fraction"),
    (["demo", "--pareto", "--continual"], "not allowed with argument"),
    (["demo", "--methods", "safe_lora"], "--methods has no effect with mscp demo"),
])
def test_demo_refuses_options_its_mode_ignores(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_pareto_refuses_an_unknown_method_before_any_work(capsys, tmp_path):
    out = tmp_path / "pareto"
    assert main(["demo", "--pareto", "--methods", "mscp:attribution,bogus", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown Pareto method 'bogus'; choose from mscp:wanda" in err and err.count("\n") == 1
    assert not out.exists()


def test_the_methods_help_is_the_registry_and_names_what_the_pareto_grid_runs():
    from mscp.cli import build_parser
    from mscp.harness.methods import grid_names, resolve
    from mscp.harness.pareto import GRID

    demo = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices["demo"]
    text = next(a for a in demo._actions if a.dest == "methods").help
    assert sorted(grid_names()) == sorted(GRID)
    for name in grid_names():
        assert name in text
        method, params = resolve(name, {})  # every name the help offers is one the registry builds
        assert name.partition(":")[0] == method.name and params.get("score", "") == name.partition(":")[2]
