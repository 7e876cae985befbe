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
from conftest import OUTPUT_FILES, make_trio, tree_digest
from safetensors.torch import load_file, save_file

import mscp.core.report
from mscp.cli import main

FAST = ["--quiet", "--no-hash", "--backend", "torch"]


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
    pytest.param(["--alpha", "nan"], r"alpha must be a finite number, got nan", id="alpha-nan"),
    pytest.param(["--alpha", "inf"], r"alpha must be a finite number, got inf", id="alpha-inf"),
    pytest.param(["--alpha", "1e308"], r"alpha must be in \[-16, 16\]", id="alpha-1e308"),
    pytest.param(["--device", "bogus"], r"device must be cpu, cuda or cuda:N, got 'bogus'", id="device-bogus"),
    pytest.param(["--device", "meta"], r"device must be cpu, cuda or cuda:N, got 'meta'", id="device-meta"),
    pytest.param(["--max-prompts", "0"], r"max_prompts must be positive", id="max-prompts-0"),
    pytest.param(["--tokenizer", ""], r"--tokenizer is empty", id="tokenizer-empty"),
    pytest.param(["--harmful", ""], r"--harmful is empty", id="harmful-empty"),
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
def _os_error(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _safetensors_error(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("disk_full", [_os_error, _safetensors_error], ids=["OSError", "SafetensorError"])
@pytest.mark.parametrize("existing_out", [False, True], ids=["new-out", "overwrite-existing-out"])
def test_failure_while_writing_leaves_nothing_behind(capsys, tmp_path, trio, monkeypatch, existing_out, disk_full):
    """A full disk simulated where the writer meets it (tests/test_interrupts.py fills a real tmpfs)."""
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
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and re.match(r"mscp: error: cannot write .*out: No space left on device", err), err
    if existing_out:
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "previous run"
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == listing
    assert tree_digest(*trio.values()) == before


# == hostile input (issue 13) ======================================================================
# -- prompt files that are not UTF-8 text, or not what their format promises ----------------------
@pytest.mark.parametrize("name, content, message", [
    pytest.param("h.txt", "café crème\n".encode("latin-1"), r"h\.txt is not UTF-8 text \(byte 0xe9", id="latin-1"),
    pytest.param("h.txt", bytes(range(256)) * 4, r"h\.txt is not UTF-8 text", id="binary"),
    pytest.param("h.txt", "two\nlines\n".encode("utf-16"), r"h\.txt is UTF-16 text; save it as UTF-8", id="utf-16"),
    pytest.param("h.txt", "two\nlines\n".encode("utf-16-le"), r"h\.txt holds NUL bytes", id="utf-16-without-bom"),
    pytest.param("h.csv", b'prompt\n"' + b"x" * (200 * 1024) + b'"\n', r"h\.csv:\d+: not CSV .*field larger",
                 id="csv-field-over-128KiB"),
    pytest.param("h.jsonl", b'{"prompt": "fine"}\n{"prompt": null}\n', r"h\.jsonl:2: 'prompt' must be a string, got null",
                 id="jsonl-prompt-null"),
    pytest.param("h.jsonl", b'{"prompt": ["a"]}\n', r"h\.jsonl:1: 'prompt' must be a string, got array",
                 id="jsonl-prompt-list"),
    pytest.param("h.jsonl", b'{"prompt": "a", "prompt": "b"}\n', r"h\.jsonl:1: not a JSON line \(duplicate key",
                 id="jsonl-duplicate-key"),
    pytest.param("h.jsonl", b"[" * 100_000 + b"\n", r"h\.jsonl:1: not a JSON line \(nested too deeply\)",
                 id="jsonl-nested-too-deeply"),
    pytest.param("h.jsonl", b'{"prompt": "fine"}\n{"prompt": "\\ud800abc"}\n',
                 r"h\.jsonl:2: the prompt holds a lone surrogate \(\\ud800 at character 0\)",
                 id="jsonl-lone-surrogate"),
    pytest.param("h.json", b'["fine", "\\udfffx"]', r"h\.json: item \[1\]: the prompt holds a lone surrogate",
                 id="json-lone-surrogate"),
    pytest.param("h.json", b'{"prompt": "one"}', r"h\.json: a JSON object; a \.json prompt file holds one array",
                 id="json-an-object"),
    pytest.param("h.json", b'["fine", 7]', r"h\.json: item \[1\] is a JSON number; items must be prompt strings",
                 id="json-array-of-numbers"),
    pytest.param("h.json", b'{"prompt": "a"}\n{"prompt": "b"}\n', r"h\.json: not JSON \(Extra data .*named \.jsonl",
                 id="json-lines-named-json"),
    pytest.param("h.json", b'[{"messages": [{"role": "system", "content": "be brief"}]}]',
                 r"h\.json: item \[0\]: the chat 'messages' hold no user message", id="chat-without-user-message"),
    pytest.param("h.jsonl", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}\n',
                 r"h\.jsonl:1: the last user message's 'content' must be a string, got array", id="chat-content-parts"),
    pytest.param("h.jsonl", b'{"messages": "hi"}\n', r"h\.jsonl:1: 'messages' must be an array of objects",
                 id="chat-messages-a-string"),
])
@pytest.mark.parametrize("option", ["--harmful", "--benign", "--task"])
def test_prompt_files_that_are_not_text_are_refused(capsys, tmp_path, trio, name, content, message, option):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    path = prompts / name
    path.write_bytes(content)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", option, str(path)),
                      [*trio.values(), prompts], tmp_path / "out")
    assert re.search(message, err), err


