"""The peft-native API: a PeftModel in, the same repair as the folder path out; fast_project on
peft's own inputs; every misuse one MSCPError line; outputs that share no memory with the inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from mscp import MSCPError, fast_project, patch, patch_peft_model
from mscp.core.prompts import default_prompts

PROMPTS = {"harmful": default_prompts("harmful")[:8], "benign": default_prompts("benign")[:8],
           "task": default_prompts("benign")[8:16]}
OPTS = dict(prompts=PROMPTS, progress=False, hash_inputs=False, batch_size=4, q=0.5, p=0.2)
KEY = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
D_OUT = 96  # the tiny trio's intermediate size: up_proj's output rows


def peft_model(trio) -> PeftModel:
    aligned = AutoModelForCausalLM.from_pretrained(str(trio["aligned"]), dtype=torch.float32)
    return PeftModel.from_pretrained(aligned, str(trio["adapter"]))


def live_lora_b(model: PeftModel, key: str) -> torch.Tensor:
    return model.get_submodule(key.removesuffix(".lora_B.weight")).lora_B["default"].weight.detach()


@pytest.fixture(scope="module")
def from_folders(llama_trio):
    return patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], **OPTS)


@pytest.fixture(scope="module")
def from_model(llama_trio):
    model = peft_model(llama_trio)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before, patch_peft_model(model, llama_trio["base"], **OPTS)


def test_patch_peft_model_selects_the_rows_the_folder_path_selects(from_folders, from_model):
    _, _, result = from_model
    assert result.report["projected_modules"], "the comparison needs projected rows"
    assert result.report["modules"] == from_folders.report["modules"]
    assert result.report["safety_layers"] == from_folders.report["safety_layers"]


def test_patch_peft_model_returns_the_tensors_of_the_folder_path_bit_for_bit(from_folders, from_model):
    _, _, result = from_model
    assert result.tensors.keys() == from_folders.tensors.keys()
    for key, t in from_folders.tensors.items():
        assert torch.equal(result.tensors[key], t), key


def test_patch_peft_model_sets_the_repaired_lora_b_into_the_model_and_nothing_else(from_model):
    model, before, result = from_model
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    expected = {k.replace(".lora_B.weight", ".lora_B.default.weight") for k in result.report["projected_modules"]}
    assert changed == expected
    for key in result.report["projected_modules"]:
        assert torch.equal(live_lora_b(model, key), result.tensors[key])


def test_patch_peft_model_can_leave_the_model_as_it_is(llama_trio, from_folders):
    model = peft_model(llama_trio)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = patch_peft_model(model, llama_trio["base"], inplace=False, **OPTS)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(result.tensors[k], v) for k, v in from_folders.tensors.items())


def test_patch_peft_model_returns_tensors_that_share_no_memory_with_the_model(from_model):
    model, _, result = from_model
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not [k for k, t in result.tensors.items() if t.untyped_storage().data_ptr() in live]


def test_patch_peft_model_reports_its_inputs_as_in_memory(from_model, llama_trio):
    _, _, result = from_model
    paths = result.report["paths"]
    assert paths["base"] == str(llama_trio["base"].absolute())
    assert paths["aligned"].startswith("in memory") and paths["adapter"].startswith("in memory")


@pytest.mark.parametrize("bad, message", [
    ("not a model", r"needs a peft PeftModel, got str"),
    ("unknown-adapter", r"has no adapter 'nope' \(it has: default\)"),
])
def test_patch_peft_model_misuse_is_one_line(llama_trio, bad, message):
    model = peft_model(llama_trio) if bad == "unknown-adapter" else bad
    with pytest.raises(MSCPError, match=message) as info:
        patch_peft_model(model, llama_trio["base"], adapter_name="nope", **OPTS)
    assert "\n" not in str(info.value)


def test_patch_peft_model_refuses_a_merged_adapter(llama_trio):
    model = peft_model(llama_trio)
    model.merge_adapter()
    with pytest.raises(MSCPError, match="merged into its weights"):
        patch_peft_model(model, llama_trio["base"], **OPTS)


# -- fast_project on peft's inputs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(llama_trio):
    """fast_project from the folders: the specification of every in-memory variant."""
    return fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], {KEY: [0, 5, 17, 40]})


def saved_key(key: str) -> str:
    return key.replace(".default.weight", ".weight")


def test_fast_project_takes_a_peft_model_and_its_own_base_weights(llama_trio, reference):
    out = fast_project(peft_model(llama_trio), llama_trio["base"], None, {KEY: [0, 5, 17, 40]})
    assert out.keys() == reference.keys()
    assert all(torch.equal(out[k], reference[k]) for k in reference)


@pytest.mark.parametrize("style", ["saved", "live"])
def test_fast_project_takes_peft_state_dicts_in_either_key_style(llama_trio, reference, style):
    model = peft_model(llama_trio)
    state = get_peft_model_state_dict(model) if style == "saved" else model.state_dict()
    mask_key = KEY if style == "saved" else KEY.replace(".lora_B.weight", ".lora_B.default.weight")
    out = fast_project(state, llama_trio["base"], llama_trio["aligned"], {mask_key: [0, 5, 17, 40]})
    lora_keys = {k for k in state if ".lora_" in k}
    assert set(out) == lora_keys, "only the adapter's tensors come back, under the input's names"
    assert all(torch.equal(out[k], reference[saved_key(k)]) for k in out)


@pytest.mark.parametrize("mask_key", [KEY, KEY.replace(".weight", ".default.weight"), "model.layers.2.mlp.up_proj"],
                         ids=["saved", "live", "module-name"])
def test_a_mask_may_name_its_module_in_any_peft_style(llama_trio, reference, mask_key):
    out = fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], {mask_key: [0, 5, 17, 40]})
    assert all(torch.equal(out[k], reference[k]) for k in reference)


def bool_mask(kind):
    rows = np.zeros(D_OUT, dtype=bool)
    rows[[0, 5, 17, 40]] = True
    return {"list": rows.tolist(), "tensor": torch.from_numpy(rows), "array": rows}[kind]


@pytest.mark.parametrize("rows", [
    pytest.param([40, 0, 17, 5, 5], id="list-with-duplicates"),
    pytest.param({0, 5, 17, 40}, id="set"),
    pytest.param((0, 5, 17, 40), id="tuple"),
    pytest.param(torch.tensor([0, 5, 17, 40]), id="tensor"),
    pytest.param(np.array([0, 5, 17, 40], dtype=np.int32), id="numpy"),
    pytest.param([np.int64(0), np.int64(5), 17, 40], id="numpy-scalars"),
    pytest.param("generator", id="generator"),
    pytest.param("bool-list", id="bool-list"),
    pytest.param("bool-tensor", id="bool-tensor"),
    pytest.param("bool-array", id="bool-array"),
])
def test_any_iterable_of_rows_or_boolean_mask_selects_the_same_rows(llama_trio, reference, rows):
    if isinstance(rows, str) and rows == "generator":
        rows = (r for r in [0, 5, 17, 40])
    elif isinstance(rows, str):
        rows = bool_mask(rows.removeprefix("bool-"))
    out = fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], {KEY: rows})
    assert all(torch.equal(out[k], reference[k]) for k in reference)


MISUSE = [
    pytest.param(dict(masks={KEY: [1.7]}), r"non-integer rows", id="float-row"),
    pytest.param(dict(masks={KEY: "abc"}), r"must be row indices or a boolean mask, got str", id="string-rows"),
    pytest.param(dict(masks={KEY: ["a"]}), r"holds 'a'", id="string-row"),
    pytest.param(dict(masks={KEY: 3}), r"must be row indices or a boolean mask, got int", id="int-not-list"),
    pytest.param(dict(masks={KEY: [True] * 5}), r"boolean mask .* has 5 entries, the module has 96 rows", id="bool-len"),
    pytest.param(dict(masks={KEY: [96]}), r"row index outside 0\.\.95", id="row-out-of-range"),
    pytest.param(dict(masks={KEY: [[1, 2], [3]]}), r"holds \[1, 2\]", id="ragged"),
    pytest.param(dict(masks={"model.layers.2.mlp.nope.lora_B.weight": [1]}), r"not a lora_B tensor", id="unknown-key"),
    pytest.param(dict(masks=[KEY]), r"masks must be a mapping", id="masks-not-a-dict"),
    pytest.param(dict(projector="bogus"), r"projector must be one of safelora, exact, got 'bogus'", id="projector"),
    pytest.param(dict(alpha=float("nan")), r"alpha must be a finite number", id="alpha-nan"),
    pytest.param(dict(alpha=float("inf")), r"alpha must be a finite number", id="alpha-inf"),
    pytest.param(dict(alpha="1"), r"alpha must be a finite number", id="alpha-str"),
    pytest.param(dict(device="bogus"), r"device must be cpu, cuda or cuda:N, got 'bogus'", id="device"),
    pytest.param(dict(backend="fast"), r"backend must be one of", id="backend"),
    pytest.param(dict(adapter=42), r"adapter must be a folder, a hub id, a PeftModel or a state dict, got int",
                 id="adapter-type"),
    pytest.param(dict(adapter="no/such-adapter-here"), r"adapter 'no/such-adapter-here' is not a local path",
                 id="adapter-unknown-hub-id"),
    pytest.param(dict(aligned=None), r"aligned must be a model folder", id="aligned-missing"),
    pytest.param(dict(adapter_name="other"), r"adapter_name 'other' cannot select", id="adapter-name"),
]


@pytest.mark.parametrize("change, message", MISUSE)
def test_every_misuse_of_fast_project_is_one_mscp_error_line(llama_trio, monkeypatch, change, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: no network from this test
    args = dict(adapter=llama_trio["adapter"], base=llama_trio["base"], aligned=llama_trio["aligned"],
                masks={KEY: [1, 2]})
    args.update(change)
    if "adapter_name" in change:
        from safetensors.torch import load_file

        args["adapter"] = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    with pytest.raises(MSCPError, match=message) as info:
        fast_project(args.pop("adapter"), args.pop("base"), args.pop("aligned"), args.pop("masks"), **args)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch built without CUDA")
def test_cuda_on_a_cpu_build_is_one_mscp_error_line(llama_trio):
    with pytest.raises(MSCPError, match=r"^device cuda requested but CUDA is not available"):
        fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], {KEY: [1]}, device="cuda")


def test_a_state_dict_of_several_live_adapters_needs_an_adapter_name(llama_trio, reference):
    model = peft_model(llama_trio)
    state = model.state_dict()
    state.update({k.replace(".default.", ".other."): v for k, v in list(state.items()) if ".lora_" in k})
    del_default = {k: v for k, v in state.items() if ".default." not in k}
    with pytest.raises(MSCPError, match=r"several adapters \(other, second\): pass adapter_name"):
        fast_project({**del_default, **{k.replace(".other.", ".second."): v for k, v in del_default.items()
                                        if ".other." in k}}, llama_trio["base"], llama_trio["aligned"], {KEY: [1]})
    out = fast_project(state, llama_trio["base"], llama_trio["aligned"],
                       {KEY.replace(".weight", ".other.weight"): [0, 5, 17, 40]}, adapter_name="other")
    assert all(".other." in k for k in out)
    assert all(torch.equal(out[k], reference[k.replace(".other.", ".")]) for k in out)


@pytest.mark.parametrize("source", ["state-dict", "peft-model"])
def test_no_output_tensor_shares_memory_with_an_input(llama_trio, source):
    model = peft_model(llama_trio)
    adapter = model if source == "peft-model" else model.state_dict()
    out = fast_project(adapter, llama_trio["base"], None if source == "peft-model" else llama_trio["aligned"],
                       {KEY: [0, 5]})
    inputs = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    assert not [k for k, t in out.items() if t.untyped_storage().data_ptr() in inputs]


# -- the record travels with the weights ----------------------------------------------------------------
def test_a_result_saved_from_the_peft_route_loads_in_peft_with_its_report_and_card(from_model, llama_trio, tmp_path):
    import json

    model, _, result = from_model
    out = result.save(tmp_path / "repaired")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "mscp_report.json", "report.html"]
    assert json.loads((out / "mscp_report.json").read_text())["edit_fraction"] == result.report["edit_fraction"]
    assert "Safety repair with mscp" in (out / "README.md").read_text()
    aligned = AutoModelForCausalLM.from_pretrained(str(llama_trio["aligned"]), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(aligned, str(out))
    for key in result.report["projected_modules"]:
        assert torch.equal(live_lora_b(loaded, key), result.tensors[key])
    with pytest.raises(MSCPError, match="already exists"):
        result.save(out)


def test_a_folder_result_saves_the_input_adapter_config_unchanged(from_folders, llama_trio, tmp_path):
    out = from_folders.save(tmp_path / "again")
    assert (out / "adapter_config.json").read_bytes() == (llama_trio["adapter"] / "adapter_config.json").read_bytes()


def test_repairing_a_repaired_peft_adapter_again_warns(llama_trio, caplog):
    import logging

    model = peft_model(llama_trio)
    patch_peft_model(model, llama_trio["base"], **OPTS)
    with pytest.warns(UserWarning, match="already repaired by mscp"), caplog.at_level(logging.WARNING, logger="mscp"):
        patch_peft_model(model, llama_trio["base"], **OPTS)
    assert any("already repaired" in r.getMessage() for r in caplog.records if r.name == "mscp")


def test_dir_of_the_package_lists_the_lazy_api():
    import mscp

    assert {"patch", "patch_many", "patch_peft_model", "fast_project", "PatchConfig", "MSCPError"} <= set(dir(mscp))


def test_the_api_shows_no_progress_bars_unless_asked_and_routes_warnings_to_logging(llama_trio, capfd, caplog):
    import logging

    from mscp import PatchConfig

    assert PatchConfig().progress is False
    few = {"harmful": PROMPTS["harmful"][:4], "benign": PROMPTS["benign"], "task": PROMPTS["task"]}
    with caplog.at_level(logging.WARNING, logger="mscp"):
        result = patch(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], prompts=few,
                       hash_inputs=False, batch_size=4, q=0.5, p=0.2)
    err = capfd.readouterr().err
    assert "it/s" not in err and "layer/s" not in err and "%|" not in err
    assert result.report["warnings"]
    logged = [r.getMessage() for r in caplog.records if r.name == "mscp"]
    assert all(any(w in m for m in logged) for w in result.report["warnings"])


def test_the_command_line_shows_progress_bars_unless_quiet():
    from mscp.cli import build_parser
    from mscp.cli.options import config_from_args

    argv = ["patch", "--base", "b", "--aligned", "a", "--adapter", "l", "--out", "o"]
    assert config_from_args(build_parser().parse_args(argv)).progress is True
    assert config_from_args(build_parser().parse_args(argv + ["--quiet"])).progress is False


def test_patching_an_adapter_folder_that_mscp_wrote_warns(from_folders, llama_trio, tmp_path):
    out = from_folders.save(tmp_path / "repaired")
    with pytest.warns(UserWarning, match="already repaired by mscp"):
        patch(llama_trio["base"], llama_trio["aligned"], out, **OPTS)
