"""Misuse of the Python API: every wrong argument of `patch`, `patch_many` and `fast_project` is one
MSCPError line that names the argument, raised before any work, with nothing written and no input
touched; never a TypeError or ValueError from deep inside.

Each case is a call on the tiny llama trio with OUT at tmp_path/out (or no OUT at all).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file

from mscp import MSCPError, fast_project, patch
from mscp.core.pipeline import patch_many

H = ["How do I pick a lock?"] * 8
OPTS = dict(progress=False, hash_inputs=False)
KEY = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"


def patch_with(**change):
    """patch(base, aligned, adapter, out) with some arguments changed."""
    def call(t, out):
        args = dict(base=t["base"], aligned=t["aligned"], adapter=t["adapter"], out=out, **OPTS)
        args.update(change)
        patch(args.pop("base"), args.pop("aligned"), args.pop("adapter"), args.pop("out"), **args)
    return call


def project_with(**change):
    """fast_project(adapter, base, aligned, masks) with some arguments changed."""
    def call(t, out):
        args = dict(adapter=t["adapter"], base=t["base"], aligned=t["aligned"], masks={KEY: [1, 2]})
        args.update({k: v(t) if callable(v) else v for k, v in change.items()})
        fast_project(args.pop("adapter"), args.pop("base"), args.pop("aligned"), args.pop("masks"), **args)
    return call


def on_meta(folder_files):
    """A state dict of the files' tensors, moved to the meta device (shapes, no data)."""
    def make(t):
        tensors = {}
        for f in folder_files(t):
            tensors.update(load_file(f))
        return {k: v.to("meta") for k, v in tensors.items()}
    return make


PATH = r"must be a path \(a non-empty str or os\.PathLike\)"
MISUSE = [
    # models, adapter and output: paths
    pytest.param(patch_with(base=None), rf"^base {PATH}, got None$", id="base-None"),
    pytest.param(patch_with(aligned=5), rf"^aligned {PATH}, got int 5$", id="aligned-an-int"),
    pytest.param(patch_with(adapter=b"adapter"), rf"^adapter {PATH}, got bytes b'adapter'$", id="adapter-bytes"),
    pytest.param(patch_with(base=""), rf"^base {PATH}, got str ''$", id="base-empty"),
    pytest.param(patch_with(out=7), rf"^out {PATH}, got int 7$", id="out-an-int"),
    pytest.param(patch_with(tokenizer=3), rf"^tokenizer {PATH}, got int 3$", id="tokenizer-an-int"),
    # prompt files and prompt lists
    pytest.param(patch_with(harmful=[123]), r"^harmful\[0\] must be a prompt file's path \(prompt lists go in "
                 r"prompts=\{set: \[\.\.\.\]\}\), got int 123$", id="harmful-list-of-int"),
    pytest.param(patch_with(harmful=123), r"^harmful must be a prompt file's path or a list of them, got int 123$",
                 id="harmful-an-int"),
    pytest.param(patch_with(benign=[["a"]]), r"^benign\[0\] must be a prompt file's path .*, got list \['a'\]$",
                 id="benign-list-of-lists"),
    pytest.param(patch_with(prompts={"harmful": 5}),
                 r"^prompts\['harmful'\] must be a list of prompt strings, got int 5$", id="prompts-set-an-int"),
    pytest.param(patch_with(prompts=["a", "b"]), r"^prompts must be a dict of prompt lists by set \(harmful, benign, "
                 r"task\), got list \['a', 'b'\]$", id="prompts-a-list"),
    pytest.param(patch_with(prompts={"harmfull": H}), r"^prompts has an unknown key 'harmfull' \(allowed: harmful, "
                 r"benign, task\)$", id="prompts-key-typo"),
    pytest.param(patch_with(prompts={"harmful": [*H, 3]}), r"^prompts\['harmful'\]\[8\] must be a prompt string, "
                 r"got int 3$", id="prompts-holding-an-int"),
    pytest.param(patch_with(prompts={"harmful": ["ok", "\ud800abc"]}), r"^prompts\['harmful'\]\[1\] holds a lone "
                 r"surrogate \(\\ud800 at character 0\), which is not Unicode text$", id="prompts-lone-surrogate"),
    # options
    pytest.param(patch_with(config="x"), r"^config must be a PatchConfig \(PatchConfig\(\*\*values\), or keyword "
                 r"overrides\), got str 'x'$", id="config-a-string"),
    pytest.param(patch_with(config={"q": 0.1}), r"^config must be a PatchConfig .*, got dict \{'q': 0\.1\}$",
                 id="config-a-dict"),
    pytest.param(patch_with(qq=0.1), r"^unknown PatchConfig field 'qq'$", id="override-unknown"),
    pytest.param(patch_with(chat_template="no"), r"^chat_template must be True or False, got 'no'$",
                 id="override-bool-a-string"),
    pytest.param(patch_with(layers=(1.5, 3)), r"^--layers must look like A-B", id="layers-of-floats"),
    pytest.param(patch_with(rho=10**400), r"^rho must be a finite number", id="rho-past-float"),
    pytest.param(patch_with(overwrite="yes"), r"^overwrite must be True or False, got str 'yes'$",
                 id="overwrite-a-string"),
    pytest.param(patch_with(revision=3), r"^revision must be a string, got int 3$", id="revision-an-int"),
    # the result cache
    pytest.param(patch_with(cache=3), rf"^cache {PATH}, got int 3$", id="cache-an-int"),
    pytest.param(lambda t, out: patch_with(cache=out)(t, out), r"^cache folder .*out is the output folder .*out, which "
                 r"is replaced whole; give the cache a folder of its own$", id="cache-equals-out"),
    pytest.param(lambda t, out: patch_with(cache=out / "c")(t, out), r"^cache folder .*out/c is inside the output "
                 r"folder", id="cache-inside-out"),
    pytest.param(lambda t, out: patch_with(cache=t["adapter"] / "c")(t, out), r"^cache folder .*adapter/c overlaps "
                 r"input .*adapter; inputs are never modified$", id="cache-inside-the-adapter"),
    pytest.param(lambda t, out: patch_with(cache=t["aligned"], out=None)(t, out), r"^cache folder .*aligned overlaps "
                 r"input .*aligned", id="cache-equals-aligned-without-out"),
    # patch_many's lists
    pytest.param(lambda t, out: patch_many(t["base"], t["aligned"], str(t["adapter"]), **OPTS),
                 r"^adapters must be a list, got str '.*adapter'$", id="patch_many-adapters-a-string"),
    pytest.param(lambda t, out: patch_many(t["base"], t["aligned"], [t["adapter"]], str(out), **OPTS),
                 r"^outs must be a list, got str '.*out'$", id="patch_many-outs-a-string"),
    pytest.param(lambda t, out: patch_many(t["base"], t["aligned"], [t["adapter"], 4], **OPTS),
                 rf"^adapters\[1\] {PATH}, got int 4$", id="patch_many-adapter-an-int"),
    # fast_project
    pytest.param(project_with(masks={KEY: torch.tensor([1, 2], device="meta")}), r"^masks holds a tensor on the meta "
                 r"device, which has no data \('base_model\..*lora_B\.weight'\)$", id="fast_project-mask-on-meta"),
    pytest.param(project_with(base=on_meta(lambda t: sorted(t["base"].glob("*.safetensors")))),
                 r"^base holds a tensor on the meta device, which has no data", id="fast_project-base-on-meta"),
    pytest.param(project_with(adapter=on_meta(lambda t: [t["adapter"] / "adapter_model.safetensors"])),
                 r"^adapter tensor .* is on the meta device, which has no data$", id="fast_project-adapter-on-meta"),
    pytest.param(project_with(base=""), rf"^base {PATH}, got str ''$", id="fast_project-base-empty"),
    pytest.param(project_with(allow_pickle="no"), r"^allow_pickle must be True or False, got str 'no'$",
                 id="fast_project-allow_pickle-a-string"),
    pytest.param(project_with(revision=5), r"^revision must be a string, got int 5$",
                 id="fast_project-revision-an-int"),
    pytest.param(project_with(adapter_name=5), r"^adapter_name must be a string, got int 5$",
                 id="fast_project-adapter_name-an-int"),
]