# -- adapter_config.json that is not what peft writes ------------------------------------------------
def _write_config(text: bytes):
    return lambda trio: (trio["adapter"] / "adapter_config.json").write_bytes(text)


def _rank_zero(trio):
    def edit(t):
        t[LORA_A_L2_UP] = t[LORA_A_L2_UP][:0].contiguous()
        t[LORA_B_L2_UP] = t[LORA_B_L2_UP][:, :0].contiguous()
        return t
    edit_adapter(trio["adapter"], edit)


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_write_config(b"[1, 2]"), r"corrupt adapter config: .*adapter_config\.json \(a JSON array, not an object\)",
                 id="config-a-list"),
    pytest.param(_write_config(b"16"), r"corrupt adapter config: .* \(a JSON number, not an object\)", id="config-a-number"),
    pytest.param(_write_config(b'{"peft_type": "LORA", "lora_alpha": 8, "note": "\xe9"}'),
                 r"adapter config .*adapter_config\.json is not UTF-8 text", id="config-not-utf8"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], lora_alpha="16"),
                 r"lora_alpha in .* must be a finite number, got string '16'", id="lora_alpha-a-string"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], lora_alpha=None),
                 r"lora_alpha in .* must be a finite number, got null", id="lora_alpha-null"),
    pytest.param(_write_config(b'{"peft_type": "LORA", "lora_alpha": NaN}'), r"corrupt adapter config: .*NaN is not JSON",
                 id="lora_alpha-NaN"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], alpha_pattern={"up_proj(": 8}),
                 r"alpha_pattern in .*: 'up_proj\(' is not a regular expression", id="alpha_pattern-invalid-regex"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], alpha_pattern={"up_proj": "8"}),
                 r"alpha_pattern\['up_proj'\] in .* must be a finite number", id="alpha_pattern-value-a-string"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], peft_type=["LORA"]),
                 r"peft_type in .* must be a string, got array", id="peft_type-a-list"),
    pytest.param(_rank_zero, r"layers\.2\.mlp\.up_proj has rank 0", id="lora-rank-0"),
    # the config must describe the tensors as peft reads them: OUT keeps it, and peft must load OUT
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], r=0),
                 r"r in .*adapter_config\.json must be a positive integer \(a LoRA rank\), got number 0", id="r-0"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], r=-8), r"r in .* must be a positive integer .*-8",
                 id="r-negative"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], r=1e40),
                 r"r in .* must be a positive integer .*1e\+40", id="r-1e40"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], r=8),
                 r"module model\.layers\.0\.mlp\.down_proj has rank 4, but r in .*adapter_config\.json says 8: "
                 r"peft could not load", id="r-contradicts-the-tensors"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], rank_pattern={"up_proj": 8}),
                 r"module model\.layers\.0\.mlp\.up_proj has rank 4, but rank_pattern\['up_proj'\] in .* says 8",
                 id="rank_pattern-contradicts-the-tensors"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], rank_pattern={"up_proj": "4"}),
                 r"rank_pattern\['up_proj'\] in .* must be a positive integer", id="rank_pattern-a-string"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], target_modules=5),
                 r"target_modules in .* must be a list of module names or a regex string, got number 5",
                 id="target_modules-a-number"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], target_modules="(q|v_proj"),
                 r"target_modules in .*: '\(q\|v_proj' is not a regular expression", id="target_modules-invalid-regex"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], target_modules=["q_proj", "v_proj"]),
                 r"module model\.layers\.0\.mlp\.down_proj is not in target_modules of .*: peft would not load",
                 id="target_modules-list-misses-a-module"),
    pytest.param(lambda trio: edit_adapter_config(trio["adapter"], target_modules=r".*\.self_attn\.(q|k|v|o)_proj"),
                 r"module model\.layers\.0\.mlp\.down_proj is not in target_modules", id="target_modules-regex-misses"),
])
def test_adapter_config_of_the_wrong_shape_is_refused(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


# -- shard indexes -----------------------------------------------------------------------------------
def _write_index(role: str, text: bytes):
    return lambda trio: (trio[role] / "model.safetensors.index.json").write_bytes(text)


def _edit_index(role: str, edit):
    def breaker(trio):
        path = trio[role] / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        edit(data["weight_map"])
        path.write_text(json.dumps(data))
    return breaker


@pytest.mark.parametrize("breaker, message", [
    pytest.param(_write_index("base", b'[{"weight_map": {}}]'), r"corrupt shard index: .*base/model\.safetensors\.index"
                 r"\.json \(a JSON array", id="index-a-list"),
    pytest.param(_edit_index("aligned", lambda m: m.update({"model.norm.weight": 3})),
                 r"corrupt shard index: .*aligned/.* maps 'model\.norm\.weight' to a JSON number", id="weight_map-value-a-number"),
    pytest.param(_write_index("base", b'{"weight_map": {"model.norm.weight": "model-00001-of-00004.safetensors\xff"}}'),
                 r"shard index .*base/model\.safetensors\.index\.json is not UTF-8 text", id="index-not-utf8"),
    pytest.param(_edit_index("aligned", lambda m: m.update({k: "../base/" + v for k, v in m.items()})),
                 r"shard index .*aligned/.* names '\.\./base/model-0000\d-of-00004\.safetensors', which is not a file "
                 r"inside the model folder", id="shard-outside-the-folder"),
    pytest.param(_edit_index("base", lambda m: m.update({"model.norm.weight": "/etc/hostname"})),
                 r"names '/etc/hostname', which is not a file inside", id="shard-absolute-path"),
    pytest.param(_edit_index("base", lambda m: m.update({"model.norm.weight": "config.json"})),
                 r"names 'config\.json', which is not a \.safetensors file", id="shard-not-safetensors"),
    pytest.param(_write_index("base", b'{"weight_map": {}, "weight_map": {}}'), r"corrupt shard index: .*duplicate key",
                 id="index-duplicate-key"),
])
def test_shard_index_of_the_wrong_shape_is_refused(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


def test_a_shard_outside_the_folder_is_never_opened(capsys, tmp_path, trio, monkeypatch):
    _edit_index("aligned", lambda m: m.update({k: "../base/" + v for k, v in m.items()}))(trio)
    opened = []
    real_open = mscp.core.checkpoint.SafetensorsFile.__init__

    def spy(self, path):
        opened.append(Path(path))
        real_open(self, path)

    monkeypatch.setattr(mscp.core.checkpoint.SafetensorsFile, "__init__", spy)
    run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert not [p for p in opened if trio["aligned"] in p.parents and p.parent != trio["aligned"]]
    assert not [p for p in opened if ".." in p.parts]


# -- safetensors headers that the format forbids -----------------------------------------------------
def rewrite_header(path: Path, edit=None, *, text: bytes | None = None, data_edit=None) -> None:
    """Rewrite a safetensors file's header (as a dict through `edit`, or as raw JSON `text`)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    if edit is not None:
        edit(header)
    if data_edit is not None:
        data = data_edit(data)
    body = text if text is not None else json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)


def _tensors_of(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _overlapping(header):
    first, second = _tensors_of(header)[:2]
    begin = header[first]["data_offsets"][0]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [begin, begin + size]  # second now reads the first's bytes


def _duplicate_name(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name, other = _tensors_of(header)[:2]
    entry = json.dumps(header[other])  # the name now also stands for another tensor's bytes
    text = json.dumps(header).encode()[:-1] + f', "{name}": {entry}}}'.encode()
    rewrite_header(path, text=text)


def _gap(header):
    last = _tensors_of(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]


def _metadata_not_strings(header):
    header["__metadata__"] = {"format": ["pt"]}


def _shape_of_floats(header):
    name = _tensors_of(header)[0]
    header[name]["shape"] = [float(s) for s in header[name]["shape"]]


def _unknown_dtype(header):
    header[_tensors_of(header)[0]]["dtype"] = "F4_E2M1"


def _zero_sized_giant(header):
    """Zero bytes, but dimensions whose product overflows int64 (torch cannot even make it empty)."""
    at = header[_tensors_of(header)[-1]]["data_offsets"][1]
    header["giant"] = {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [at, at]}


SHARD_BASE = lambda trio: trio["base"] / SHARD_2  # noqa: E731


@pytest.mark.parametrize("breaker, message", [
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _overlapping), r"byte range of '.*' overlaps '.*' in .*base/",
                 id="overlapping-data_offsets"),
    pytest.param(lambda t: _duplicate_name(SHARD_BASE(t)), r"corrupt safetensors header: .*base/.* \(duplicate key",
                 id="duplicate-tensor-names"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _gap, data_edit=lambda d: d + bytes(4)),
                 r"byte range of '.*' leaves a gap before it", id="gap-between-tensors"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), data_edit=lambda d: d + bytes(8)),
                 r"corrupt safetensors file: .*base/.* has 8 bytes after its last tensor", id="bytes-after-the-last-tensor"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _metadata_not_strings),
                 r"__metadata__ of .*base/.* is not an object of strings", id="metadata-not-strings"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _shape_of_floats), r"corrupt safetensors header entry",
                 id="shape-of-floats"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _unknown_dtype), r"unsupported dtype 'F4_E2M1'",
                 id="unknown-dtype"),
    pytest.param(lambda t: SHARD_BASE(t).write_bytes((200 << 20).to_bytes(8, "little") + b"{}" * 64),
                 r"declares a header of 209715200 bytes \(at most 104857600\)", id="header-size-over-the-bound"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), text=b"[" * 50_000), r"corrupt safetensors header: .*nested too deeply",
                 id="header-nested-too-deeply"),
    pytest.param(lambda t: rewrite_header(SHARD_BASE(t), _zero_sized_giant), r"the shape of 'giant' overflows 64-bit sizes",
                 id="zero-sized-shape-over-int64"),
])
def test_safetensors_headers_the_format_forbids_are_refused(capsys, tmp_path, trio, breaker, message):
    breaker(trio)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out"), list(trio.values()), tmp_path / "out")
    assert re.search(message, err), err


@pytest.mark.parametrize("breaker", [_overlapping, "duplicate"], ids=["overlapping", "duplicate-names"])
def test_the_safetensors_library_refuses_the_headers_mscp_refuses(tmp_path, llama_trio, breaker):
    """The strict check is the format's own rule, not a stricter invention: the reference reader agrees."""
    from safetensors import safe_open

    path = tmp_path / "shard.safetensors"
    shutil.copy(llama_trio["base"] / SHARD_2, path)
    if breaker == "duplicate":
        _duplicate_name(path)
    else:
        rewrite_header(path, breaker)
    with pytest.raises(Exception):
        with safe_open(str(path), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


@pytest.mark.parametrize("option", ["--out", "--out-dir"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["", "with-overwrite"])
def test_an_empty_output_path_is_refused(capsys, tmp_path, trio, monkeypatch, option, overwrite):
    """'' would mean the current folder: with --overwrite, the folder the user stands in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("the user's work")
    argv = [a for a in patch_argv(trio, Path("unused")) if a not in ("--out", "unused")]
    argv += [option, "", *(["--overwrite"] if overwrite else [])]
    before = tree_digest(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"mscp: error: {option} is empty: give a path\n"
    assert tree_digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["in", "keep.txt"]


# -- OUT against the inputs, by identity -------------------------------------------------------------
def _mount(*args: str) -> bool:
    """Run `mount ARGS` (root only); False where this machine does not allow it."""
    import subprocess

    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def bind_mount(tmp_path):
    """bind(src) -> a second path to the folder src (a bind mount); unmounted afterwards."""
    mounted = []

    def bind(src: Path) -> Path:
        dst = tmp_path / f"bind-{len(mounted)}"
        dst.mkdir()
        if not _mount("--bind", str(src), str(dst)):
            dst.rmdir()
            pytest.skip("bind mounts need root and a kernel that allows them here")
        mounted.append(dst)
        return dst

    yield bind
    for dst in mounted:
        _umount(dst)


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "with-overwrite"])
@pytest.mark.parametrize("where", [
    pytest.param(lambda trio, bind: bind(trio["adapter"]), id="out-is-the-adapter-through-a-bind-mount"),
    pytest.param(lambda trio, bind: bind(trio["base"]) / "patched", id="out-inside-base-through-a-bind-mount"),
    pytest.param(lambda trio, bind: bind(trio["base"].parent), id="out-holds-the-inputs-through-a-bind-mount"),
])
def test_out_that_is_an_input_under_another_path_is_refused(capsys, tmp_path, trio, bind_mount, where, overwrite):
    (trio["adapter"] / "README.md").write_text("the adapter's card")
    out = where(trio, bind_mount)
    err = run_refused(capsys, patch_argv(trio, out, *(["--overwrite"] if overwrite else [])), list(trio.values()), out)
    assert "overlaps input" in err
    assert (trio["adapter"] / "README.md").read_text() == "the adapter's card"


@pytest.mark.parametrize("where", [
    pytest.param(lambda trio, link: link / "adapter", id="out-is-the-adapter-through-a-linked-folder"),
    pytest.param(lambda trio, link: link / "base" / "x" / ".." / "patched", id="out-inside-base-with-dot-dot"),
])
def test_out_that_is_an_input_through_a_symbolic_link_is_refused(capsys, tmp_path, trio, where):
    link = tmp_path / "link"
    link.symlink_to(trio["base"].parent, target_is_directory=True)
    (trio["base"] / "x").mkdir()
    out = where(trio, link)
    err = run_refused(capsys, patch_argv(trio, out, "--overwrite"), list(trio.values()), out)
    assert "overlaps input" in err


@pytest.mark.parametrize("target", ["nothing", "folder"], ids=["dangling-symlink", "symlink-to-a-folder"])
def test_out_that_is_a_symbolic_link_is_refused(capsys, tmp_path, trio, target):
    out = tmp_path / "out"
    aim = tmp_path / "elsewhere"
    if target == "folder":
        aim.mkdir()
    out.symlink_to(aim, target_is_directory=True)
    err = run_refused(capsys, patch_argv(trio, out, "--overwrite"), list(trio.values()), out)
    assert re.search(r"output path .*out is a symbolic link", err), err
    assert out.is_symlink() and (aim.exists() == (target == "folder"))
    assert not aim.exists() or os.listdir(aim) == []


def test_refused_run_creates_no_out_dir(capsys, tmp_path, trio):
    """--out-dir is made only when an output is written: a refusal leaves no empty folder."""
    edit_adapter_config(trio["adapter"], use_dora=True)
    before = tree_digest(*trio.values())
    for out_dir in (trio["adapter"] / "outs", tmp_path / "newp" / "sub"):
        argv = [a for a in patch_argv(trio, Path("unused")) if a not in ("--out", "unused")] + ["--out-dir", str(out_dir)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mscp: error: ") and err.count("\n") == 1
        assert not out_dir.exists() and not (tmp_path / "newp").exists()
    assert tree_digest(*trio.values()) == before


def test_out_dir_inside_an_input_is_refused_before_it_is_created(capsys, tmp_path, trio):
    out_dir = trio["adapter"] / "outs"
    argv = [a for a in patch_argv(trio, Path("unused")) if a not in ("--out", "unused")] + ["--out-dir", str(out_dir)]
    before = tree_digest(*trio.values())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "overlaps input" in err and err.count("\n") == 1
    assert not out_dir.exists() and tree_digest(*trio.values()) == before


def test_a_cache_with_out_dir_is_refused(capsys, tmp_path, trio):
    out_dir = tmp_path / "outs"
    argv = [a for a in patch_argv(trio, Path("unused")) if a not in ("--out", "unused")]
    err = run_refused(capsys, argv + ["--out-dir", str(out_dir), "--cache", str(tmp_path / "c")], list(trio.values()),
                      out_dir)
    assert "--cache is for one adapter" in err
    assert not (tmp_path / "c").exists()


def test_out_dir_with_missing_parents_is_created_when_written(capsys, tmp_path, trio):
    out_dir = tmp_path / "newp" / "sub"
    argv = [a for a in patch_argv(trio, Path("unused")) if a not in ("--out", "unused")] + ["--out-dir", str(out_dir)]
    assert main(argv) == 0
    assert set(os.listdir(out_dir / "adapter")) == OUTPUT_FILES


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be created in: chmod for a user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if not _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)):
            pytest.skip("root ignores file modes and tmpfs cannot be mounted here")
        yield folder
        _umount(folder)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_out_whose_parent_is_read_only_is_refused_before_any_model_is_read(capsys, tmp_path, trio, read_only_folder,
                                                                             monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("a model was read before OUT was checked")

    monkeypatch.setattr(mscp.core.checkpoint.Checkpoint, "__init__", no_reading)
    out = read_only_folder / "out"
    err = run_refused(capsys, patch_argv(trio, out), list(trio.values()), out)
    assert re.search(r"cannot create the output folder .*ro/out in .*ro: Read-only file system|Permission denied", err), err


def test_out_whose_parent_is_a_file_is_refused(capsys, tmp_path, trio):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    before = tree_digest(*trio.values())
    assert main(patch_argv(trio, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mscp: error: ") and err.count("\n") == 1 and "afile" in err
    assert (tmp_path / "afile").read_text() == "x" and tree_digest(*trio.values()) == before


# -- nothing non-finite is written -----------------------------------------------------------------
def test_a_projection_that_overflows_is_refused_not_written():
    from mscp.core.adapter import Adapter
    from mscp.core.project import project_adapter
    from mscp.errors import MSCPError

    key_a, key_b = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", LORA_B_L2_UP.replace("2", "0", 1)
    adapter = Adapter.from_state_dict({key_a: torch.ones(2, 4, dtype=torch.float16),
                                       key_b: torch.full((4, 2), 100.0, dtype=torch.float16)})
    weight = "model.layers.0.mlp.up_proj.weight"
    base = {weight: torch.zeros(4, 4, dtype=torch.float16)}
    aligned = {weight: torch.full((4, 4), 30000.0, dtype=torch.float16)}  # C B ~ 1e7: past float16's 65504
    with pytest.raises(MSCPError, match=r"the projection of .*up_proj\.lora_B\.weight gives NaN or Inf"):
        project_adapter(adapter, base, aligned, {key_b: [0, 2]}, alpha=1.0, backend="torch")


def test_the_writer_refuses_non_finite_tensors(tmp_path):
    from mscp.core.report import write_adapter_atomically
    from mscp.errors import MSCPError

    with pytest.raises(MSCPError, match="contains NaN or Inf"):
        write_adapter_atomically(tmp_path / "out", {}, {"w": torch.tensor([1.0, float("inf")])}, {}, False)
    assert os.listdir(tmp_path) == []


# -- progress bars and the error line --------------------------------------------------------------
def _fail_in_projection(monkeypatch):
    from mscp.errors import MSCPError

    def boom(*a, **k):
        raise MSCPError("projection failed on purpose")

    monkeypatch.setattr(mscp.core.project, "lowrank_project", boom)


@pytest.mark.parametrize("breaker, message", [
    pytest.param(lambda trio, mp: _inf_in_aligned(trio), r"aligned tensor .* contains NaN or Inf", id="while-streaming"),
    pytest.param(lambda trio, mp: _fail_in_projection(mp), r"projection failed on purpose", id="while-projecting"),
])
def test_an_error_mid_run_stands_alone_on_its_line_after_the_progress_bars(capsys, tmp_path, trio, monkeypatch,
                                                                          breaker, message):
    import mscp.core.project  # noqa: F401

    breaker(trio, monkeypatch)
    argv = [a for a in patch_argv(trio, tmp_path / "out") if a != "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "layers:" in err, "the run had no progress bar to test against"
    assert err.endswith("\n") and err.count("mscp: error:") == 1
    before, line = err[:-1].rsplit("\n", 1)
    assert line.startswith("mscp: error: ") and re.search(message, line) and "\r" not in line, repr(err[-300:])
    assert not (tmp_path / "out").exists()


# -- large prompt files are sampled ------------------------------------------------------------------
def test_a_prompt_set_over_max_prompts_is_sampled_with_a_warning_and_recorded(capsys, tmp_path, trio):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"How do I make thing number {i}?\n" for i in range(500)))
    out = tmp_path / "out"
    assert main(patch_argv(trio, out, "--harmful", str(prompts), "--max-prompts", "30")) == 0
    err = capsys.readouterr().err
    assert err == ("mscp: warning: the harmful prompts number 500; using a sample of 30 (seed 0; --max-prompts "
                   "sets the limit)\n")
    report = json.loads((out / "mscp_report.json").read_text())
    assert report["prompts_sampled"] == {"harmful": {"available": 500, "used": 30, "seed": 0}}
    assert report["prompts"]["harmful"] == 30 and report["config"]["max_prompts"] == 30


def test_the_sample_is_seeded_and_keeps_file_order():
    from mscp.core.prompts import sample_prompts

    prompts = [f"p{i}" for i in range(50_000)]
    with pytest.warns(UserWarning, match="50000; using a sample of 1024"):
        first, info = sample_prompts(prompts, 1024, "task")
    with pytest.warns(UserWarning):
        again, _ = sample_prompts(prompts, 1024, "task")
    assert first == again and len(first) == 1024 and len(set(first)) == 1024
    assert first == sorted(first, key=lambda p: int(p[1:]))
    assert info == {"available": 50_000, "used": 1024, "seed": 0}
    assert sample_prompts(prompts[:1024], 1024, "task") == (prompts[:1024], None)


def test_an_error_naming_a_line_break_stays_on_one_line(capsys, tmp_path, trio):
    """Errors quote user data (paths, tensor names) verbatim; a line break in it is escaped."""
    path = tmp_path / "two\nlines.txt"
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", "--harmful", str(path)), list(trio.values()),
                      tmp_path / "out")
    assert err.endswith("two\\nlines.txt") and "prompt file not found" in err


@pytest.mark.parametrize("task, message", [(None, "tune needs task prompts with answers"),
                                           ("plain.txt", "needs an answer for every task prompt"),
                                           ("half.jsonl", "1 of 2 in")])
def test_tune_refuses_task_prompts_without_answers(capsys, tmp_path, trio, task, message):
    (tmp_path / "plain.txt").write_text("What is 2 + 2?\n")
    (tmp_path / "half.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    argv = ["tune", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter", str(trio["adapter"]),
            "--out", str(tmp_path / "out"), *FAST] + (["--task", str(tmp_path / task)] if task else [])
    assert message in run_refused(capsys, argv, list(trio.values()), tmp_path / "out")


# == issue 23 =======================================================================================
# -- the result cache is written where it may be ------------------------------------------------------
@pytest.mark.parametrize("where, message", [
    pytest.param(lambda trio, out: trio["adapter"] / "cachex",
                 r"cache folder .*adapter/cachex overlaps input .*adapter", id="cache-inside-the-adapter"),
    pytest.param(lambda trio, out: trio["adapter"], r"cache folder .*adapter overlaps input .*adapter",
                 id="cache-equals-the-adapter"),
    pytest.param(lambda trio, out: trio["base"].parent, r"cache folder .*in overlaps input",
                 id="cache-holds-the-inputs"),
    pytest.param(lambda trio, out: out, r"cache folder .*out is the output folder .*out, which is replaced whole",
                 id="cache-equals-out"),
    pytest.param(lambda trio, out: out / "cache", r"cache folder .*out/cache is inside the output folder",
                 id="cache-inside-out"),
])
def test_the_cache_may_not_overlap_an_input_or_out(capsys, tmp_path, trio, where, message):
    out = tmp_path / "out"
    cache = where(trio, out)
    existed = cache.exists()
    err = run_refused(capsys, patch_argv(trio, out, "--cache", str(cache)), list(trio.values()), out)
    assert re.search(message, err), err
    assert cache.exists() == existed


def test_a_cache_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, trio):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", "--cache", str(cache)), list(trio.values()),
                      tmp_path / "out")
    assert re.search(r"cache path .*cache exists and is not a folder", err), err


# -- prompt paths that are not regular files ---------------------------------------------------------
@pytest.fixture
def no_hang():
    """Fail, rather than hang, a run that would block on a FIFO or read a device forever."""
    import signal

    def alarm(*_):
        raise TimeoutError("the run blocked on a prompt path that is not a regular file")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind, message", [
    ("folder", r"prompt file .*prompts/p is a directory$"),
    ("fifo", r"prompt file .*prompts/p is not a regular file \(a FIFO\)$"),
    ("/dev/zero", r"prompt file /dev/zero is not a regular file \(a character device\)$"),
])
@pytest.mark.parametrize("option", ["--harmful", "--benign", "--task"])
def test_prompt_paths_that_are_not_regular_files_are_refused_without_opening_them(capsys, tmp_path, trio, no_hang,
                                                                                    kind, message, option):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    path = prompts / "p"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path(kind)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", option, str(path)), [*trio.values(), prompts],
                      tmp_path / "out")
    assert re.search(message, err), err


# -- a tokenizer that is not the model's ---------------------------------------------------------------
@pytest.fixture
def big_tokenizer(tmp_path, trio) -> Path:
    """The aligned model's tokenizer with 150 tokens added: 550 tokens for 512 embedding rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trio["aligned"]))
    tok.add_tokens([f"<extra{i}>" for i in range(150)])
    assert len(tok) > 512
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    return tmp_path / "tokenizer"


def test_prompts_that_tokenise_past_the_embedding_are_refused(capsys, tmp_path, trio, big_tokenizer):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I <extra149> a lock?\nWrite a haiku.\n")
    argv = patch_argv(trio, tmp_path / "out", "--tokenizer", str(big_tokenizer), "--task", str(prompts))
    err = run_refused(capsys, argv, [*trio.values(), prompts, big_tokenizer], tmp_path / "out")
    assert re.search(r"the tokenizer \(550 tokens\) gives token id 549 \('<extra149>'\) in the task prompts, past the "
                     r"model's 512 embedding rows", err), err


def test_added_tokens_that_no_prompt_uses_are_no_error(capsys, tmp_path, trio, big_tokenizer):
    assert main(patch_argv(trio, tmp_path / "out", "--tokenizer", str(big_tokenizer))) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# -- --config files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, message", [
    pytest.param("c.yaml", "q: 0.1\nalpha: 0.5\nq: 0.2\n", r"c\.yaml is not valid YAML: duplicate key 'q' \(line 3\)",
                 id="yaml-duplicate-key"),
    pytest.param("c.yaml", "extra:\n  note: a\n  note: b\n", r"duplicate key 'note' \(line 3\)",
                 id="yaml-nested-duplicate"),
    pytest.param("c.json", '{"q": 0.1, "q": 0.2}', r"c\.json is not valid JSON \(duplicate key 'q'\)",
                 id="json-duplicate-key"),
    pytest.param("c.yaml", "alpha: '5e-1'\n", r"alpha must be a finite number, got '5e-1'", id="yaml-quoted-number"),
    pytest.param("c.yaml", "alpha: 0.5\n".encode("utf-16"), r"config file .*c\.yaml is UTF-16 text", id="yaml-utf-16"),
])
def test_config_files_that_say_two_things_are_refused(capsys, tmp_path, trio, name, text, message):
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", "--config", str(config)), [*trio.values(), config],
                      tmp_path / "out")
    assert re.search(message, err), err


def test_config_file_numbers_are_read_as_yaml_1_2_reads_them(capsys, tmp_path, trio):
    """PyYAML (YAML 1.1) reads 5e-1 and 1e-2 as strings; YAML 1.2, and every reader, as numbers."""
    config = tmp_path / "c.yaml"
    config.write_text("alpha: 5e-1\nq: 1e-2\nrho: .5\n")
    assert main(patch_argv(trio, tmp_path / "out", "--config", str(config))) == 0
    recorded = json.loads((tmp_path / "out" / "mscp_report.json").read_text())["config"]
    assert (recorded["alpha"], recorded["q"], recorded["rho"]) == (0.5, 0.01, 0.5)


# -- found fuzzing --config files (benchmarks/fuzz_parsers.py; docs/results/robustness.md 2026-12-06) --
@pytest.mark.parametrize("name, text, message", [
    pytest.param("c.yaml", "1: 2\nb: 3\n", r"c\.yaml: unknown field 'b'", id="yaml-number-and-string-keys"),
    pytest.param("c.json", '{"max_prompts": ' + "9" * 4400 + "}",
                 r"c\.json is not valid JSON \(an integer of more than 4300 digits\)$", id="json-integer-past-the-limit"),
    pytest.param("c.yaml", "extra: {when: 2001-12-14}\n",
                 r"extra must hold JSON data \(the report writes it\): it holds a date \(datetime\.date\(2001, 12, 14\)\)$",
                 id="yaml-date-in-extra"),
    pytest.param("c.yaml", "extra: {blob: !!binary aGVsbG8=}\n", r"extra must hold JSON data .*: it holds a bytes",
                 id="yaml-binary-in-extra"),
    pytest.param("c.yaml", "extra: {x: .nan}\n", r"extra must hold JSON data .*: it holds nan, which is not JSON$",
                 id="yaml-nan-in-extra"),
    pytest.param("c.yaml", "extra: {1: a}\n", r"extra must hold JSON data .*: it has a key that is not a string \(1\)$",
                 id="yaml-number-key-in-extra"),
    pytest.param("c.yaml", "extra: {n: 0x" + "f" * 4000 + "}\n", r"extra .*: it holds an integer too long to write$",
                 id="yaml-hex-integer-past-the-limit"),
    pytest.param("c.yaml", "extra:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                 "  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n  d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
                 r"extra .*: it holds more than 10000 values$", id="yaml-aliases-that-multiply"),
])
def test_config_files_found_while_fuzzing_are_one_line(capsys, tmp_path, trio, name, text, message):
    """Found writing the fuzz targets' seeds (the fuzzer then crashed on them): each raised a
    TypeError or ValueError (sorting mixed keys, reading a long integer) or was accepted, to fail or
    grow when the report writes the config as JSON."""
    config = tmp_path / name
    config.write_text(text)
    err = run_refused(capsys, patch_argv(trio, tmp_path / "out", "--config", str(config)), [*trio.values(), config],
                      tmp_path / "out")
    assert re.search(message, err), err


def test_patch_config_extra_must_be_json_data_in_the_api_too():
    from mscp.core.config import PatchConfig
    from mscp.errors import MSCPError

    cyclic: dict = {}
    cyclic["self"] = cyclic
    for extra in ({"a": {1, 2}}, {"a": float("inf")}, {("t",): 1}, cyclic):
        with pytest.raises(MSCPError, match=r"^extra must hold JSON data"):
            PatchConfig(extra=extra)
    assert PatchConfig(extra={"note": "x", "n": [1, 2.5, None, True, ("tuple",)]}).extra["note"] == "x"
