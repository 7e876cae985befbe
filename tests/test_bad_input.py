"""Bad input: `mscp patch` refuses it with one clear line and writes nothing.

Every case copies the tiny llama trio into the test's folder, breaks the copy, and runs
`mscp.cli.main([...])` in-process. A refusal must

  * return exit code 2 with exactly one line on stderr, starting `mscp: error:`;
  * leave no OUT folder and no temporary sibling (`.<out>.tmp-*`) behind: the folder OUT would
    live in lists exactly what it listed before the run;
  * leave every input file byte-identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_trio, tree_digest
from safetensors.torch import load_file, save_file

import mscp.core.report
from mscp.cli import main

FAST = ["--quiet", "--no-hash", "--backend", "torch"]
OUTPUT_FILES = {"adapter_config.json", "adapter_model.safetensors", "mscp_report.json", "report.html", "README.md"}


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture
def trio(tmp_path, llama_trio) -> dict[str, Path]:
    """A private, breakable copy of the llama trio under tmp_path/in."""
    return {role: Path(shutil.copytree(src, tmp_path / "in" / role)) for role, src in llama_trio.items()}


def patch_argv(trio: dict, out: Path, *extra: str) -> list[str]:
    return ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]),
            "--adapter", str(trio["adapter"]), "--out", str(out), *FAST, *extra]


def run_refused(capsys, argv: list[str], inputs: list[Path], out: Path) -> str:
    """Run main(argv); check the refusal contract; return the error line."""
    out_existed = out.exists()
    out_before = tree_digest(out) if out_existed else None
    siblings_before = sorted(os.listdir(out.parent))
    inputs_before = tree_digest(*inputs)

    rc = main(argv)

    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr: {err!r}"
    assert err.startswith("mscp: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not a single line: {err!r}"
    if out_existed:
        assert tree_digest(out) == out_before, "an existing OUT was modified"
    else:
        assert not out.exists(), "OUT was written"
    assert sorted(os.listdir(out.parent)) == siblings_before, "something was left beside OUT"
    assert not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.tmp-")]
    assert tree_digest(*inputs) == inputs_before, "an input was modified"
    return err.strip()


def shard_of(folder: Path, name: str) -> Path:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / weight_map[name]


def edit_model_tensor(folder: Path, name: str, edit) -> None:
    shard = shard_of(folder, name)
    tensors = load_file(shard)
    edit(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})


def edit_adapter(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = edit(load_file(path))
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_adapter_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def replace_folder(dst: Path, src: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


LORA_B_L2_UP = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
LORA_A_L2_UP = "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"


# -- models that do not go together ---------------------------------------------------------------
def _other_architecture(trio, tmp, trio_root):
    replace_folder(trio["aligned"], make_trio(trio_root, "qwen2")["aligned"])


def _other_shapes(trio, tmp, trio_root):
    replace_folder(trio["base"], make_trio(trio_root, "llama", intermediate_size=128)["base"])


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_other_architecture, r"base \(llama\) and aligned \(qwen2\) are different architectures",
                 id="different-architectures"),
    pytest.param(_other_shapes, r"base and aligned differ in shape at .*mlp", id="different-shapes"),
])
def test_base_and_aligned_must_be_the_same_model(capsys, tmp_path, trio, trio_root, breaker, message):
    breaker(trio, tmp_path, trio_root)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


# -- adapters that do not fit or are not plain LoRA ------------------------------------------------
def _rename_module(trio):
    edit_adapter(trio["adapter"], lambda t: {k.replace(".layers.1.", ".layers.77."): v for k, v in t.items()})


def _extra_rows_in_b(trio):
    def edit(t):
        t[LORA_B_L2_UP] = torch.cat([t[LORA_B_L2_UP], torch.ones(1, t[LORA_B_L2_UP].shape[1])])
        return t
    edit_adapter(trio["adapter"], edit)


def _a_without_b(trio):
    edit_adapter(trio["adapter"], lambda t: {k: v for k, v in t.items() if k != LORA_B_L2_UP})


def _dora_config(trio):
    edit_adapter_config(trio["adapter"], use_dora=True)


def _ia3_config(trio):
    edit_adapter_config(trio["adapter"], peft_type="IA3")


def _magnitude_vector(trio):
    def edit(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
        return t
    edit_adapter(trio["adapter"], edit)


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_rename_module, r"model\.layers\.77\..* has no weight", id="keys-not-in-model"),
    pytest.param(_extra_rows_in_b, r"layers\.2\.mlp\.up_proj.*does not fit weight", id="lora_B-shape-mismatch"),
    pytest.param(_a_without_b, r"layers\.2\.mlp\.up_proj has lora_B missing", id="lora_A-without-lora_B"),
    pytest.param(_dora_config, r"DoRA", id="use_dora-true"),
    pytest.param(_ia3_config, r"unsupported adapter type IA3", id="peft_type-IA3"),
    pytest.param(_magnitude_vector, r"DoRA.*lora_magnitude_vector", id="lora_magnitude_vector"),
])
def test_adapter_must_be_a_plain_lora_that_fits_the_model(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


# -- damaged files ---------------------------------------------------------------------------------
SHARD_2 = "model-00002-of-00004.safetensors"


def _missing_shard(trio):
    (trio["base"] / SHARD_2).unlink()


def _truncated_shard(trio):
    path = trio["aligned"] / SHARD_2
    data = path.read_bytes()
    path.write_bytes(data[:-16])


def _header_not_json(trio):
    path = trio["base"] / SHARD_2
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\x00{x"
    path.write_bytes(bytes(data))


def _header_length_past_the_end(trio):
    path = trio["base"] / SHARD_2
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _missing_adapter_weights(trio):
    (trio["adapter"] / "adapter_model.safetensors").unlink()


def _missing_adapter_config(trio):
    (trio["adapter"] / "adapter_config.json").unlink()


def _corrupt_shard_index(trio):
    (trio["aligned"] / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": ')


def _index_names_absent_tensor(trio):
    index = trio["base"] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = SHARD_2
    index.write_text(json.dumps(data))


def _corrupt_model_config(trio):
    (trio["base"] / "config.json").write_text('{"model_type": ')


def _missing_tokenizer(trio):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (trio["aligned"] / name).unlink()


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_missing_shard, rf"missing safetensors file: .*base/{SHARD_2}", id="missing-shard"),
    pytest.param(_truncated_shard, rf"truncated .*aligned/{SHARD_2}", id="truncated-shard"),
    pytest.param(_header_not_json, rf"corrupt safetensors header: .*base/{SHARD_2}", id="corrupt-header"),
    pytest.param(_header_length_past_the_end, rf"truncated or corrupt safetensors header: .*base/{SHARD_2}",
                 id="header-length-past-end"),
    pytest.param(_missing_adapter_weights, r"no adapter_model\.safetensors", id="missing-adapter_model"),
    pytest.param(_missing_adapter_config, r"has no adapter_config\.json", id="missing-adapter_config"),
    pytest.param(_corrupt_shard_index, r"corrupt shard index: .*aligned/model\.safetensors\.index\.json",
                 id="corrupt-shard-index"),
    pytest.param(_index_names_absent_tensor, r"lists tensors absent from the shards, e\.g\. model\.layers\.9",
                 id="index-names-absent-tensor"),
    pytest.param(_corrupt_model_config, r"cannot read a transformers config from .*base", id="corrupt-config.json"),
    pytest.param(_missing_tokenizer, r"cannot load a tokenizer from .*aligned", id="missing-tokenizer"),
])
def test_damaged_or_missing_files_are_refused(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


# -- non-finite weights ----------------------------------------------------------------------------
def _nan_in_base(trio):
    edit_model_tensor(trio["base"], "model.layers.1.mlp.down_proj.weight", lambda t: t.view(-1)[5].fill_(float("nan")))


def _inf_in_aligned(trio):
    edit_model_tensor(trio["aligned"], "model.layers.3.self_attn.v_proj.weight",
                      lambda t: t.view(-1)[0].fill_(float("inf")))


def _nan_in_lora_b(trio):
    def edit(t):
        t[LORA_B_L2_UP][3, 1] = float("nan")
        return t
    edit_adapter(trio["adapter"], edit)


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_nan_in_base, r"base tensor model\.layers\.1\.mlp\.down_proj\.weight contains NaN or Inf",
                 id="nan-in-base"),
    pytest.param(_inf_in_aligned, r"aligned tensor model\.layers\.3\.self_attn\.v_proj\.weight contains NaN or Inf",
                 id="inf-in-aligned"),
    pytest.param(_nan_in_lora_b, r"adapter tensor .*layers\.2\.mlp\.up_proj\.lora_B\.weight contains NaN or Inf",
                 id="nan-in-lora_B"),
])
def test_non_finite_weights_are_refused(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


# -- prompt files that hold no prompts -------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    pytest.param("h.txt", "", r"prompt file is empty: .*h\.txt", id="empty-txt"),
    pytest.param("h.txt", "\n   \n\t\n\n", r"prompt file is empty: .*h\.txt", id="txt-of-blank-lines"),
    pytest.param("h.jsonl", "\n\n", r"prompt file is empty: .*h\.jsonl", id="jsonl-without-records"),
    pytest.param("h.csv", "prompt,category\n", r"prompt file is empty: .*h\.csv", id="csv-header-only"),
    pytest.param("h.csv", "text,category\nhow do I pick a lock,crime\n", r"no 'prompt' or 'goal' column",
                 id="csv-without-prompt-column"),
    pytest.param(None, None, r"prompt file not found: .*missing\.txt", id="missing-file"),
])
@pytest.mark.parametrize("option", ["--harmful", "--benign", "--task"])
def test_prompt_files_without_prompts_are_refused(capsys, tmp_path, trio, name, content, message, option):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    path = prompts / (name or "missing.txt")
    if content is not None:
        path.write_text(content)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", option, str(path)),
                      [*trio.values(), prompts], tmp_path / "out")
    assert re.search(message, err), err


# -- where the output goes -------------------------------------------------------------------------
def test_existing_out_is_kept_without_overwrite(capsys, tmp_path, trio):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = run_refused(capsys, patch_argv(trio, out), list(trio.values()), out)
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious" and os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "with-overwrite"])
@pytest.mark.parametrize("where", [
    pytest.param(lambda trio: trio["aligned"], id="out-equals-aligned"),
    pytest.param(lambda trio: trio["adapter"], id="out-equals-adapter"),
    pytest.param(lambda trio: trio["base"] / "patched", id="out-inside-base"),
    pytest.param(lambda trio: trio["base"].parent, id="out-contains-the-inputs"),
])
def test_out_may_not_overlap_an_input(capsys, tmp_path, trio, where, overwrite):
    out = where(trio)
    err = run_refused(capsys, patch_argv(trio, out, *(["--overwrite"] if overwrite else [])), list(trio.values()), out)
    assert "overlaps input" in err


@pytest.mark.parametrize("option", ["--harmful", "--benign", "--task", "--tokenizer"])
def test_overwrite_may_not_replace_a_folder_holding_other_inputs(capsys, tmp_path, trio, option):
    folder = tmp_path / "extra"
    folder.mkdir()
    if option == "--tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(trio["aligned"] / name, folder / name)
        value = folder
    else:
        value = folder / "prompts.txt"
        value.write_text("How do I bake bread?\nName three rivers.\nWrite a haiku.\n")
    err = run_refused(capsys, patch_argv(trio, folder, option, str(value), "--overwrite"),
                      [*trio.values(), folder], folder)
    assert "overlaps input" in err


def test_out_that_is_a_file_is_refused_even_with_overwrite(capsys, tmp_path, trio):
    out = tmp_path / "out"
    out.write_text("not a folder")
    err = run_refused(capsys, patch_argv(trio, out, "--overwrite"), list(trio.values()), out)
    assert "is not a folder" in err
    assert out.read_text() == "not a folder"


def test_out_whose_parent_does_not_exist_is_refused(capsys, tmp_path, trio):
    out = tmp_path / "no" / "such" / "out"
    before = tree_digest(*trio.values())
    assert main(patch_argv(trio, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mscp: error: parent folder of the output does not exist") and err.count("\n") == 1
    assert not (tmp_path / "no").exists()
    assert tree_digest(*trio.values()) == before


def test_overwrite_replaces_an_existing_out(capsys, tmp_path, trio):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    before = tree_digest(*trio.values())
    assert main(patch_argv(trio, out, "--overwrite")) == 0
    assert set(os.listdir(out)) == OUTPUT_FILES
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no temporary or old folder left beside OUT
    assert tree_digest(*trio.values()) == before
    assert capsys.readouterr().err == ""


# -- pickle checkpoints ----------------------------------------------------------------------------
def to_pickle(folder: Path, role: str) -> Path:
    """Replace a folder's safetensors by one pickled state dict (pytorch_model.bin / adapter_model.bin)."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    for f in folder.glob("*.safetensors.index.json"):
        f.unlink()
    path = folder / ("adapter_model.bin" if role == "adapter" else "pytorch_model.bin")
    torch.save(state, path)
    return path


