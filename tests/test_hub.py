"""Adapter hub ids wherever a folder is accepted, resolved through the Hugging Face cache: here a
cache laid out as huggingface_hub lays it out, with HF_HUB_OFFLINE=1 (no network in tests)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mscp import MSCPError, fast_project
from mscp.cli import main

REPO = "acme/ledger-lora"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KEY = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
# the hub machinery, not the score or the kernels: the cheap score and the reference backend. With the
# auto backend, the in-process run after other test files differed from the fresh process in the last
# bits (two fresh processes agree byte for byte; the C++ and torch backends agree to 3e-6, not bitwise),
# so the two processes can hold different backends.
QUICK = ["--quiet", "--no-hash", "--layers", "3-4", "--score", "wanda", "--backend", "torch"]


@pytest.fixture(scope="module")
def hub_cache(llama_trio, tmp_path_factory):
    """HF_HUB_CACHE holding REPO at COMMIT, which the refs `main` and `v1` point to."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--acme--ledger-lora"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(llama_trio["adapter"] / name, snapshot / name)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    return cache


def mscp(cache, *argv):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mscp", *argv], env=env, capture_output=True, text=True, timeout=600)


def patch_argv(trio, adapter, out, *more):
    return ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter", adapter,
            "--out", str(out), *QUICK, *more]


@pytest.fixture(scope="module")
def from_folder(llama_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder") / "out"
    assert main(patch_argv(llama_trio, str(llama_trio["adapter"]), out)) == 0
    return out


@pytest.mark.parametrize("adapter, more", [(REPO, []), (f"{REPO}@{COMMIT}", []), (REPO, ["--revision", "v1"])],
                         ids=["id", "id@commit", "id --revision"])
def test_an_adapter_hub_id_in_the_cache_patches_as_its_folder_does(llama_trio, hub_cache, from_folder, tmp_path,
                                                                   adapter, more):
    done = mscp(hub_cache, *patch_argv(llama_trio, adapter, tmp_path / "out", *more))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").read_bytes() == (from_folder / "adapter_model.safetensors").read_bytes()
    paths = json.loads((out / "mscp_report.json").read_text())["paths"]
    assert paths["adapter"] == str(hub_cache / "models--acme--ledger-lora" / "snapshots" / COMMIT)
    assert paths["adapter_hub_id"] == adapter


@pytest.mark.parametrize("adapter, more, shown", [
    ("acme/other-lora", [], "adapter 'acme/other-lora'"),
    (f"{REPO}@v2", [], f"adapter '{REPO}' at revision 'v2'"),
    (REPO, ["--revision", "v9"], f"adapter '{REPO}' at revision 'v9'"),
], ids=["unknown-id", "unknown-pinned-revision", "unknown-revision"])
def test_an_adapter_missing_from_the_cache_offline_is_one_line(llama_trio, hub_cache, tmp_path, adapter, more, shown):
    done = mscp(hub_cache, *patch_argv(llama_trio, adapter, tmp_path / "out", *more))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"mscp: error: {shown} is not a local path and is not in the Hugging Face cache ({hub_cache}); "
                     "the hub is offline (HF_HUB_OFFLINE is set)"]
    assert not (tmp_path / "out").exists()


def test_a_batch_takes_hub_ids_and_names_their_outputs_after_them(llama_trio, hub_cache, tmp_path):
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"{REPO}\n{llama_trio['adapter']}\n")
    done = mscp(hub_cache, "patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
                "--adapters", str(listing), "--out-dir", str(tmp_path / "outs"), "--revision", "v1", *QUICK)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "outs").iterdir() if p.is_dir()) == ["acme--ledger-lora", "adapter"]
    a, b = ((tmp_path / "outs" / name / "adapter_model.safetensors").read_bytes()
            for name in ("acme--ledger-lora", "adapter"))
    assert a == b


def test_fast_project_takes_an_adapter_hub_id(llama_trio, hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # both are read when huggingface_hub loads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_id = fast_project(REPO, llama_trio["base"], llama_trio["aligned"], {KEY: [1, 2]}, revision="v1")
    by_folder = fast_project(llama_trio["adapter"], llama_trio["base"], llama_trio["aligned"], {KEY: [1, 2]})
    assert all(torch.equal(by_id[k], by_folder[k]) for k in by_folder)
    with pytest.raises(MSCPError, match=r"at revision 'nope' is not a local path .* the hub is offline"):
        fast_project(REPO, llama_trio["base"], llama_trio["aligned"], {KEY: [1]}, revision="nope")
