"""`patch()`: the whole MSCP pipeline, streamed one decoder layer at a time.

    1. capture: embed the calibration prompts in the base and aligned models
    2. one pass over the layers, advancing three streams together:
         base     (harmful + benign prompts)  -> curves
         aligned  (harmful + benign prompts)  -> curves, n^H on harmful tokens
         finetuned = aligned + LoRA (task prompts) -> n^T
       and scoring each LoRA module's rows as soon as its layer is loaded
    3. safety layers from the curves; safety rows S = top_q(I^H) \\ top_p(I^T) in those layers
    4. the masked low-rank projection of lora_B (`project.project_adapter`)
    5. OUT/ written atomically: adapter_config.json, adapter_model.safetensors, mscp_report.json
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mscp.adapter import Adapter, check_against_model
from mscp.checkpoint import config_files
from mscp.config import PatchConfig
from mscp.errors import MSCPError
from mscp.kernels import select, use_backend
from mscp.localize import BENIGN, HARMFUL, CurveRecorder, safety_layers
from mscp.project import edit_fraction, project_adapter
from mscp.prompts import default_prompts, encode, load_tokenizer, make_batches, read_prompts
from mscp.report import (check_out_dir, input_checksums, package_versions, write_adapter_atomically)
from mscp.scoring import ChannelStats, apply_lora, record_inputs, row_scores, safety_rows
from mscp.streaming import ModelShell, hooks


@dataclass
class PatchResult:
    report: dict
    tensors: dict[str, torch.Tensor]  # the patched adapter's state dict
    scores: dict[str, dict[str, torch.Tensor]]  # lora_B key -> {"harmful": I^H, "task": I^T}


def patch(base, aligned, adapter, out=None, *, harmful=None, benign=None, task=None, prompts=None,
          tokenizer=None, config: PatchConfig | None = None, overwrite: bool = False, **overrides) -> PatchResult:
    """Repair a LoRA adapter with MSCP.

    base, aligned: model folders (safetensors, sharded or single); adapter: a peft LoRA folder.
    harmful (one or more files), benign, task: prompt files (.txt/.jsonl/.csv); the built-in sets
    are used when harmful/benign are absent, and benign stands in for task. `prompts` may give
    the sets as lists instead ({"harmful": [...], ...}). tokenizer: a folder (default: aligned).
    config: a PatchConfig; keyword overrides (q=..., layers=(10, 15), ...) replace its fields.
    out: where to write the patched adapter; None keeps it in memory only.
    """
    config = replace(config or PatchConfig(), **overrides) if overrides else (config or PatchConfig())
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise MSCPError("--device cuda requested but CUDA is not available")
    paths = {"base": Path(base), "aligned": Path(aligned), "adapter": Path(adapter)}
    if out is not None:
        inputs = [*paths.values(), *_as_paths(harmful), *_as_paths(benign), *_as_paths(task), *_as_paths(tokenizer)]
        check_out_dir(Path(out), overwrite, [p for p in inputs if p.exists()])
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    progress = (lambda it, **kw: tqdm(it, **kw)) if config.progress else None

    lora = Adapter.load(adapter, allow_pickle=config.allow_pickle)
    kw = dict(device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle)
    base_model = ModelShell(base, label="base", **kw)
    aligned_model = ModelShell(aligned, label="aligned", **kw)
    _check_same_architecture(base_model, aligned_model)
    if config.layers is not None and config.layers[1] >= base_model.n_layers:
        raise MSCPError(f"--layers {config.layers[0]}-{config.layers[1]} is outside the model's "
                        f"{base_model.n_layers} decoder layers (0-{base_model.n_layers - 1})")
    shapes = aligned_model.weight_shapes()
    check_against_model(lora, shapes.get)
    by_layer: dict[int, dict[str, object]] = {}
    for m in lora.modules.values():
        where = aligned_model.layer_of(m.module)
        if where is None:
            raise MSCPError(f"adapter module {m.module} is outside the decoder layers; mscp patches decoder-layer linears")
        by_layer.setdefault(where[0], {})[where[1]] = m

    sets, prompt_files = _prompt_sets(harmful, benign, task, prompts)
    tok = load_tokenizer(tokenizer or aligned)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def batches(named: list[tuple[str, int]]):
        seqs, groups = [], []
        for name, group in named:
            ids = encode(tok, sets[name], max_length=config.max_length, chat_template=config.chat_template)
            seqs += ids
            groups += [group] * len(ids)
        return make_batches(seqs, groups, config.batch_size, pad_id)

    calib = batches([("harmful", HARMFUL), ("benign", BENIGN)])
    task_batches = batches([("task", HARMFUL)])
    timings["load"] = time.perf_counter() - clock

    with use_backend(config.backend):
        clock = time.perf_counter()
        base_stream = base_model.capture({"calib": calib})["calib"]
        aligned_streams = aligned_model.capture({"calib": calib, "task": task_batches})
        aligned_stream, ft_stream = aligned_streams["calib"], aligned_streams["task"]
        groups = base_stream.groups()
        curves = CurveRecorder()
        curves.add(base_stream.last_tokens(), aligned_stream.last_tokens(), groups)
        timings["capture"] = time.perf_counter() - clock

        clock = time.perf_counter()
        scores: dict[str, dict[str, torch.Tensor]] = {}
        layer_iter = range(base_model.n_layers)
        for index in (progress(layer_iter, desc="layers", unit="layer") if progress else layer_iter):
            layer_b = base_model.load_layer(index)
            base_stream.advance(layer_b, index)
            del layer_b
            layer_a = aligned_model.load_layer(index)
            targets = by_layer.get(index, {})
            scores.update(_score_layer(layer_a, index, targets, lora, aligned_stream, ft_stream, config))
            del layer_a
            curves.add(base_stream.last_tokens(), aligned_stream.last_tokens(), groups)
        timings["stream"] = time.perf_counter() - clock
        del base_stream, aligned_stream, ft_stream, aligned_streams

        layer_curves = curves.curves()
        chosen = safety_layers(layer_curves, config)
        masks = {}
        for index in chosen:
            for m in by_layer.get(index, {}).values():
                s = scores[m.key_b]
                masks[m.key_b] = safety_rows(s["harmful"], s["task"], config.q, config.p)

        clock = time.perf_counter()
        tensors, edits = project_adapter(lora, base_model.ckpt, aligned_model.ckpt, masks, alpha=config.alpha,
                                         projector=config.projector, exact_rank=config.exact_rank,
                                         device=config.device, backend=config.backend, progress=progress)
        timings["project"] = time.perf_counter() - clock
        backends = {op: select(op, torch.device(config.device).type)[0]
                    for op in ("mscp::channel_sumsq", "mscp::row_importance", "mscp::lowrank_project")}

    files = {"base": base_model.ckpt.files + config_files(base_model.ckpt.path),
             "aligned": aligned_model.ckpt.files + config_files(aligned_model.ckpt.path),
             "adapter": lora.files, **prompt_files}
    report = {
        "mscp_version": package_versions()["mscp"],
        "safety_layers": chosen,
        "n_layers": base_model.n_layers,
        "layer_curves": layer_curves,
        "modules": {k: e.to_dict() for k, e in sorted(edits.items())},
        "edit_fraction": edit_fraction(lora, edits),
        "edited_parameters": sum(e.edited_parameters for e in edits.values()),
        "lora_parameters": lora.n_parameters(),
        "skipped_modules": sorted(k for k, e in edits.items() if e.skipped),
        "prompts": {name: len(p) for name, p in sets.items()},
        "prompt_sources": {name: [str(f) for f in prompt_files.get(f"prompts:{name}", [])] or "built-in or in-memory"
                           for name in sets},
        "adapter": {"target_modules": lora.config.get("target_modules"), "modules": len(lora.modules),
                    "r": lora.config.get("r"), "lora_alpha": lora.config.get("lora_alpha")},
        "config": config.to_dict(),
        "backends": backends,
        "compute_dtype": str(base_model.dtype).removeprefix("torch."),
        "timings_s": timings,
        "versions": package_versions(),
        "inputs_sha256": input_checksums(files) if config.hash_inputs else "not computed (hash_inputs=False)",
        "paths": {k: str(v) for k, v in paths.items()},
    }
    if out is not None:
        write_adapter_atomically(Path(out), lora.config, tensors, report, overwrite)
    return PatchResult(report, tensors, scores)


@torch.no_grad()
def _score_layer(layer, index, targets, lora: Adapter, aligned_stream, ft_stream, config) -> dict:
    """Advance the aligned and fine-tuned streams through `layer` and score its LoRA modules."""
    linears = {}
    for rel in targets:
        module = layer.get_submodule(rel)
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            raise MSCPError(f"adapter module layers.{index}.{rel} is not a linear layer")
        linears[rel] = module
    device = next(layer.parameters()).device
    harmful_stats = {rel: ChannelStats(linears[rel].weight.shape[1], device) for rel in targets}
    task_stats = {rel: ChannelStats(linears[rel].weight.shape[1], device) for rel in targets}
    current = [None]

    def harmful_tokens(batch):
        current[0] = (batch.token_mask & (batch.group == HARMFUL)[:, None]).to(device)

    def all_tokens(batch):
        current[0] = batch.token_mask.to(device)

    with hooks(record_inputs(linears, harmful_stats, current)):
        aligned_stream.advance(layer, index, on_batch=harmful_tokens)
    dtype = next(layer.parameters()).dtype
    lora_weights = {rel: (lora.tensors[m.key_a].to(device, dtype), lora.tensors[m.key_b].to(device, dtype), m.scale)
                    for rel, m in targets.items()}
    with hooks(apply_lora(linears, lora_weights) + record_inputs(linears, task_stats, current)):
        ft_stream.advance(layer, index, on_batch=all_tokens)

    out = {}
    for rel, m in targets.items():
        W = linears[rel].weight
        A, B = lora.tensors[m.key_a].to(device), lora.tensors[m.key_b].to(device)
        out[m.key_b] = {
            "harmful": row_scores(W, harmful_stats[rel].rms()).cpu(),
            "task": row_scores(W, task_stats[rel].rms(), B, A, m.scale).cpu(),
        }
    return out


def _check_same_architecture(base: ModelShell, aligned: ModelShell) -> None:
    if base.config.model_type != aligned.config.model_type:
        raise MSCPError(f"base ({base.config.model_type}) and aligned ({aligned.config.model_type}) are different architectures")
    if base.n_layers != aligned.n_layers:
        raise MSCPError(f"base has {base.n_layers} decoder layers, aligned has {aligned.n_layers}")
    b, a = base.weight_shapes(), aligned.weight_shapes()
    for key in sorted(set(a) | set(b)):
        if b.get(key) != a.get(key):
            raise MSCPError(f"base and aligned differ in shape at {key}: {b.get(key)} vs {a.get(key)}")


def _as_paths(x) -> list[Path]:
    """None, one path, or several paths -> a list of paths."""
    if x is None:
        return []
    return [Path(x)] if isinstance(x, (str, Path)) else [Path(f) for f in x]


def _prompt_sets(harmful, benign, task, prompts) -> tuple[dict[str, list[str]], dict[str, list[Path]]]:
    prompts = dict(prompts or {})
    files = {"harmful": _as_paths(harmful), "benign": _as_paths(benign), "task": _as_paths(task)}
    sets: dict[str, list[str]] = {}
    for name in ("harmful", "benign", "task"):
        if files[name]:
            sets[name] = [p for f in files[name] for p in read_prompts(f)]
        elif prompts.get(name) is not None:
            sets[name] = [p.strip() for p in prompts[name] if p and p.strip()]
            if not sets[name]:
                raise MSCPError(f"the {name} prompt list is empty")
        elif name in ("harmful", "benign"):
            sets[name] = default_prompts(name)
    if "task" not in sets:
        sets["task"] = sets["benign"]
    return sets, {f"prompts:{k}": v for k, v in files.items() if v}
