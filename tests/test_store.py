"""The one store (mscp/core/store.py) and the one single-file writer (core/atomic.py): entries are
named `<kind>-v<version>-<digest>`, read whole or not at all, and a damaged one is a miss; every
cache of mscp keeps its entries there."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mscp.core.atomic import write_file_atomically
from mscp.core.store import Store, digest
from mscp.errors import MSCPError

MSCP = Path(__file__).resolve().parent.parent / "mscp"
ENTRY = r"-v{version}-[0-9a-f]{{64}}"


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_value_round_trips_under_its_kind_version_and_digest(tmp_path):
    store = Store(tmp_path / "store")
    value = {"curves": [[0.5, 1e-30], [2.0, -1.25]], "text": "héllo \ud800", "n": 3}
    store.put("curves", {"a": 1, "b": [1, 2]}, 2, value)
    assert Store(tmp_path / "store").get("curves", {"b": [1, 2], "a": 1}, 2) == value  # key order is not content
    name, = entries(tmp_path / "store")
    assert name == f"curves-v2-{digest({'a': 1, 'b': [1, 2]})}.json"
    assert store.used == {"curves": "stored"}


def test_a_different_version_kind_or_parts_is_a_miss(tmp_path):
    store = Store(tmp_path)
    store.put("answers", ["model", 4], 1, ["yes"])
    assert store.get("answers", ["model", 4], 2) is None
    assert store.get("answers", ["model", 5], 1) is None
    assert store.get("targets", ["model", 4], 1) is None
    assert store.get("answers", ["model", 4], 1) == ["yes"]


def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path):
    store = Store(tmp_path)
    store.put("curves", [1], 1, [1.0, 2.0])
    entry, = tmp_path.iterdir()
    entry.write_text('[1.0, 2')  # cut short
    fresh = Store(tmp_path)
    assert fresh.get("curves", [1], 1) is None and fresh.used == {}
    fresh.put("curves", [1], 1, [1.0, 2.0])
    assert fresh.get("curves", [1], 1) == [1.0, 2.0] and entries(tmp_path) == [entry.name]


def test_one_digest_of_canonical_json_full_length_paths_as_text():
    assert re.fullmatch(r"[0-9a-f]{64}", digest([1, "a"]))
    assert digest({"x": Path("/m/model"), "y": (1, 2)}) == digest({"y": [1, 2], "x": "/m/model"})
    assert digest([1, 2]) != digest([2, 1])
    with pytest.raises(TypeError, match="set"):
        digest({1, 2})  # no stable text: a key of it would be a random miss


@pytest.mark.parametrize("kind, version", [("Curves", 1), ("a-b", 1), ("", 1), ("curves", -1), ("curves", "1")])
def test_kinds_and_versions_keep_names_unambiguous(tmp_path, kind, version):
    with pytest.raises(ValueError):
        Store(tmp_path).get(kind, [], version)


def test_none_cannot_be_stored(tmp_path):
    with pytest.raises(ValueError):
        Store(tmp_path).put("answers", [], 1, None)


# -- folder entries ---------------------------------------------------------------------------------------
def _write(folder: Path, text: str = "whole") -> None:
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text(text)


def _read(folder: Path) -> str:
    a, b = (folder / "a.txt").read_text(), (folder / "b.txt").read_text()
    if a != b:
        raise ValueError("damaged")
    return a


def test_a_folder_entry_is_built_once_then_read(tmp_path):
    calls = []
    store = Store(tmp_path / "store")
    assert store.folder("scores_x", [1], 1, lambda f: (calls.append(f), _write(f)), _read) == "whole"
    assert store.used == {"scores_x": "stored"}
    again = Store(tmp_path / "store")
    assert again.folder("scores_x", [1], 1, lambda f: calls.append(f), _read) == "whole"
    assert len(calls) == 1 and again.used == {"scores_x": "hit"}
    assert entries(tmp_path / "store") == [f"scores_x-v1-{digest([1])}"]


def test_a_failure_inside_fill_leaves_nothing(tmp_path):
    def fill(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("killed halfway")

    store = Store(tmp_path / "store")
    with pytest.raises(RuntimeError):
        store.folder("scores_x", [1], 1, fill, _read)
    assert list(tmp_path.rglob("*")) == [] and store.used == {}  # the store folder it made is gone too
    assert store.folder("scores_x", [1], 1, _write, _read) == "whole"


def test_a_damaged_folder_entry_is_built_again(tmp_path):
    store = Store(tmp_path)
    store.folder("scores_x", [1], 1, _write, _read)
    (tmp_path / f"scores_x-v1-{digest([1])}" / "b.txt").write_text("torn")
    assert store.folder("scores_x", [1], 1, lambda f: _write(f, "rebuilt"), _read) == "rebuilt"
    assert store.used == {"scores_x": "stored"} and entries(tmp_path) == [f"scores_x-v1-{digest([1])}"]


# -- the single-file writer -------------------------------------------------------------------------------
def test_the_file_writer_makes_parents_and_replaces_whole(tmp_path):
    path = tmp_path / "a" / "b" / "f.json"
    write_file_atomically(path, "old")
    write_file_atomically(path, b"new")
    assert path.read_text() == "new" and entries(path.parent) == ["f.json"]


def test_a_failed_file_write_leaves_no_temporary_file_and_the_old_contents(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_file_atomically(path, "old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(MSCPError, match="No space left"):
        write_file_atomically(path, "new")
    monkeypatch.undo()
    with pytest.raises(TypeError):
        write_file_atomically(path, 123)  # not bytes: fails inside the write
    assert entries(tmp_path) == ["f.json"] and path.read_text() == "old"


def test_a_temporary_file_left_by_a_killed_writer_is_removed(tmp_path):
    path = tmp_path / "f.json"
    code = ("import os, sys; from pathlib import Path; from mscp.core.atomic import sibling; "
            "sibling(Path(sys.argv[1]), 'tmp').write_text('torn'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=MSCP.parent, check=False)
    assert len(entries(tmp_path)) == 1  # the dead writer's temporary file
    write_file_atomically(path, "new")
    assert entries(tmp_path) == ["f.json"]


# -- every cache keeps its entries in the store -----------------------------------------------------------
def _model_folder(folder: Path, fill: float = 0.0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.full((2, 2), fill)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


class CountingGenerator:
    calls = 0

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, prompts, **kwargs):
        CountingGenerator.calls += 1
        return [f"answer to {p}" for p in prompts]


@pytest.fixture
def counting_generator(monkeypatch):
    from mscp.harness import generate

    CountingGenerator.calls = 0
    monkeypatch.setattr(generate, "Generator", CountingGenerator)
    return CountingGenerator


def test_the_answer_cache_writes_through_the_store(tmp_path, counting_generator):
    from mscp.harness.evaluate import GENERATION_VERSION, generate_cached

    model, adapter = _model_folder(tmp_path / "model"), _model_folder(tmp_path / "adapter", 1.0)
    kw = dict(max_new_tokens=4, batch_size=2, dtype="float32", progress=False, cache=tmp_path / "answers")
    first = generate_cached(model, adapter, ["p", "q"], **kw)
    assert generate_cached(model, adapter, ["p", "q"], **kw) == first and counting_generator.calls == 1
    name, = entries(tmp_path / "answers")
    assert re.fullmatch("answers" + ENTRY.format(version=GENERATION_VERSION) + r"\.json", name)


def test_the_organism_base_answers_write_through_the_store(tmp_path, counting_generator):
    from mscp.harness.organism import BASE_ANSWERS_VERSION, _base_answers

    org = SimpleNamespace(root=tmp_path / "org", base=_model_folder(tmp_path / "org" / "base"),
                          config=SimpleNamespace(answer_tokens=4, gen_batch=2))
    first = _base_answers(org, ["p"], None, progress=False)
    assert _base_answers(org, ["p"], None, progress=False) == first and counting_generator.calls == 1
    name, = entries(tmp_path / "org" / "answers")
    assert re.fullmatch("base_answers" + ENTRY.format(version=BASE_ANSWERS_VERSION) + r"\.json", name)


def test_the_scoring_passes_are_folder_entries_of_the_store(tmp_path, monkeypatch):
    from mscp.core.config import PatchConfig
    from mscp.harness import methods

    calls = []

    def fake_patch(org, adapter, config, out, *, keep_benign=False):
        calls.append(config.score)
        scores = {"model.layers.0.mlp.down_proj.lora_B.weight": {"harmful": torch.arange(4.0)}}
        report = {"report_version": 1, "status": "ok", "timings_s": {}, "prompts": {"task": ["t"]}}
        return SimpleNamespace(report=report, scores=scores)

    monkeypatch.setattr(methods, "patch_on_localisation", fake_patch)
    org = SimpleNamespace(base=_model_folder(tmp_path / "base"), aligned=_model_folder(tmp_path / "aligned", 1.0),
                          splits=tmp_path / "splits")
    org.splits.mkdir()
    (org.splits / "task_localize.txt").write_text("t\n")
    bench = methods.Bench.__new__(methods.Bench)
    bench.org, bench.adapter, bench.folder = org, _model_folder(tmp_path / "adapter", 2.0), tmp_path / "bench"
    config = PatchConfig(score="wanda", progress=False)
    first = bench._pass(config, keep_benign=False)
    again = bench._pass(config, keep_benign=False)
    assert calls == ["wanda"] and torch.equal(again.scores["model.layers.0.mlp.down_proj.lora_B.weight"]["harmful"],
                                              first.scores["model.layers.0.mlp.down_proj.lora_B.weight"]["harmful"])
    name, = entries(tmp_path / "bench" / "scores")
    assert re.fullmatch("wanda" + ENTRY.format(version=methods.SCORES_VERSION), name)
    assert entries(tmp_path / "bench" / "scores" / name) == ["report.json", "scores.safetensors"]
    (tmp_path / "bench" / "scores" / name / "scores.safetensors").write_bytes(b"torn")
    bench._pass(config, keep_benign=False)
    assert calls == ["wanda", "wanda"]  # a damaged pass is scored again


def test_the_judge_weights_write_through_the_store(tmp_path):
    from mscp.harness.judges import JUDGE_VERSION, EmbeddingJudge

    def embed(texts):
        return torch.tensor([[len(t) / 100, t.count(" ") / 20, float("sorry" in t.lower())] for t in texts])

    first = EmbeddingJudge(cache=tmp_path, embedder=embed)
    name, = entries(tmp_path)
    assert re.fullmatch("embedding_lr" + ENTRY.format(version=JUDGE_VERSION) + r"\.json", name)

    def no_training(texts):
        raise AssertionError("trained again although the weights were stored")

    again = EmbeddingJudge(cache=tmp_path, embedder=no_training)
    assert torch.equal(again.w, first.w) and torch.equal(again.b, first.b)  # float64 bit for bit


# -- one content address ----------------------------------------------------------------------------------
# The organism's recipe hashes name its build folders (organism/<hash>, finetunes); moving them to
# `digest` renames every built organism, so it is left to the organism's own change.
NOT_CACHE_KEYS = {("harness/organism.py", "_digest"), ("harness/organism.py", "digest")}


def _cut_sha256_keys(tree: ast.AST):
    """(function, line) of each `hashlib.sha256(...).hexdigest()[:N]`."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr == "hexdigest" and "sha256" in ast.unparse(node.value.func.value)):
            owner = node
            while owner in parents and not isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                owner = parents[owner]
            yield getattr(owner, "name", "<module>"), node.lineno


def test_no_module_but_the_store_cuts_its_own_sha256_key():
    found = {(path.relative_to(MSCP).as_posix(), function): line
             for path in sorted(MSCP.rglob("*.py")) if path.name != "store.py"
             for function, line in _cut_sha256_keys(ast.parse(path.read_text()))}
    assert [f"{path}:{line} ({function})" for (path, function), line in found.items()
            if (path, function) not in NOT_CACHE_KEYS] == [], "content addressing goes through mscp.core.store.digest"
    assert NOT_CACHE_KEYS <= set(found), "an exemption outlived its reason: remove it"


def test_the_scan_finds_a_cut_key():
    code = "import hashlib\ndef key(x):\n    return hashlib.sha256(x).hexdigest()[:12]\n"
    assert list(_cut_sha256_keys(ast.parse(code))) == [("key", 3)]
    assert list(_cut_sha256_keys(ast.parse("hashlib.sha256(x).hexdigest()"))) == []  # a whole digest is fine
