"""The streamed pipeline against an independent full in-memory reference.

The reference loads whole models with transformers and the adapter with peft, runs prompts
through them in one padded batch, and applies docs/method.md's formulas densely in float64.
"""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_trio, mapped_file
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mscp.core.streaming
from mscp import patch
from mscp.core.prompts import default_prompts
from mscp.core.scoring import safety_rows
from mscp.core.streaming import ModelShell, mmap_large_allocations

HARMFUL, BENIGN = default_prompts("harmful")[:10], default_prompts("benign")[:10]
TASK = default_prompts("benign")[10:22]


# These specify the paper's method (Wanda rows, the sigma window); the attribution default is
# specified in test_scores.py.
PAPER = dict(score="wanda", q=0.3, p=0.3, rho=0.2)


def run(trio, **overrides):
    kw = dict(prompts={"harmful": HARMFUL, "benign": BENIGN, "task": TASK}, progress=False, hash_inputs=False,
              batch_size=4, **PAPER)
    kw.update(overrides)
    return patch(trio["base"], trio["aligned"], trio["adapter"], **kw)


def tokenize(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask, torch.tensor([len(s) - 1 for s in seqs])


def layer_outputs(model, ids, mask, last):
    """Last-token state after the embedding and after each decoder layer (pre final norm), float64."""
    layers = model.model.layers
    captured = {}
    handle = layers[-1].register_forward_hook(lambda m, a, o: captured.setdefault("last", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    handle.remove()
    states = list(hs[: len(layers)]) + [captured["last"]]  # hs[-1] is after the final norm
    rows = torch.arange(ids.shape[0])
    return [h[rows, last].double() for h in states]


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def module_inputs(model, names, ids, mask):
    """RMS over valid tokens of the input of each named module (float64)."""
    sums = {}
    def make(name):
        def hook(_m, args):
            x = args[0][mask.bool()].double()
            s, n = sums.get(name, (0, 0))
            sums[name] = (s + x.square().sum(0), n + x.shape[0])
        return hook
    handles = [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return {n: (s / c).sqrt() for n, (s, c) in sums.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, trio_root):
    trio = make_trio(trio_root, request.param)
    return request.param, trio, run(trio)


def test_layer_curves_equal_a_full_forward_with_hidden_states(family_run):
    _, trio, result = family_run
    tok = AutoTokenizer.from_pretrained(str(trio["aligned"]))
    base, aligned = load(trio["base"]), load(trio["aligned"])
    c = {}
    for name, prompts in (("harmful", HARMFUL), ("benign", BENIGN)):
        ids, mask, last = tokenize(tok, prompts)
        hb, ha = layer_outputs(base, ids, mask, last), layer_outputs(aligned, ids, mask, last)
        c[name] = [torch.nn.functional.cosine_similarity(b, a, dim=-1).mean().item() for b, a in zip(hb, ha)]
    curves = result.report["layer_curves"]
    assert len(curves) == base.config.num_hidden_layers
    for l, rec in enumerate(curves):
        assert rec["c_harmful"] == pytest.approx(c["harmful"][l + 1], abs=1e-5)
        assert rec["c_benign"] == pytest.approx(c["benign"][l + 1], abs=1e-5)
        expected_sigma = (c["benign"][l + 1] - c["benign"][l]) - (c["harmful"][l + 1] - c["harmful"][l])
        assert rec["sigma"] == pytest.approx(expected_sigma, abs=2e-5)


def test_li_gap_is_benign_benign_minus_benign_harmful_cosine(family_run):
    _, trio, result = family_run
    tok = AutoTokenizer.from_pretrained(str(trio["aligned"]))
    aligned = load(trio["aligned"])
    ids, mask, last = tokenize(tok, HARMFUL + BENIGN)
    states = layer_outputs(aligned, ids, mask, last)
    for l, rec in enumerate(result.report["layer_curves"]):
        x = torch.nn.functional.normalize(states[l + 1], dim=-1).numpy()
        h, b = x[: len(HARMFUL)], x[len(HARMFUL):]
        bb = [b[i] @ b[j] for i in range(len(b)) for j in range(len(b)) if i != j]
        bh = [bi @ hj for bi in b for hj in h]
        assert rec["li_gap"] == pytest.approx(np.mean(bb) - np.mean(bh), abs=1e-5)


def test_safety_layers_are_the_window_with_the_largest_sigma_sum(family_run):
    _, _, result = family_run
    sigma = [c["sigma"] for c in result.report["layer_curves"]]
    width = max(1, round(0.2 * len(sigma)))
    sums = [sum(sigma[i : i + width]) for i in range(len(sigma) - width + 1)]
    first = int(np.argmax(sums))
    assert result.report["safety_layers"] == list(range(first, first + width))


def test_neuron_scores_equal_the_dense_wanda_formula(family_run):
    _, trio, result = family_run
    tok = AutoTokenizer.from_pretrained(str(trio["aligned"]))
    aligned = load(trio["aligned"])
    finetuned = PeftModel.from_pretrained(load(trio["aligned"]), str(trio["adapter"])).eval()
    keys = sorted(result.scores)
    modules = [k.removeprefix("base_model.model.").removesuffix(".lora_B.weight") for k in keys]
    ids_h, mask_h, _ = tokenize(tok, HARMFUL)
    n_h = module_inputs(aligned, modules, ids_h, mask_h)
    ids_t, mask_t, _ = tokenize(tok, TASK)
    n_t = module_inputs(finetuned, [f"base_model.model.{m}" for m in modules], ids_t, mask_t)
    for key, module in zip(keys, modules):
        W = aligned.get_submodule(module).weight.double()
        lora_layer = finetuned.get_submodule(f"base_model.model.{module}")
        B, A = lora_layer.lora_B["default"].weight.double(), lora_layer.lora_A["default"].weight.double()
        W_f = W + lora_layer.scaling["default"] * B @ A
        expected_h = (W.abs() * n_h[module]).sum(1)
        expected_t = (W_f.abs() * n_t[f"base_model.model.{module}"]).sum(1)
        torch.testing.assert_close(result.scores[key]["harmful"].double(), expected_h, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.scores[key]["task"].double(), expected_t, rtol=1e-4, atol=1e-6)


def test_masks_are_top_q_safety_rows_minus_top_p_task_rows(family_run):
    _, _, result = family_run
    cfg = result.report["config"]
    for key, rec in result.report["modules"].items():
        ih, it = result.scores[key]["harmful"].numpy(), result.scores[key]["task"].numpy()
        d = len(ih)
        top_h = set(np.argsort(-ih, kind="stable")[: round(cfg["q"] * d)].tolist())
        top_t = set(np.argsort(-it, kind="stable")[: round(cfg["p"] * d)].tolist())
        assert rec["rows"] == sorted(top_h - top_t)


def test_projected_rows_equal_the_dense_safe_lora_projection_and_the_rest_is_untouched(family_run):
    _, trio, result = family_run
    original = load_file(str(trio["adapter"] / "adapter_model.safetensors"))
    base, aligned = load(trio["base"]), load(trio["aligned"])
    projected = set()
    for key, rec in result.report["modules"].items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        V = aligned.get_submodule(module).weight.double() - base.get_submodule(module).weight.double()
        C = V @ V.T / torch.linalg.norm(V)
        B = original[key].double()
        expected = B + (C @ B - B)
        rows = torch.tensor(rec["rows"], dtype=torch.long)
        assert rec["norm_v"] == pytest.approx(torch.linalg.norm(V).item(), rel=1e-5)
        torch.testing.assert_close(result.tensors[key][rows].double(), expected[rows], rtol=1e-5, atol=1e-6)
        others = torch.ones(B.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(result.tensors[key][others], original[key][others])
        projected.add(key)
    assert projected, "some module must have been projected"
    for key, tensor in original.items():
        if key not in projected:
            assert torch.equal(result.tensors[key], tensor)


def test_edit_fraction_counts_projected_rows_times_rank_over_all_lora_parameters(family_run):
    _, trio, result = family_run
    original = load_file(str(trio["adapter"] / "adapter_model.safetensors"))
    edited = sum(len(m["rows"]) * original[k].shape[1] for k, m in result.report["modules"].items())
    assert result.report["edit_fraction"] == pytest.approx(edited / sum(t.numel() for t in original.values()))


def test_explicit_layers_override_the_criterion(llama_trio):
    result = run(llama_trio, layers=(1, 2))
    assert result.report["safety_layers"] == [1, 2]
    assert {m["module"].split(".")[2] for m in result.report["modules"].values()} == {"1", "2"}


def test_a_given_window_stops_scoring_after_its_last_layer_and_selects_the_same_rows(llama_trio):
    free = run(llama_trio, q=0.5, p=0.2)  # the criterion's window; every layer scored
    given = run(llama_trio, q=0.5, p=0.2, layers=(1, 2))
    layer_of = lambda key: int(key.split(".layers.")[1].split(".")[0])  # noqa: E731
    assert {layer_of(k) for k in free.scores} == set(range(free.report["n_layers"]))
    assert {layer_of(k) for k in given.scores} == {0, 1, 2}
    for key, s in given.scores.items():  # the streams up to the window are the same computation
        assert torch.equal(s["harmful"], free.scores[key]["harmful"]) and torch.equal(s["task"], free.scores[key]["task"])
    assert given.report["layer_curves"] == free.report["layer_curves"]
    for key, m in given.report["modules"].items():
        expected = safety_rows(free.scores[key]["harmful"], free.scores[key]["task"], 0.5, 0.2).tolist()
        assert m["rows"] == expected


def test_li_gap_criterion_picks_the_window_where_the_gap_grows_most(llama_trio):
    result = run(llama_trio, criterion="li_gap", rho=0.4)
    growth = [c["d_li_gap"] for c in result.report["layer_curves"]]
    sums = [growth[i] + growth[i + 1] for i in range(len(growth) - 1)]
    first = int(np.argmax(sums))
    assert result.report["safety_layers"] == [first, first + 1]


def test_exact_projector_uses_the_top_singular_subspace_of_v(llama_trio):
    result = run(llama_trio, projector="exact", exact_rank=3)
    original = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    base, aligned = load(llama_trio["base"]), load(llama_trio["aligned"])
    for key, rec in result.report["modules"].items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        V = (aligned.get_submodule(module).weight.double() - base.get_submodule(module).weight.double()).detach().numpy()
        U = np.linalg.svd(V, full_matrices=False)[0][:, :3]
        B = original[key].double().numpy()
        expected = U @ (U.T @ B)
        rows = rec["rows"]
        np.testing.assert_allclose(result.tensors[key][rows].double().numpy(), expected[rows], rtol=1e-4, atol=1e-6)


def test_alpha_blends_between_the_original_and_the_projection(llama_trio):
    full, half = run(llama_trio, alpha=1.0), run(llama_trio, alpha=0.5)
    original = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    for key, rec in full.report["modules"].items():
        rows = rec["rows"]
        midpoint = (original[key][rows].double() + full.tensors[key][rows].double()) / 2
        torch.testing.assert_close(half.tensors[key][rows].double(), midpoint, rtol=1e-5, atol=1e-6)


def test_streaming_holds_at_most_two_layers_of_each_model(llama_trio, monkeypatch):
    """The layer in use and the next one, read ahead; never more, whatever the depth."""
    live: dict[str, list] = {"base": [], "aligned": []}
    original = ModelShell.load_layer

    def tracked(self, index):
        layer = original(self, index)
        gc.collect()
        alive = [r for r in live[self.label] if r() is not None]
        assert len(alive) <= 1, f"{len(alive)} {self.label} layers still in memory when layer {index} loads"
        live[self.label].append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(ModelShell, "load_layer", tracked)
    result = run(llama_trio)
    assert len(live["base"]) == len(live["aligned"]) == result.report["n_layers"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("dtype, mapped", [("auto", True), ("float32", True), ("bfloat16", False)])
def test_streamed_layers_view_the_checkpoint_pages_when_computing_in_its_dtype(llama_trio, dtype, mapped):
    shell = ModelShell(llama_trio["aligned"], label="aligned", dtype=dtype)
    layer = shell.load_layer(1)
    files = {name: mapped_file(t.data_ptr()) or "" for name, t in layer.state_dict().items()}
    assert all(f.endswith(".safetensors") == mapped for f in files.values()), files
    copied = ModelShell(llama_trio["aligned"], label="aligned", dtype=dtype).ckpt
    for name, t in layer.state_dict().items():
        assert torch.equal(t, copied.get(shell.layer_key(1, name), dtype=t.dtype)), name


class FakeGlibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))


@pytest.mark.parametrize("env, calls", [(None, [(-3, 32 << 20)]), ("65536", [])])
def test_the_command_fixes_the_mmap_threshold_at_32_mb_unless_the_environment_sets_it(monkeypatch, env, calls):
    libc = FakeGlibc()
    monkeypatch.setattr(mscp.core.streaming, "_glibc", lambda: libc)
    if env is None:
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", env)
    mmap_large_allocations()
    assert libc.calls == calls


@pytest.mark.parametrize("command", ["patch", "bench", "demo", "eval", "organism"])
def test_every_command_fixes_the_mmap_threshold(monkeypatch, command):
    import importlib

    from mscp import cli

    libc = FakeGlibc()
    monkeypatch.setattr(mscp.core.streaming, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    seen = []
    monkeypatch.setattr(importlib.import_module(f"mscp.cli.{command}"), "run", lambda args: seen.append(command) or 0)
    argv = {"patch": ["--base", "b", "--aligned", "a", "--adapter", "l", "--out", "o"],
            "bench": ["--base", "b", "--aligned", "a", "--adapter", "l"], "eval": ["--model", "m", "--harmful", "h"],
            "organism": ["build"], "demo": []}[command]
    assert cli.main([command, *argv]) == 0 and seen == [command]
    assert libc.calls == [(-3, 32 << 20)]


def test_bfloat16_compute_gives_close_curves_and_the_same_report_fields(llama_trio):
    fp32, bf16 = run(llama_trio), run(llama_trio, dtype="bfloat16")
    assert bf16.report["compute_dtype"] == "bfloat16"
    for a, b in zip(fp32.report["layer_curves"], bf16.report["layer_curves"]):
        assert b["c_harmful"] == pytest.approx(a["c_harmful"], abs=2e-2)


@pytest.mark.parametrize("name, index", [("model.layers.3.mlp.up_proj", 3), ("model.layers.7", 7),
                                         ("base_model.model.model.layers.12.self_attn.q_proj.lora_B.weight", 12),
                                         ("lm_head", None), ("model.mylayers.3.x", None), ("layers.0.mlp", 0)])
def test_the_layer_index_of_a_module_or_tensor_name_is_read_one_way(name, index):
    from mscp.core.adapter import layer_index

    assert layer_index(name) == index