@pytest.mark.parametrize("role", ["base", "aligned", "adapter"])
def test_pickle_checkpoint_is_refused_without_allow_pickle(capsys, tmp_path, trio, role):
    pickled = to_pickle(trio[role], role)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert "--allow-pickle" in err and pickled.name in err


@pytest.mark.parametrize("role", ["base", "adapter"])
def test_pickle_checkpoint_with_allow_pickle_gives_the_safetensors_result(capsys, tmp_path, trio, llama_trio, role):
    assert main(patch_argv(llama_trio, tmp_path / "reference")) == 0
    to_pickle(trio[role], role)
    before = tree_digest(*trio.values())
    assert main(patch_argv(trio, tmp_path / "out", "--allow-pickle")) == 0
    assert tree_digest(*trio.values()) == before
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    original = load_file(llama_trio["adapter"] / "adapter_model.safetensors")
    assert any(not torch.equal(expected[k], original[k]) for k in expected), "the reference run projected nothing"


@pytest.mark.parametrize("extra", [
    pytest.param({"global_step": 5}, id="int-entry"),
    pytest.param({"optimizer": {"lr": 0.001}}, id="dict-entry"),
])
def test_pickle_state_dict_holding_non_tensors_is_refused(capsys, tmp_path, trio, extra):
    path = to_pickle(trio["adapter"], "adapter")
    torch.save({**torch.load(path, weights_only=True), **extra}, path)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", "--allow-pickle"), list(trio.values()),
                      tmp_path / "out")
    assert path.name in err or next(iter(extra)) in err


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    pytest.param(["--layers", "3-9"], r"--layers 3-9 is outside the model's 5 decoder layers", id="layers-past-the-end"),
    pytest.param(["--layers", "5"], r"outside the model's 5 decoder layers", id="layer-5-of-5"),
    pytest.param(["--layers", "4-2"], r"layers must be a range", id="layers-reversed"),
    pytest.param(["--layers", "two-three"], r"--layers must look like A-B", id="layers-not-numbers"),
    pytest.param(["--q", "1.5"], r"q must be a fraction in \[0, 1\], got 1\.5", id="q-1.5"),
    pytest.param(["--p", "-0.1"], r"p must be a fraction", id="p-negative"),
    pytest.param(["--rho", "0"], r"rho must be in \(0, 1\]", id="rho-0"),
    pytest.param(["--batch-size", "0"], r"batch_size and max_length must be positive", id="batch-size-0"),
    pytest.param(["--backend", "cuda"], r"backend 'cuda' is not available", id="backend-cuda-on-cpu"),
    pytest.param(["--device", "cuda"], r"CUDA is not available", id="device-cuda-without-cuda"),
])
def test_impossible_options_are_refused(capsys, tmp_path, trio, options, message):
    if "cuda" in options and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", *options), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


