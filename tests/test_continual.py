"""Continual projection over safety dimensions (mscp/continual.py) on tiny real trios.

The three properties of docs/method.md's continual rule: the adapter after any set of dimensions is one
projection of B0 with the union mask, in any order; a repeated dimension edits nothing; rows
projected once are never written again. Plus the state's atomicity, reuse and analytics.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil

import pytest
import torch
from conftest import make_trio, tree_digest
from safetensors.torch import load_file

from mscp import continual, fast_project, patch
from mscp.cli import main
from mscp.continual.figures import cluster_order
from mscp.continual.record import STATE_VERSION, Module, State
from mscp.core.prompts import default_prompts
from mscp.core.streaming import ModelShell
from mscp.errors import MSCPError

LAYERS = (1, 2)  # of the 5 tiny decoder layers: an add must never load layers 3 and 4
HARMFUL = default_prompts("harmful")
BENIGN = default_prompts("benign")
DIMS = {"violence": HARMFUL[:8], "cyber": HARMFUL[8:16], "mixed": HARMFUL[16:20] + BENIGN[:6]}
# The Wanda score streams each layer once; every score is run by the parametrised test below.
FAST = dict(progress=False, hash_inputs=False, batch_size=8, q=0.4, p=0.2, score="wanda")


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dims")
    for name, prompts in DIMS.items():
        (d / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    (d / "task.txt").write_text("\n".join(BENIGN[12:]) + "\n")
    (d / "empty.txt").write_text("\n \n")
    return d


def _init(trio, out, prompt_dir, **kw):
    return continual.init(trio["base"], trio["aligned"], trio["adapter"], out, task=prompt_dir / "task.txt",
                          layers=LAYERS, **{**FAST, "figures": False, **kw})


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_state(request, trio_root, prompt_dir, tmp_path_factory):
    """A freshly initialised state per family (copy it before adding dimensions)."""
    trio = make_trio(trio_root, request.param)
    state = tmp_path_factory.mktemp(f"state-{request.param}") / "STATE"
    _init(trio, state, prompt_dir)
    return trio, state


@pytest.fixture(scope="module")
def llama_state(trio_root, prompt_dir, tmp_path_factory):
    trio = make_trio(trio_root, "llama")
    state = tmp_path_factory.mktemp("state-llama-cli") / "STATE"
    before = tree_digest(*trio.values(), prompt_dir)
    _init(trio, state, prompt_dir)
    *first, last = DIMS
    for name in first:
        _add(state, name, prompt_dir)
    assert main(["continual", "add", str(state), "--name", last, "--harmful", str(prompt_dir / f"{last}.txt"),
                 "--quiet"]) == 0  # the CLI, with figures
    return trio, state, before


def _copy(state, dst):
    shutil.copytree(state, dst)
    return dst


def _add(state, name, prompt_dir, **kw):
    return continual.add(state, name, harmful=[prompt_dir / f"{name}.txt"], progress=False, figures=False, **kw)


def _adapter(state):
    return load_file(str(state / "adapter" / "adapter_model.safetensors"))


def _union(state):
    return {k: v for k, v in continual.load_state(state).union.items() if v}


# -- property 1: union, any order ------------------------------------------------------------------
ORDERS = {"llama": list(itertools.permutations(DIMS)),  # all six
          "qwen2": [("violence", "cyber", "mixed"), ("mixed", "cyber", "violence"), ("cyber", "mixed", "violence")]}


def test_any_order_of_three_dimensions_gives_the_same_adapter_as_one_union_projection(family_state, prompt_dir, tmp_path):
    trio, state = family_state
    b0 = load_file(str(trio["adapter"] / "adapter_model.safetensors"))
    family = "llama" if "llama" in str(trio["adapter"]) else "qwen2"
    prefixes: dict[tuple, object] = {(): state}  # orders sharing a prefix share its adds
    for order in ORDERS[family]:
        for n in range(1, len(order) + 1):
            if order[:n] not in prefixes:
                s = _copy(prefixes[order[:n - 1]], tmp_path / "-".join(order[:n]))
                _add(s, order[n - 1], prompt_dir)
                prefixes[order[:n]] = s
    finals = [prefixes[tuple(o)] for o in ORDERS[family]]
    results, unions = [_adapter(s) for s in finals], [_union(s) for s in finals]
    assert all(u == unions[0] for u in unions)
    assert sum(len(r) for r in unions[0].values()) > 0
    news = {tuple(d.new_rows for d in continual.load_state(s).dimensions) for s in finals}
    assert len(news) > 1  # the orders really differ in which step projects which rows
    for other in results[1:]:  # bit for bit across orders
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)
    reference = fast_project(trio["adapter"], trio["base"], trio["aligned"], unions[0])
    edited = 0
    for key, t in results[0].items():
        torch.testing.assert_close(t, reference[key], rtol=1e-6, atol=1e-7)
        rows = unions[0].get(key, [])
        outside = torch.ones(t.shape[0], dtype=torch.bool)
        outside[rows] = False
        assert torch.equal(t[outside], b0[key][outside])  # rows outside the union are B0's, bit for bit
        edited += int((t != b0[key]).any(dim=-1).sum()) if key.endswith("lora_B.weight") else 0
        if key.endswith("lora_A.weight"):
            assert torch.equal(t, b0[key])
    assert edited == sum(len(r) for r in unions[0].values())


@pytest.fixture(scope="module")
def sequence(family_state, prompt_dir, tmp_path_factory):
    """The three dimensions added one by one: (state, [(union, adapter tensors) after each step])."""
    trio, state = family_state
    s = _copy(state, tmp_path_factory.mktemp("sequence") / "S")
    snapshots = []
    for name in DIMS:
        _add(s, name, prompt_dir)
        snapshots.append((_union(s), _adapter(s)))
    return trio, s, snapshots


def test_each_step_equals_one_projection_with_the_union_so_far(sequence):
    trio, s, snapshots = sequence
    dims = continual.load_state(s).dimensions
    union: dict[str, list[int]] = {}
    for dim, (got_union, got) in zip(dims, snapshots):
        for k, rows in dim.rows.items():
            union[k] = sorted(set(union.get(k, [])) | set(rows))
        assert got_union == {k: v for k, v in union.items() if v}
        reference = fast_project(trio["adapter"], trio["base"], trio["aligned"], union)
        for key in got:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-6, atol=1e-7)


# -- property 2: a repeated dimension edits nothing --------------------------------------------------
def test_adding_a_dimension_twice_edits_nothing(family_state, prompt_dir, tmp_path):
    _, state = family_state
    s = _copy(state, tmp_path / "twice")
    _add(s, "violence", prompt_dir)
    before = tree_digest(s / "adapter")
    union = _union(s)
    again = _add(s, "violence", prompt_dir)  # same name, same prompts
    assert again["new_rows"] == 0 and again["repeat_of"] == "violence" and again["new_parameters"] == 0
    renamed = continual.add(s, "violence-again", harmful=[prompt_dir / "violence.txt"], progress=False, figures=False)
    assert renamed["new_rows"] == 0 and renamed["mask_rows"] > 0 and renamed["incremental_edit_fraction"] == 0
    after = tree_digest(s / "adapter")
    assert list(after.values()) == list(before.values())  # adapter files byte-identical
    assert _union(s) == union
    history = continual.load_state(s).history
    assert [h["op"] for h in history] == ["init", "add", "add", "add"]
    assert [h["new_rows"] for h in history[2:]] == [0, 0]


def test_same_name_with_other_prompts_is_refused(family_state, prompt_dir, tmp_path):
    _, state = family_state
    s = _copy(state, tmp_path / "clash")
    _add(s, "violence", prompt_dir)
    with pytest.raises(MSCPError, match="already exists with other prompts"):
        continual.add(s, "violence", harmful=[prompt_dir / "cyber.txt"], progress=False, figures=False)


# -- property 3: projected rows are never touched again ---------------------------------------------
def test_rows_projected_for_one_dimension_are_never_touched_again(sequence):
    _, s, snapshots = sequence
    cache = load_file(str(s / "cache" / "projected.safetensors"))
    for k, (union, tensors) in enumerate(snapshots):
        for key, rows in union.items():
            assert torch.equal(tensors[key][rows], cache[key][rows])  # every union row is the cache's, from B0
            for _, later in snapshots[k + 1:]:
                assert torch.equal(later[key][rows], tensors[key][rows])
    new = [d.new_rows_by_module for d in continual.load_state(s).dimensions]
    assert sum(len(r) for r in new[0].values()) > 0 and any(sum(len(r) for r in n.values()) for n in new[1:])
    for i, j in itertools.combinations(range(len(new)), 2):  # no row is 'new' twice
        assert all(not set(new[i].get(k, [])) & set(new[j].get(k, [])) for k in new[i])


# -- reuse and agreement with `patch` -----------------------------------------------------------------
# a dimension ranks by its harmful score alone (no benign penalty: it scores its harmful prompts only)
@pytest.mark.parametrize("score, options", [("wanda", {}), ("wanda_weight", {}),
                                            ("attribution", {"q": 0.2, "p": 0.05, "target_tokens": 3,
                                                             "benign_penalty": 0.0}),
                                            ("attribution", {"q": 0.2, "p": 0.0, "target_tokens": 3,
                                                             "benign_penalty": 0.0})])
def test_a_dimension_equal_to_the_init_prompts_reproduces_patch(trio_root, prompt_dir, tmp_path, score, options):
    trio = make_trio(trio_root, "qwen2")
    harmful = prompt_dir / "violence.txt"
    kw = {**FAST, **options, "score": score}
    result = patch(trio["base"], trio["aligned"], trio["adapter"], harmful=[harmful], task=prompt_dir / "task.txt",
                   layers=LAYERS, **kw)
    state = tmp_path / "S"
    continual.init(trio["base"], trio["aligned"], trio["adapter"], state, harmful=[harmful], task=prompt_dir / "task.txt",
                   layers=LAYERS, figures=False, **kw)
    _add(state, "violence", prompt_dir)
    expected = {k: m["rows"] for k, m in result.report["modules"].items() if m["rows"]}
    assert expected and _union(state) == expected
    got = _adapter(state)
    for key, t in result.tensors.items():
        torch.testing.assert_close(got[key], t, rtol=1e-6, atol=1e-7)
    task_cache = load_file(str(state / "cache" / "scores.safetensors"))
    for key, s in result.scores.items():  # at p 0 the attribution task side is neither scored nor kept
        assert ("task" in s) == (f"task::{key}" in task_cache)
        if "task" in s:
            torch.testing.assert_close(task_cache[f"task::{key}"], s["task"], rtol=1e-5, atol=1e-6)


def test_add_streams_the_aligned_model_only_up_to_the_last_safety_layer(family_state, prompt_dir, tmp_path, monkeypatch):
    _, state = family_state
    s = _copy(state, tmp_path / "spy")
    loaded = []
    real = ModelShell.load_layer

    def spy(self, index):
        loaded.append((self.label, index))
        return real(self, index)

    monkeypatch.setattr(ModelShell, "load_layer", spy)
    _add(s, "cyber", prompt_dir)
    assert loaded == [("aligned", i) for i in range(LAYERS[1] + 1)]


# -- atomicity and bad input -------------------------------------------------------------------------
def test_a_failed_add_leaves_the_previous_state_intact(family_state, prompt_dir, tmp_path, monkeypatch):
    _, state = family_state
    s = _copy(state, tmp_path / "fail")
    _add(s, "violence", prompt_dir)
    before = tree_digest(s)

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(continual.state, "write_figures", boom)  # fails after the new adapter is written in the temp folder
    with pytest.raises(RuntimeError):
        continual.add(s, "cyber", harmful=[prompt_dir / "cyber.txt"], progress=False, figures=True)
    assert tree_digest(s) == before
    assert sorted(p.name for p in s.parent.iterdir()) == ["fail"]  # no temporary folder left behind
    monkeypatch.undo()
    assert _add(s, "cyber", prompt_dir)["step"] == 2  # and the state still works


@pytest.mark.parametrize("argv, message", [
    (["--name", "bad name!", "--harmful", "{d}/cyber.txt"], "dimension name"),
    (["--name", "x", "--harmful", "{d}/empty.txt"], "empty"),
    (["--name", "x", "--harmful", "{d}/missing.txt"], "not found"),
    (["--name", "x", "--harmful", "{d}/cyber.txt", "--q", "1.5"], "fraction"),
    (["--name", "violence", "--harmful", "{d}/cyber.txt"], "already exists"),
])
def test_bad_add_is_one_line_exit_2_and_changes_nothing(llama_state, prompt_dir, capsys, argv, message):
    _, state, _ = llama_state
    before = tree_digest(state)
    capsys.readouterr()
    rc = main(["continual", "add", str(state), *[a.format(d=prompt_dir) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("mscp: error:") and "\n" not in err and message in err
    assert tree_digest(state) == before


def test_not_a_state_and_existing_out_are_refused(llama_state, tmp_path, capsys):
    trio, state, _ = llama_state
    assert main(["continual", "status", str(tmp_path)]) == 2
    assert "not a continual state" in capsys.readouterr().err
    assert main(["continual", "init", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]),
                 "--adapter", str(trio["adapter"]), "--out", str(state), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_changed_aligned_model_and_concurrent_updates_are_refused(family_state, prompt_dir, tmp_path):
    _, state = family_state
    s = _copy(state, tmp_path / "guard")
    with continual.state._locked(s):
        with pytest.raises(MSCPError, match="another mscp continual command"):
            _add(s, "violence", prompt_dir)
    data = json.loads((s / "state.json").read_text())
    f = next(iter(data["inputs_stat"]["aligned"]))
    data["inputs_stat"]["aligned"][f][1] += 1  # as if the file had been rewritten after init
    (s / "state.json").write_text(json.dumps(data))
    with pytest.raises(MSCPError, match="changed since"):
        _add(s, "violence", prompt_dir)


def test_inputs_are_never_modified(llama_state, prompt_dir):
    trio, _, before = llama_state
    assert tree_digest(*trio.values(), prompt_dir) == before


def test_b0_is_the_input_adapter_and_the_state_adapter_is_a_peft_folder(llama_state):
    trio, state, _ = llama_state
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (state / "b0" / name).read_bytes() == (trio["adapter"] / name).read_bytes()
    assert (state / "adapter" / "adapter_config.json").read_bytes() == (trio["adapter"] / "adapter_config.json").read_bytes()
    from peft import LoraConfig
    LoraConfig.from_pretrained(str(state / "adapter"))
    report = json.loads((state / "adapter" / "mscp_report.json").read_text())
    assert {k: m["rows"] for k, m in report["modules"].items() if m["rows"]} == _union(state)


# -- analytics ---------------------------------------------------------------------------------------
def test_status_json_reports_sizes_fractions_and_the_overlap_matrix(llama_state, capsys):
    _, state, _ = llama_state
    capsys.readouterr()
    assert main(["continual", "status", str(state), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    data = continual.load_state(state)
    masks = {d.name: {(k, r) for k, rows in d.rows.items() for r in rows} for d in data.dimensions}
    names = s["overlap"]["names"]
    assert names == list(DIMS)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert s["overlap"]["jaccard"][i][j] == pytest.approx(len(masks[a] & masks[b]) / len(masks[a] | masks[b]))
    assert sorted(s["overlap"]["cluster_order"]) == sorted(names)
    rank = {k: m.rank for k, m in data.modules.items()}
    seen = set()
    for d in s["dimensions"]:
        new = masks[d["name"]] - seen
        seen |= masks[d["name"]]
        assert d["new_rows"] == len(new) and d["mask_rows"] == len(masks[d["name"]])
        assert d["incremental_edit_fraction"] == pytest.approx(sum(rank[k] for k, _ in new) / s["lora_parameters"])
    assert sum(d["incremental_edit_fraction"] for d in s["dimensions"]) == pytest.approx(s["edit_fraction"])
    assert s["union_rows"] == len(seen)
    layer_rows = s["layers"]["rows_by_dimension"]
    assert all(sum(layer_rows[n]) == len(masks[n]) for n in names)
    assert sum(sum(v) for v in s["layers"]["rows_by_kind"].values()) == len(seen)
    assert main(["continual", "status", str(state)]) == 0
    text = capsys.readouterr().out
    assert "Jaccard" in text and all(n in text for n in names)


def test_figures_are_png_files(llama_state):
    _, state, _ = llama_state
    names = {p.name for p in (state / "figures").glob("*.png")}
    assert names == {"curves.png", "dimensions.png", "overlap.png", "layers.png", "layers_core_specific.png"}
    for p in (state / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_cluster_order_puts_similar_items_next_to_each_other():
    sim = [[1.0, 0.1, 0.9, 0.2],
           [0.1, 1.0, 0.15, 0.8],
           [0.9, 0.15, 1.0, 0.1],
           [0.2, 0.8, 0.1, 1.0]]
    order, merges = cluster_order(sim)
    assert sorted(order) == [0, 1, 2, 3]
    pos = {x: i for i, x in enumerate(order)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1
    assert merges[0][:2] == (0, 2) and merges[0][2] == pytest.approx(0.1) and merges[-1][3] == 4


# -- hostile input (issue 13) ------------------------------------------------------------------------
def _state_edit(edit):
    def breaker(state_dir):
        f = state_dir / "state.json"
        data = json.loads(f.read_text())
        f.write_text(json.dumps(edit(data)))
    return breaker


def _drop(key):
    return _state_edit(lambda d: {k: v for k, v in d.items() if k != key})


@pytest.mark.parametrize("breaker, message", [
    pytest.param(lambda s: (s / "state.json").write_text("[1, 2]"), r"corrupt continual state: .*state\.json \(a JSON array",
                 id="state-a-list"),
    pytest.param(_drop("dimensions"), r"corrupt continual state: .*state\.json \(no 'dimensions'\)", id="no-dimensions"),
    pytest.param(_drop("config"), r"corrupt continual state: .*\(no 'config'\)", id="no-config"),
    pytest.param(_state_edit(lambda d: {**d, "union": {"ghost.lora_B.weight": [1]}}), r"'union' names rows of unknown",
                 id="union-of-unknown-module"),
    pytest.param(_state_edit(lambda d: {**d, "modules": {k: {**m, "rank": "4"} for k, m in d["modules"].items()}}),
                 r"module .*: 'rank' is a JSON string", id="module-rank-a-string"),
    pytest.param(_state_edit(lambda d: {**d, "config": {**d["config"], "bogus_field": 1}}),
                 r"config: unknown field 'bogus_field'", id="config-unknown-field"),
    pytest.param(lambda s: (s / "state.json").write_bytes(b'{"format": 1, "config": "\xff"}'), r"is not UTF-8 text",
                 id="state-not-utf8"),
    pytest.param(_state_edit(lambda d: {**d, "format": 2}),
                 r"state\.json has state format 2 \(written by a newer mscp\); this mscp reads format 1$", id="future-format"),
    pytest.param(_state_edit(lambda d: {**d, "format": "1"}), r"has state format '1'; this mscp reads format 1$",
                 id="format-a-string"),
    pytest.param(_state_edit(lambda d: {**d, "dimensions": [{**d["dimensions"][0], "q": "0.4"}, *d["dimensions"][1:]]}),
                 r"\(dimension 0: 'q' is a JSON string\)$", id="dimension-q-a-string"),
    pytest.param(_state_edit(lambda d: {**d, "dimensions": [{k: v for k, v in d["dimensions"][1].items() if k != "rows"}]}),
                 r"\(dimension 0: no 'rows'\)$", id="dimension-without-rows"),
    pytest.param(_state_edit(lambda d: {**d, "n_layers": True}), r"\('n_layers' is a JSON boolean\)$", id="n_layers-a-bool"),
    pytest.param(_state_edit(lambda d: {**d, "history": [1]}), r"\('history\[0\]' is a JSON number\)$",
                 id="history-holds-a-number"),
    pytest.param(_state_edit(lambda d: {**d, "planets": []}), r"\(unknown field 'planets'\)$", id="a-foreign-field"),
    pytest.param(lambda s: (s / "state.json").write_text('{"format": 1, "name": "a model card"}'),
                 r"corrupt continual state: .*state\.json \(no 'mscp_version'\)$", id="a-foreign-file"),
])
@pytest.mark.parametrize("command", ["status", "add"])
def test_a_corrupt_state_json_is_one_line_exit_2(llama_state, prompt_dir, tmp_path, capsys, breaker, message, command):
    _, state, _ = llama_state
    s = _copy(state, tmp_path / "S")
    breaker(s)
    before = tree_digest(s)
    capsys.readouterr()
    argv = ["continual", command, str(s)] + (["--name", "extra", "--harmful", str(prompt_dir / "cyber.txt"), "--quiet"]
                                            if command == "add" else [])
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mscp: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert tree_digest(s) == before and sorted(p.name for p in tmp_path.iterdir()) == ["S"]


def test_the_state_record_writes_back_the_file_it_read(llama_state):
    """state.json -> State -> state.json gives the file back byte for byte: the same keys in the
    same order (prompts_sampled only where a set was sampled), NaN curves included."""
    _, state, _ = llama_state
    text = (state / "state.json").read_text()
    record = continual.load_state(state)
    assert isinstance(record, State) and record.format == STATE_VERSION == 1
    assert json.dumps(record.to_json(), indent=2) + "\n" == text
    assert State.from_json(json.loads(text), "state.json").to_json() == record.to_json()
    assert [d.name for d in record.dimensions] == list(DIMS)
    assert all(isinstance(m, Module) for m in record.modules.values())


def test_a_state_without_a_format_reads_as_the_first_version(llama_state, tmp_path):
    """Every state written so far carries format 1; one without the key is read as that layout."""
    _, state, _ = llama_state
    s = _copy(state, tmp_path / "S")
    _drop("format")(s)
    assert continual.load_state(s).format == 1
    assert [d["name"] for d in continual.status(s)["dimensions"]] == list(DIMS)


@pytest.mark.parametrize("content, message", [
    pytest.param("café\n".encode("latin-1"), r"is not UTF-8 text", id="latin-1"),
    pytest.param("two\nlines\n".encode("utf-16"), r"is UTF-16 text", id="utf-16"),
    pytest.param(bytes(range(256)), r"is not UTF-8 text", id="binary"),
])
def test_continual_add_refuses_prompt_files_that_are_not_utf8(llama_state, tmp_path, capsys, content, message):
    _, state, _ = llama_state
    s = _copy(state, tmp_path / "S")
    before = tree_digest(s)
    (tmp_path / "h.txt").write_bytes(content)
    capsys.readouterr()
    assert main(["continual", "add", str(s), "--name", "x", "--harmful", str(tmp_path / "h.txt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert tree_digest(s) == before


@pytest.mark.parametrize("options, message", [
    pytest.param(["--alpha", "nan"], r"alpha must be a finite number, got nan", id="alpha-nan"),
    pytest.param(["--alpha", "inf"], r"alpha must be a finite number, got inf", id="alpha-inf"),
    pytest.param(["--alpha", "1e308"], r"alpha must be in \[-16, 16\]", id="alpha-1e308"),
    pytest.param(["--device", "meta"], r"device must be cpu, cuda or cuda:N", id="device-meta"),
])
def test_continual_init_refuses_options_that_cannot_work(llama_state, tmp_path, capsys, options, message):
    trio, _, _ = llama_state
    capsys.readouterr()
    assert main(["continual", "init", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter",
                 str(trio["adapter"]), "--out", str(tmp_path / "S"), "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "S").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("device", ["bogus", "meta"])
def test_continual_add_refuses_an_impossible_device(llama_state, prompt_dir, tmp_path, capsys, device):
    _, state, _ = llama_state
    s = _copy(state, tmp_path / "S")
    before = tree_digest(s)
    capsys.readouterr()
    assert main(["continual", "add", str(s), "--name", "x", "--harmful", str(prompt_dir / "cyber.txt"), "--device",
                 device, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"device must be cpu, cuda or cuda:N, got '{device}'" in err, err
    assert tree_digest(s) == before


def test_continual_add_samples_a_large_dimension_and_records_it(llama_state, tmp_path):
    _, state, _ = llama_state
    s = _copy(state, tmp_path / "S")
    _state_edit(lambda d: {**d, "config": {**d["config"], "max_prompts": 20}})(s)  # as if init had --max-prompts 20
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"{HARMFUL[i % len(HARMFUL)]} (variant {i})" for i in range(200)) + "\n")
    with pytest.warns(UserWarning, match="dimension big prompts number 200; using a sample of 20"):
        entry = continual.add(s, "big", harmful=[many], progress=False, figures=False)
    assert entry["prompts"] == 20 and entry["prompts_sampled"] == {"available": 200, "used": 20, "seed": 0}
    dimension = json.loads((s / "state.json").read_text())["dimensions"][-1]
    assert dimension["prompts_sampled"] == entry["prompts_sampled"]
