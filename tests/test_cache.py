"""The result cache of `patch(cache=DIR)`: a hit gives the patch it would have computed, and any
change to what an entry depends on is a miss. The store it is built on: tests/test_store.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_trio
from safetensors.torch import load_file, save_file

from mscp import patch
from mscp.core.prompts import default_prompts

PROMPTS = {"harmful": default_prompts("harmful")[:8], "benign": default_prompts("benign")[:8],
           "task": default_prompts("benign")[8:14]}
SCORES = [dict(score="attribution", q=0.1, p=0.0, rho=1.0), dict(score="attribution", q=0.1, p=0.05, rho=0.4),
          dict(score="wanda", q=0.3, p=0.3, rho=0.4)]


def run(trio, cache=None, prompts=PROMPTS, aligned=None, **settings):
    return patch(trio["base"], aligned or trio["aligned"], trio["adapter"], prompts=prompts, cache=cache,
                 progress=False, hash_inputs=False, **{"batch_size": 4, "target_tokens": 4, **settings})


@pytest.fixture(scope="module")
def trio(trio_root):
    return make_trio(trio_root, "llama")


@pytest.mark.parametrize("settings", SCORES, ids=lambda s: f"{s['score']}-p{s['p']}")
def test_a_hit_gives_the_patch_computed_without_the_cache(trio, tmp_path, settings):
    plain = run(trio, **settings)
    first = run(trio, tmp_path / "cache", **settings)
    second = run(trio, tmp_path / "cache", **settings)
    kinds = ["curves"] + (["targets_harmful"] if settings["score"] == "attribution" else [])
    assert {k: first.report["cache"][k] for k in kinds} == dict.fromkeys(kinds, "stored")
    assert {k: second.report["cache"][k] for k in kinds} == dict.fromkeys(kinds, "hit")
    for result in (first, second):
        assert result.report["layer_curves"] == plain.report["layer_curves"]
        assert result.report["safety_layers"] == plain.report["safety_layers"]
        assert result.tensors.keys() == plain.tensors.keys()
        for key, tensor in plain.tensors.items():
            assert torch.equal(result.tensors[key], tensor), key


def test_a_hit_runs_neither_model_through_the_layers_for_the_attribution_score(trio, tmp_path):
    run(trio, tmp_path / "cache", **SCORES[0])
    second = run(trio, tmp_path / "cache", **SCORES[0])
    assert "stream" not in second.report["timings_s"]  # the curves' pass over base and aligned
    assert second.report["timings_s"]["targets_harmful"] < 1.0


@pytest.mark.parametrize("change", ["harmful prompts", "benign prompts", "batch size", "target tokens"])
def test_a_changed_setting_is_a_miss(trio, tmp_path, change):
    run(trio, tmp_path / "cache", **SCORES[0])
    prompts = dict(PROMPTS)
    if change == "harmful prompts":
        prompts["harmful"] = PROMPTS["harmful"][:-1]
    elif change == "benign prompts":
        prompts["benign"] = PROMPTS["benign"][1:]
    setting = {"batch size": {"batch_size": 3}, "target tokens": {"target_tokens": 3}}.get(change, {})
    result = run(trio, tmp_path / "cache", prompts, **SCORES[0], **setting)
    assert result.report["cache"]["curves"] == ("stored" if change != "target tokens" else "hit")
    assert result.report["cache"]["targets_harmful"] == ("stored" if change != "benign prompts" else "hit")


def test_changed_aligned_weights_are_a_miss(trio, tmp_path):
    run(trio, tmp_path / "cache", **SCORES[0])
    aligned = tmp_path / "aligned"
    shutil.copytree(trio["aligned"], aligned)
    shard = sorted(aligned.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    result = run(trio, tmp_path / "cache", aligned=aligned, **SCORES[0])
    assert result.report["cache"]["curves"] == "stored"
    assert result.report["cache"]["targets_harmful"] == "stored"


def test_a_damaged_entry_is_a_miss_and_is_replaced(trio, tmp_path):
    first = run(trio, tmp_path / "cache", **SCORES[0])
    for entry in (tmp_path / "cache").glob("curves-*.json"):
        entry.write_text("{not json")
    second = run(trio, tmp_path / "cache", **SCORES[0])
    assert second.report["cache"]["curves"] == "stored"
    assert second.report["layer_curves"] == first.report["layer_curves"]
    entry, = (tmp_path / "cache").glob("curves-*.json")
    assert json.loads(entry.read_text()) == first.report["layer_curves"]


@pytest.mark.parametrize("damage", [[[1, 2], [3]], {"answers": [[1, 2]], "logliks": [[-0.5]]}],
                         ids=["stop-23 form", "lengths disagree"])
def test_a_refusals_entry_of_the_wrong_shape_is_a_miss_and_is_replaced(trio, tmp_path, damage):
    first = run(trio, tmp_path / "cache", **SCORES[0])
    entry, = (tmp_path / "cache").glob("targets_harmful-*.json")
    kept = json.loads(entry.read_text())
    entry.write_text(json.dumps(damage))
    second = run(trio, tmp_path / "cache", **SCORES[0])
    assert second.report["cache"]["targets_harmful"] == "stored"
    assert json.loads(entry.read_text()) == kept
    assert second.report["modules"] == first.report["modules"]


def test_entries_are_store_entries_named_by_kind_version_and_digest(trio, tmp_path):
    import re

    from mscp.core.cache import VERSIONS

    run(trio, tmp_path / "cache", **SCORES[0])
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [re.sub(r"[0-9a-f]{64}", "<digest>", n) for n in names] == [
        f"curves-v{VERSIONS['curves']}-<digest>.json", f"targets_harmful-v{VERSIONS['targets_harmful']}-<digest>.json"]


def test_the_command_takes_a_cache_folder(trio, tmp_path, capsys):
    from mscp.cli import main

    args = ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter", str(trio["adapter"]),
            "--cache", str(tmp_path / "cache"), "--quiet", "--no-hash", "--q", "0.1", "--target-tokens", "4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "mscp_report.json").read_text())
    assert report["cache"]["curves"] == "hit" and report["cache"]["folder"] == str((tmp_path / "cache").resolve())


def test_a_file_rewritten_gets_its_new_digest(tmp_path):
    import hashlib
    import os

    from mscp.core.checkpoint import sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    assert sha256_file(f) == hashlib.sha256(b"a" * 100).hexdigest()
    f.write_bytes(b"b" * 100)  # same size: the modification time tells it apart
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 100).hexdigest()