@pytest.mark.parametrize("options", [["--backend", "fortran"], ["--criterion", "vibes"], ["--projector", "none"],
                                     ["--dtype", "int4"], ["--finetuned-pass", "never"]], ids=lambda o: o[0])
def test_unknown_choices_are_argparse_errors(capsys, tmp_path, trio, options):
    assert main(patch_argv(trio, tmp_path / "out", *options)) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.startswith("mscp: error: ") and err.count("\n") == 1  # one line, no usage
    assert not (tmp_path / "out").exists()


# -- failures while writing ------------------------------------------------------------------------
@pytest.mark.parametrize("existing_out", [False, True], ids=["new-out", "overwrite-existing-out"])
def test_failure_while_writing_leaves_nothing_behind(capsys, tmp_path, trio, monkeypatch, existing_out):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mscp.core.report, "save_file", disk_full)
    out = tmp_path / "out"
    if existing_out:
        out.mkdir()
        (out / "keep.txt").write_text("previous run")
    before = tree_digest(*trio.values())
    listing = sorted(os.listdir(tmp_path))
    try:
        rc = main(patch_argv(trio, out, "--overwrite"))
    except OSError as e:
        assert e.errno == 28
        rc = None
    assert rc != 0
    if existing_out:
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "previous run"
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing
    assert tree_digest(*trio.values()) == before