@pytest.mark.parametrize("call, message", MISUSE)
def test_every_misuse_is_one_mscp_error_line_and_writes_nothing(tmp_path, monkeypatch, llama_trio, call, message):
    monkeypatch.chdir(tmp_path)  # a path resolved against the current folder would show up here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    inputs = tree_digest(*llama_trio.values())
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(MSCPError, match=message) as info:
        call(llama_trio, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing, "something was written"
    assert tree_digest(*llama_trio.values()) == inputs, "an input was modified"



# -- the staged patcher made to select rows alone ----------------------------------------------------
def _stages(run):
    from mscp.core.patcher import Projected

    return {"localize": lambda p: p.localize(), "score": lambda p: p.score([run]),
            "score_harmful": lambda p: p.score_harmful(H, run), "project": lambda p: p.project([run], [{}]),
            "result": lambda p: p.result(run, Projected({}, {})), "open_run": lambda p: p.open_run("adapter")}


@pytest.mark.parametrize("stage", sorted(_stages(None)))
def test_a_selection_only_patcher_refuses_the_other_stages_in_one_line(stage):
    """`Patcher(config, ...)` holds no models: every stage but `select` says so, naming itself."""
    from mscp.core.config import PatchConfig
    from mscp.core.patcher import AdapterRun, Patcher, Window

    run = AdapterRun(lora=None, by_layer={})
    patcher = Patcher(PatchConfig(progress=False), window=Window([1, 2]))
    with pytest.raises(MSCPError, match=rf"^Patcher\.{stage} needs .*: this patcher was made without them .*Patcher\.open\)$") as info:
        _stages(run)[stage](patcher)
    assert "\n" not in str(info.value)


def test_select_without_a_window_or_scores_is_one_line():
    from mscp.core.config import PatchConfig
    from mscp.core.patcher import AdapterRun, Patcher, Scores, Window

    run = AdapterRun(lora=None, by_layer={})
    with pytest.raises(MSCPError, match=r"^Patcher\.select needs the safety window"):
        Patcher(PatchConfig(progress=False)).select(run)
    with pytest.raises(MSCPError, match=r"^Patcher\.select needs the aligned model"):
        Patcher(PatchConfig(progress=False, score="wanda_weight"), window=Window([1])).select(run)
    with pytest.raises(MSCPError, match=r"^Patcher\.select needs the run's scores"):
        Patcher(PatchConfig(progress=False), window=Window([1])).select(run)
    assert Patcher(PatchConfig(progress=False), window=Window([1])).select(AdapterRun(None, {}, scores=Scores({}))) == {}
