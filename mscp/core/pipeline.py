"""`patch()` and `patch_many()`: the whole MSCP pipeline, streamed one decoder layer at a time.

    1. capture: embed the calibration prompts in the base and aligned models
    2. one pass over the layers (the next layer is read ahead in a thread), advancing the streams:
         base     (harmful + benign prompts)  -> curves
         aligned  (harmful + benign prompts)  -> curves, n^H on harmful tokens
         finetuned = aligned + LoRA (task prompts), one stream per adapter -> n^T
       and scoring each LoRA module's rows as soon as its layer is loaded. With several adapters
       the fine-tuned streams run instead in a second pass, after the window is known and only
       up to its last layer (config.finetuned_pass)
    3. safety layers from the curves; safety rows S = top_q(I^H) \\ top_p(I^T) in those layers
    4. the masked low-rank projection of lora_B (`project.project_adapters`: each weight read once)
    5. OUT/ written atomically: adapter_config.json, adapter_model.safetensors, mscp_report.json
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mscp.core.adapter import Adapter, LoraModule, check_against_model
from mscp.core.attribution import attribution_scores, attribution_scores_many, greedy_answers
from mscp.core.cache import ResultCache, files_sha256
from mscp.core.checkpoint import config_files, resolve_model_path
from mscp.core.config import PatchConfig, PathArg, PromptFiles, PromptLists, check_arguments
from mscp.core.localize import BENIGN, HARMFUL, TASK, Curves, safety_layers
from mscp.core.project import project_for, rows_from
from mscp.core.prompts import (
    check_token_ids,
    default_prompts,
    encode,
    eos_ids,
    load_tokenizer,
    make_batches,
    pad_id,
    read_prompts,
    sample_prompts,
)
from mscp.core.reads import WeightReads
from mscp.core.report import (
    REPORT_NAME,
    build_report,
    check_cache_dir,
    check_out_dir,
    input_checksums,
    package_versions,
    prompt_sources,
    write_adapter_atomically,
)
from mscp.core.scoring import LoraAdded, WandaScores, global_safety_rows, safety_rows, top_rows, weight_safety_mass
from mscp.core.sequential import Step, advance_with, sweep
from mscp.core.streaming import InMemoryModel, ModelShell, Stream, resident_budget
from mscp.errors import MSCPError, log, warn
from mscp.kernels import prepare, record_backends, use_backend


@dataclass
class PatchResult:
    report: dict
    tensors: dict[str, torch.Tensor]  # the patched adapter's state dict
    scores: dict[str, dict[str, torch.Tensor]]  # lora_B key -> {"harmful": I^H, "task": I^T}
    adapter_config: dict | None = None  # the input adapter's adapter_config.json
    model_card: str | None = None  # the input adapter's README.md, if it had one

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the repaired adapter as `mscp patch` writes OUT (adapter_config.json, the weights,
        mscp_report.json, report.html and the model card with its mscp section), atomically; peft's
        `PeftModel.from_pretrained` loads it. The record travels with the weights."""
        if not isinstance(folder, (str, Path)) or not str(folder):
            raise MSCPError(f"save needs a folder path, got {type(folder).__name__}")
        if self.adapter_config is None:
            raise MSCPError("this result has no adapter_config to save with (made by an older mscp?)")
        out = Path(folder)
        check_out_dir(out, overwrite, [], parents=True)
        write_adapter_atomically(out, self.adapter_config, self.tensors, self.report, overwrite, self.model_card,
                                 parents=True)
        return out


@dataclass
class _AdapterRun:
    """Per-adapter state of a pass: its modules by layer, task-score observer and scores."""

    path: Path | None
    lora: Adapter | None
    by_layer: dict[int, dict[str, LoraModule]]
    task_scores: WandaScores | None = None
    scores: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # what a score records beside the rows (attribution)
    every_row: tuple | None = None  # (tensors, edits) of every row projected (attribution), for the final rows


def patch(base: PathArg | InMemoryModel, aligned: PathArg | InMemoryModel, adapter: PathArg | Adapter,
          out: PathArg | None = None, *, harmful: PromptFiles | None = None, benign: PromptFiles | None = None,
          task: PromptFiles | None = None, prompts: PromptLists | None = None, tokenizer: PathArg | None = None,
          config: PatchConfig | None = None, overwrite: bool = False, revision: str | None = None,
          cache: PathArg | None = None, **overrides: Any) -> PatchResult:
    """Repair a LoRA adapter with MSCP.

    base, aligned: model folders (safetensors, sharded or single) or hub ids; adapter: a peft LoRA
    folder or hub id ('org/name', 'org/name@rev'; `revision` pins an adapter id given without one).
    harmful (one or more files), benign, task: prompt files (.txt/.jsonl/.csv); the built-in sets
    are used when harmful/benign are absent, and benign stands in for task. `prompts` may give
    the sets as lists instead ({"harmful": [...], ...}). tokenizer: a folder (default: aligned).
    config: a PatchConfig; keyword overrides (q=..., layers=(10, 15), ...) replace its fields.
    out: where to write the patched adapter; None keeps it in memory only.
    cache: a folder that keeps what depends on base, aligned and the prompts alone (the layer
    curves, the aligned model's answers to the harmful prompts) for the next patch (core/cache.py).
    """
    check_arguments(adapter=(adapter, "path", Adapter), out=(out, "path?"))
    return patch_many(base, aligned, [adapter], None if out is None else [out], harmful=harmful, benign=benign,
                      task=task, prompts=prompts, tokenizer=tokenizer, config=config, overwrite=overwrite,
                      revision=revision, cache=cache, **overrides)[0]


@dataclass
class Localization:
    """Everything the streamed pass computes before anything is projected."""

    base_model: ModelShell
    aligned_model: ModelShell
    runs: list[_AdapterRun]  # one per adapter, with its scores
    layer_curves: list[dict]
    safety_layers: list[int]
    sets: dict[str, list[str]]  # prompt sets by name
    prompt_files: dict[str, list[Path]]
    timings: dict
    sampled: dict[str, dict] = field(default_factory=dict)  # prompt sets over config.max_prompts, sampled
    cache: dict = field(default_factory=dict)  # what came from the result cache ("hit") or went into it ("stored")
    reads: WeightReads | None = None  # bytes of base and aligned weights read, stage by stage


def localize(base, aligned, adapters: Sequence[PathArg | Adapter], *, harmful=None, benign=None, task=None,
             prompts=None, tokenizer=None, config: PatchConfig, revision: str | None = None,
             cache=None) -> Localization:
    """Levels 1 and 2: the layer curves, the safety layers, and each adapter's row scores (harmful
    and task) of its LoRA modules, by config.score. Nothing is projected.

    Wanda scores are recorded as the streams pass: with config.finetuned_pass 'with_calibration'
    (one pass) in every layer, or those up to the last of config.layers when it is given; with
    'after_window' (a second pass for the fine-tuned streams), in the safety layers only. The
    attribution score needs the window first: it runs after the curves (core/attribution.py).
    With no adapter, only the curves and the window are computed (`safety_window`). With a `cache`
    folder holding these curves, the base model is not run at all (nor the aligned one, unless the
    Wanda score needs its stream).
    """
    timings: dict = {"score": config.score}
    clock = time.perf_counter()
    progress = progress_bar(config)
    base_model, aligned_model = open_models(base, aligned, config)
    reads = WeightReads(base_model.ckpt, aligned_model.ckpt)
    runs = [open_run(a, aligned_model, config, revision) for a in adapters]
    sets, prompt_files, sampled = prompt_sets(harmful, benign, task, prompts, config.max_prompts)
    tok = load_tokenizer(tokenizer_path(tokenizer, aligned_model))
    calib = encode_batches(tok, [(sets["harmful"], HARMFUL), (sets["benign"], BENIGN)], config)
    task_batches = encode_batches(tok, [(sets["task"], TASK)], config)
    check_token_ids(tok, calib + task_batches, getattr(aligned_model.config, "vocab_size", None),
                    {HARMFUL: "harmful", BENIGN: "benign", TASK: "task"})
    wanda = config.score in ("wanda", "wanda_weight") and bool(runs)
    after_window = wanda and finetuned_pass(config, len(runs)) == "after_window"
    timings["finetuned_pass"] = "after_window" if after_window else "with_calibration" if wanda else "none"
    in_memory = base_model.ckpt.path is None or aligned_model.ckpt.path is None
    store = ResultCache(cache) if cache is not None and not in_memory else None  # no files, no key
    curve_key = None
    if store is not None:
        curve_key = {"base": files_sha256(model_files(base_model)), "aligned": files_sha256(model_files(aligned_model)),
                     "harmful": encode(tok, sets["harmful"], max_length=config.max_length, chat_template=config.chat_template),
                     "benign": encode(tok, sets["benign"], max_length=config.max_length, chat_template=config.chat_template),
                     "batch_size": config.batch_size, "dtype": str(base_model.dtype), "device": str(base_model.device)}
    layer_curves = store.get("curves", curve_key) if store is not None else None
    timings["load"] = time.perf_counter() - clock

    with use_backend(config.backend):
        timings["kernels_load"] = prepare(torch.device(config.device).type)  # a first C++ build is not layer time
        clock = time.perf_counter()
        need_base = layer_curves is None
        task_stream = None
        if need_base or wanda:
            base_stream = base_model.capture({"calib": calib})["calib"] if need_base else None
            aligned_streams = aligned_model.capture({"calib": calib, "task": task_batches} if wanda else {"calib": calib})
            aligned_stream, task_stream = aligned_streams["calib"], aligned_streams.get("task")
            del aligned_streams
            curves = Curves(base_stream, aligned_stream) if need_base else None
            harmful_scores = WandaScores(aligned_stream, target_names(runs), group=HARMFUL)  # shared by every adapter
            timings["capture"] = time.perf_counter() - clock

            # With the safety layers given up front, no row after the window is ever selected: the
            # fine-tuned streams and the scoring stop at its last layer (the curves still cover all).
            last_scored = config.layers[1] if config.layers is not None else base_model.n_layers - 1
            observers: list = ([curves] if curves else []) + ([harmful_scores] if wanda else [])
            finetuned = start_finetuned_streams(runs, task_stream, observers) if wanda and not after_window else []
            steps = []
            for index in range(base_model.n_layers):  # base 0, aligned 0, base 1, ...
                if need_base:
                    steps.append(Step(base_model, index, [base_stream]))
                scored = index <= last_scored
                steps.append(Step(aligned_model, index, [aligned_stream] + (finetuned if scored else []),
                                  release=finetuned if index == last_scored else []))
            harmful_scores.layers = set(range(last_scored + 1))
            times = sweep(steps, advance_with(observers), progress=progress, desc="layers")
            reads.mark("stream")
            timings["stream"] = times.total
            timings["layers"], timings["layers_waiting_for_io"] = times.per_index(steps)
            if base_stream is not None:
                base_stream.release()
            aligned_stream.release()
            if curves is not None:
                layer_curves = curves.curves()
                if store is not None:
                    store.put("curves", curve_key, layer_curves)
        window = safety_layers(layer_curves, config)
        if after_window:
            observers = []
            finetuned = start_finetuned_streams(runs, task_stream, observers, layers=window)
            steps = [Step(aligned_model, index, finetuned) for index in range(window[-1] + 1)]
            times = sweep(steps, advance_with(observers), progress=progress, desc="fine-tuned")
            reads.mark("stream_finetuned")
            timings["stream_finetuned"] = times.total
            timings["finetuned_layers"] = times.steps
        del task_stream
        if wanda:
            for run in runs:
                run.scores = scores_by_key(run, harmful_scores, run.task_scores, layers=window if after_window else None)
        elif runs:
            attribution_pass(base_model, aligned_model, runs, sets, tok, window, config, timings, reads, store)
    reads.mark("other")  # the embedding and the head, read on first use
    return Localization(base_model, aligned_model, runs, layer_curves, window, sets, prompt_files, timings, sampled,
                        {"folder": str(store.folder.resolve()), **store.used} if store is not None else
                        {"not used": "a model is in memory (no files to key it by)"} if cache is not None else {},
                        reads)


def safety_window(base, aligned, *, harmful=None, benign=None, prompts=None, tokenizer=None,
                  config: PatchConfig) -> tuple[list[int], list[dict]]:
    """Level 1 alone: (the safety layers, the layer curves) of base and aligned, no adapter needed.
    The same window `patch` chooses for any adapter on these prompts (the curves see no LoRA)."""
    loc = localize(base, aligned, [], harmful=harmful, benign=benign, prompts=prompts, tokenizer=tokenizer,
                   config=config)
    return loc.safety_layers, loc.layer_curves


def attribution_pass(base_model: ModelShell, aligned_model: ModelShell, runs: list[_AdapterRun], sets: dict, tok,
                     window: list[int], config: PatchConfig, timings: dict, reads: WeightReads,
                     store: ResultCache | None = None) -> None:
    """The attribution scores of each adapter's modules in the window (core/attribution.py): the
    aligned model's answers to the harmful prompts are generated once; the edit of every row (the
    projection of all rows) and the forward and backward pass over those answers run for every
    adapter together, each weight read once; then per adapter its own answers to the task prompts
    and their pass. At p = 0 no task row is ever removed, so the task side (a third of the time)
    is skipped."""
    mark = reads.mark
    head = aligned_model.head()
    mark("other")  # the final norm and the output embedding
    harmful = encode(tok, sets["harmful"], max_length=config.max_length, chat_template=config.chat_template)
    task = encode(tok, sets["task"], max_length=config.max_length, chat_template=config.chat_template)
    gen = greedy_options(tok, aligned_model, config)
    clock = time.perf_counter()
    key = None if store is None else {
        "aligned": files_sha256(model_files(aligned_model)), "harmful": harmful, "tokens": config.target_tokens,
        "eos": sorted(gen["eos"]), "pad": gen["pad_id"], "batch_size": config.batch_size,
        "dtype": str(aligned_model.dtype), "device": str(aligned_model.device)}
    refusals = store.get("targets_harmful", key) if store is not None else None
    if refusals is None:
        refusals = greedy_answers(aligned_model, head, harmful, config.target_tokens, **gen)
        if store is not None:
            store.put("targets_harmful", key, refusals)
    mark("targets_harmful")
    timings["targets_harmful"] = time.perf_counter() - clock
    scored = set(window)
    # every row's edit, for every adapter in one projection call: each weight is read once for all
    clock = time.perf_counter()
    every_row = [{m.key_b: torch.arange(run.lora.tensors[m.key_b].shape[0])
                  for index in window for m in run.by_layer.get(index, {}).values()} for run in runs]
    projected_all = project_for(config, [run.lora for run in runs], base_model.ckpt, aligned_model.ckpt, every_row)
    mark("edits_all_rows")
    timings["edits_all_rows"] = time.perf_counter() - clock
    loras, all_edits = [], []
    for run, rows, (projected, edits) in zip(runs, every_row, projected_all):
        run.every_row = (projected, edits)  # the final projection takes its rows from here
        loras.append((run.lora, run.by_layer))
        all_edits.append({key: projected[key].float() - run.lora.tensors[key].float() for key in rows})
    common = {k: gen[k] for k in ("batch_size", "pad_id", "progress")}
    # the harmful side: every adapter's forward and backward pass with each layer loaded once for all
    clock = time.perf_counter()
    harmful_side = attribution_scores_many(aligned_model, head, harmful, refusals, loras, all_edits, scored, **common)
    mark("attribution")
    timings["attribution"] = time.perf_counter() - clock
    for run, lora, edits, (a_harmful, ll_harmful) in zip(runs, loras, all_edits, harmful_side):
        run.scores = {m.key_b: {"harmful": a_harmful[index][rel]}
                      for index in window for rel, m in run.by_layer.get(index, {}).items()}
        run.details = {"targets_loglik": {"harmful": ll_harmful}, "target_tokens": {"harmful": sum(map(len, refusals))}}
        if config.p > 0:  # each adapter's own answers to the task prompts: its own pass
            clock = time.perf_counter()
            answers = greedy_answers(aligned_model, head, task, config.target_tokens, lora=lora, **gen)
            mark("targets_task")
            timings["targets_task"] = time.perf_counter() - clock
            clock = time.perf_counter()
            a_task, ll_task = attribution_scores(aligned_model, head, task, answers, lora, edits, scored, **common)
            mark("attribution_task")
            timings["attribution_task"] = time.perf_counter() - clock
            for index in window:
                for rel, m in run.by_layer.get(index, {}).items():
                    run.scores[m.key_b]["task"] = a_task[index][rel]
            run.details["targets_loglik"]["task"] = ll_task
            run.details["target_tokens"]["task"] = sum(map(len, answers))
        else:
            run.details["task"] = "not scored: p = 0 removes no task rows"


def greedy_options(tok, model: ModelShell, config: PatchConfig) -> dict:
    """What every greedy decoding of a patch shares (attribution.greedy_answers): the EOS and pad
    rules, the batch size, the progress bar and the budget of layers kept across tokens."""
    return dict(eos=eos_ids(tok, model.config), batch_size=config.batch_size, pad_id=pad_id(tok),
                progress=progress_bar(config), resident_bytes=resident_budget(config.resident_gb, model.device))


def select_masks(run: _AdapterRun, window: list[int], config: PatchConfig, aligned_ckpt) -> dict[str, torch.Tensor]:
    """The rows to project of each of the run's modules in the window, by config.score."""
    modules = {m.key_b: m for index in window for m in run.by_layer.get(index, {}).values()}
    return select_rows(config, {k: run.scores[k] for k in modules}, modules, run.lora.tensors, aligned_ckpt)


def select_rows(config: PatchConfig, scores: dict[str, dict], modules: dict[str, LoraModule], tensors: dict,
                aligned_ckpt) -> dict[str, torch.Tensor]:
    """Level 2's selection (docs/method.md) for the modules given (lora_B key -> scores, module):
    wanda: top_q(I^H) minus top_p(I^T) per module; wanda_weight: the top q rows by safety-only mass
    per module; attribution: the top q of all rows together minus the top p by task damage."""
    if config.score == "attribution":
        return global_safety_rows({k: scores[k]["harmful"] for k in modules},
                                  {k: scores[k].get("task") for k in modules}, config.q, config.p)
    masks = {}
    for key, m in modules.items():
        sc = scores[key]
        if config.score == "wanda":
            masks[key] = safety_rows(sc["harmful"], sc["task"], config.q, config.p)
        else:
            mass = weight_safety_mass(aligned_ckpt.get(m.weight_key, check=False, mapped=True), sc["rms_harmful"],
                                      sc["rms_task"], config.q, config.p, tensors[m.key_b], tensors[m.key_a], m.scale)
            top = top_rows(mass, config.q)
            masks[key] = torch.sort(top[mass[top] > 0]).values
    return masks


def finetuned_pass(config: PatchConfig, n_adapters: int) -> str:
    """config.finetuned_pass with 'auto' resolved (see PatchConfig)."""
    if config.finetuned_pass != "auto":
        return config.finetuned_pass
    return "after_window" if n_adapters > 1 and config.layers is None else "with_calibration"


def target_names(runs: list[_AdapterRun]) -> dict[int, set[str]]:
    """layer index -> names inside the layer of the modules some adapter targets."""
    names: dict[int, set[str]] = {}
    for run in runs:
        for index, mods in run.by_layer.items():
            names.setdefault(index, set()).update(mods)
    return names


def start_finetuned_streams(runs: list[_AdapterRun], task_stream: Stream, observers: list, layers=None) -> list[Stream]:
    """Each adapter's fine-tuned stream starts from the aligned model's capture of the task prompts
    (the embedding does not see the LoRA); its LoRA and its I^T scoring join the observers."""
    streams = []
    for k, run in enumerate(runs):
        stream = task_stream if k == len(runs) - 1 else task_stream.copy()
        run.task_scores = WandaScores(stream, {i: set(m) for i, m in run.by_layer.items()},
                                      lora=(run.lora, run.by_layer), layers=layers)
        observers += [LoraAdded(stream, run.lora, run.by_layer), run.task_scores]
        streams.append(stream)
    return streams


def scores_by_key(run: _AdapterRun, harmful: WandaScores, task: WandaScores, layers=None) -> dict[str, dict]:
    """lora_B key -> {"harmful": I^H, "task": I^T, "rms_harmful": n^H, "rms_task": n^T} for the run's
    modules scored in both passes (in `layers`)."""
    out = {}
    for index, mods in run.by_layer.items():
        if layers is not None and index not in layers:
            continue
        for rel, m in mods.items():
            if rel in harmful.scores.get(index, {}) and rel in task.scores.get(index, {}):
                out[m.key_b] = {"harmful": harmful.scores[index][rel], "task": task.scores[index][rel],
                                "rms_harmful": harmful.rms[index][rel], "rms_task": task.rms[index][rel]}
    return out


def patch_many(base: PathArg | InMemoryModel, aligned: PathArg | InMemoryModel, adapters: Sequence[PathArg | Adapter],
               outs: Sequence[PathArg] | None = None, *, harmful: PromptFiles | None = None,
               benign: PromptFiles | None = None, task: PromptFiles | None = None, prompts: PromptLists | None = None,
               tokenizer: PathArg | None = None, config: PatchConfig | None = None, overwrite: bool = False,
               revision: str | None = None, report_extra: Sequence[dict[str, Any]] | None = None,
               parents: bool = False, cache: PathArg | None = None, **overrides: Any) -> list[PatchResult]:
    """`patch` for several adapters of the same aligned model, reading base and aligned once.

    The base and aligned streams, the curves and the harmful scores are shared; each adapter gets
    its own fine-tuned stream, task scores, masks and output. Each result equals patching that
    adapter alone. report_extra: per adapter, more keys for its report (the batch runner's). parents:
    create the outputs' missing parent folders (only when writing them). cache: as in `patch`.
    """
    check_arguments(base=(base, "path", InMemoryModel), aligned=(aligned, "path", InMemoryModel),
                    adapters=(adapters, "[path]", Adapter), outs=(outs, "[path]?"), harmful=(harmful, "files?"),
                    benign=(benign, "files?"), task=(task, "files?"), prompts=(prompts, "prompts?"),
                    tokenizer=(tokenizer, "path?"), config=(config, "config?"), overwrite=(overwrite, "bool"),
                    revision=(revision, "str?"), parents=(parents, "bool"), cache=(cache, "path?"))
    config = (config or PatchConfig()).replace(**overrides) if overrides else (config or PatchConfig())
    if not adapters:
        raise MSCPError("no adapter given")
    if outs is not None and len(outs) != len(adapters):
        raise MSCPError("one output folder per adapter is needed")
    inputs = [*as_paths([x for x in (base, aligned, *adapters, tokenizer) if isinstance(x, (str, Path))]),
              *as_paths(harmful), *as_paths(benign), *as_paths(task)]
    inputs = [p for p in inputs if p.exists()]
    if outs is not None:
        if len({Path(o).resolve() for o in outs}) != len(outs):
            raise MSCPError("two adapters would be written to the same output folder")
        for out in outs:
            check_out_dir(out, overwrite, inputs, parents=parents)
    if cache is not None:
        check_cache_dir(cache, inputs, outs or [])

    with record_backends() as backends:
        loc = localize(base, aligned, adapters, harmful=harmful, benign=benign, task=task, prompts=prompts,
                       tokenizer=tokenizer, config=config, revision=revision, cache=cache)
        timings, chosen, runs = dict(loc.timings), loc.safety_layers, loc.runs
        base_model, aligned_model = loc.base_model, loc.aligned_model
        masks = [select_masks(run, chosen, config, aligned_model.ckpt) for run in runs]
        with use_backend(config.backend):
            clock = time.perf_counter()
            if all(run.every_row is not None for run in runs):  # the attribution pass projected every row
                projected = [rows_from(run.lora, run.every_row, mask) for run, mask in zip(runs, masks)]
            else:
                projected = project_for(config, [run.lora for run in runs], base_model.ckpt, aligned_model.ckpt,
                                        masks, progress=progress_bar(config))
            loc.reads.mark("project")
            timings["project"] = time.perf_counter() - clock

    sets, prompt_files = loc.sets, loc.prompt_files
    shared_files = {"base": model_files(base_model), "aligned": model_files(aligned_model), **prompt_files}
    shared_sums = input_checksums(shared_files) if config.hash_inputs else None
    versions = package_versions()
    results = []
    for k, (run, (tensors, edits)) in enumerate(zip(runs, projected)):
        lora = run.lora
        report = build_report(
            config=config.to_dict(), safety_layers=chosen, n_layers=base_model.n_layers, layer_curves=loc.layer_curves,
            modules={key: e.to_dict() for key, e in edits.items()}, lora_parameters=lora.n_parameters(),
            prompts={name: len(p) for name, p in sets.items()}, prompt_sources=prompt_sources(sets, prompt_files),
            backends=dict(sorted(backends.items())), compute_dtype=str(base_model.dtype).removeprefix("torch."),
            timings=timings, versions=versions,
            inputs_sha256=({**shared_sums, **input_checksums({"adapter": lora.files})} if config.hash_inputs
                           else "not computed (hash_inputs=False)"),
            paths=report_paths(base_model, aligned_model, run, adapters[k], tokenizer),
            adapter={"target_modules": lora.config.get("target_modules"), "modules": len(lora.modules),
                     "r": lora.config.get("r"), "lora_alpha": lora.config.get("lora_alpha"),
                     "base_model_name_or_path": lora.config.get("base_model_name_or_path")},
            passed_through=passed_through(lora),
            adapters_in_pass=len(runs), torch_threads=torch.get_num_threads(),
            **({"score_details": run.details} if run.details else {}),
            **({"prompts_sampled": loc.sampled} if loc.sampled else {}),
            **({"cache": loc.cache} if loc.cache else {}),
            **(report_extra[k] if report_extra else {}),
            bytes_read={"base": base_model.ckpt.bytes_read, "aligned": aligned_model.ckpt.bytes_read},
            weight_reads=loc.reads.record())
        for warning in report["warnings"]:  # the CLI prints them from the report; a library routes them
            log.warning("%s: %s", report["paths"].get("adapter", "adapter"), warning)
        config_file, card = adapter_config_file(lora), model_card(lora)
        if outs is not None:
            write_adapter_atomically(Path(outs[k]), config_file, tensors, report, overwrite, card, parents=parents)
        results.append(PatchResult(report, tensors, run.scores, adapter_config=config_file, model_card=card))
    return results


def harmful_scores(aligned_model: ModelShell, tok, prompts: list[str], targets: dict[int, dict[str, LoraModule]],
                   config: PatchConfig, *, lora: tuple | None = None, edits: dict | None = None) -> dict[str, dict]:
    """The harmful-side scores of one prompt set (a continual dimension) for the modules in
    `targets` (layer -> name -> module): lora_B key -> {"harmful": ...} and, for the Wanda scores,
    "rms_harmful". Wanda streams the aligned model alone up to the last layer with targets; the
    attribution score runs the fine-tuned model, so it needs the adapter and its modules by layer
    (`lora`, every layer's) and each targeted row's edit (`edits`, lora_B key -> E)."""
    with use_backend(config.backend):
        if config.score == "attribution":
            head = aligned_model.head()
            ids = encode(tok, prompts, max_length=config.max_length, chat_template=config.chat_template)
            gen = greedy_options(tok, aligned_model, config)
            refusals = greedy_answers(aligned_model, head, ids, config.target_tokens, **gen)
            common = {k: gen[k] for k in ("batch_size", "pad_id", "progress")}
            scores, _ = attribution_scores(aligned_model, head, ids, refusals, lora, edits, set(targets), **common)
            return {m.key_b: {"harmful": scores[index][rel]} for index, mods in targets.items()
                    for rel, m in mods.items()}
        stream = aligned_model.capture({"harmful": encode_batches(tok, [(prompts, HARMFUL)], config)})["harmful"]
        wanda = WandaScores(stream, {index: set(mods) for index, mods in targets.items()}, group=HARMFUL)
        steps = [Step(aligned_model, index, [stream]) for index in range(max(targets, default=-1) + 1)]
        sweep(steps, advance_with([wanda]), progress=progress_bar(config), desc="layers")
    return {m.key_b: {"harmful": wanda.scores[index][rel], "rms_harmful": wanda.rms[index][rel]}
            for index, mods in targets.items() for rel, m in mods.items()}


# -- shared steps (also used by mscp.continual) ------------------------------------------------
def progress_bar(config: PatchConfig):
    return (lambda it=None, **kw: tqdm(it, **kw)) if config.progress else None


def open_models(base, aligned, config: PatchConfig) -> tuple[ModelShell, ModelShell]:
    """Both model shells, checked to be the same architecture and to hold config.layers."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise MSCPError("--device cuda requested but CUDA is not available")
    kw = dict(device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle)
    base_model = ModelShell(base, label="base", **kw)
    aligned_model = ModelShell(aligned, label="aligned", **kw)
    check_same_architecture(base_model, aligned_model)
    if config.layers is not None and config.layers[1] >= base_model.n_layers:
        raise MSCPError(f"--layers {config.layers[0]}-{config.layers[1]} is outside the model's "
                        f"{base_model.n_layers} decoder layers (0-{base_model.n_layers - 1})")
    return base_model, aligned_model


def encode_batches(tok, named: list[tuple[list[str], int]], config: PatchConfig) -> list:
    """Micro-batches of several prompt lists, each labelled with its group."""
    pad = pad_id(tok)
    seqs, groups = [], []
    for texts, group in named:
        ids = encode(tok, texts, max_length=config.max_length, chat_template=config.chat_template)
        seqs += ids
        groups += [group] * len(ids)
    return make_batches(seqs, groups, config.batch_size, pad)


def modules_by_layer(lora: Adapter, aligned_model: ModelShell) -> dict[int, dict[str, LoraModule]]:
    """layer index -> module name inside the layer -> LoRA module."""
    by_layer: dict[int, dict[str, LoraModule]] = {}
    for m in lora.modules.values():
        where = aligned_model.layer_of(m.module)
        if where is None:
            raise MSCPError(f"adapter module {m.module} is outside the decoder layers; mscp patches decoder-layer linears")
        by_layer.setdefault(where[0], {})[where[1]] = m
    return by_layer


def _open_adapter(path, aligned_model: ModelShell, config: PatchConfig, revision: str | None = None):
    """(Adapter, its modules by layer), checked against the model: from a folder, a hub id or an
    `Adapter` already in memory (the peft API)."""
    lora = path if isinstance(path, Adapter) else Adapter.load(path, allow_pickle=config.allow_pickle, revision=revision)
    if lora.path is not None and (lora.path / REPORT_NAME).is_file():
        warn(f"adapter {lora.path} was already repaired by mscp (it holds {REPORT_NAME}); projecting it again "
             "moves its rows further from the fine-tune")
    check_against_model(lora, aligned_model.weight_shapes().get)
    return lora, modules_by_layer(lora, aligned_model)


def open_run(adapter, aligned_model: ModelShell, config: PatchConfig, revision: str | None = None) -> _AdapterRun:
    lora, by_layer = _open_adapter(adapter, aligned_model, config, revision)
    return _AdapterRun(lora.path, lora, by_layer)


def tokenizer_path(tokenizer, aligned_model: ModelShell):
    """The tokenizer's folder: `tokenizer` (a folder or hub id), else the aligned model's folder."""
    if tokenizer is not None:
        return resolve_model_path(tokenizer, "tokenizer")
    if aligned_model.ckpt.path is None:
        raise MSCPError("the aligned model is in memory: give the tokenizer (a folder or hub id)")
    return aligned_model.ckpt.path


def model_files(model: ModelShell) -> list[Path]:
    """A model's checkpoint and config files, for the report's checksums (none when in memory)."""
    path = model.ckpt.path
    return model.ckpt.files + (config_files(path) if path is not None else [])


def report_paths(base_model: ModelShell, aligned_model: ModelShell, run: _AdapterRun, given, tokenizer) -> dict:
    """The report's `paths`: absolute, or what an in-memory input is; a hub id beside its snapshot."""
    def where(path, memory: str):
        return str(Path(path).absolute()) if path is not None else memory

    out = {"base": where(base_model.ckpt.path, "in memory"),
           "aligned": where(aligned_model.ckpt.path, getattr(aligned_model, "description", "in memory")),
           "adapter": where(run.path, "in memory")}
    if isinstance(given, (str, Path)) and not Path(given).exists():
        out["adapter_hub_id"] = str(given)
    if tokenizer is not None:
        out["tokenizer"] = str(tokenizer) if not Path(tokenizer).exists() else str(Path(tokenizer).absolute())
    return out


def passed_through(lora: Adapter) -> dict:
    """What the adapter carries besides LoRA pairs (modules_to_save copies...), copied unchanged."""
    lora_keys = {k for m in lora.modules.values() for k in (m.key_a, m.key_b)}
    return {"modules_to_save": list(lora.config.get("modules_to_save") or []),
            "tensors": sorted(set(lora.tensors) - lora_keys)}


def adapter_config_file(lora: Adapter) -> bytes | dict:
    """adapter_config.json as the input holds it, byte for byte (OUT copies it unchanged); the
    parsed config for an adapter in memory, or a file that changed since it was read."""
    path = lora.path / "adapter_config.json" if lora.path is not None else None
    try:
        data = path.read_bytes() if path is not None else None
        if data is not None and json.loads(data) == lora.config:
            return data
    except (OSError, ValueError):
        pass
    return lora.config


def model_card(lora: Adapter) -> str | None:
    """The input adapter's model card (README.md), if it has one."""
    card = lora.path / "README.md" if lora.path is not None else None
    return card.read_text(encoding="utf-8", errors="replace") if card is not None and card.is_file() else None


def check_same_architecture(base: ModelShell, aligned: ModelShell) -> None:
    if base.config.model_type != aligned.config.model_type:
        raise MSCPError(f"base ({base.config.model_type}) and aligned ({aligned.config.model_type}) are different architectures")
    if base.n_layers != aligned.n_layers:
        raise MSCPError(f"base has {base.n_layers} decoder layers, aligned has {aligned.n_layers}")
    b, a = base.weight_shapes(), aligned.weight_shapes()
    for key in sorted(set(a) | set(b)):
        if b.get(key) != a.get(key):
            raise MSCPError(f"base and aligned differ in shape at {key}: {b.get(key)} vs {a.get(key)}")


def as_paths(x) -> list[Path]:
    """None, one path, or several paths -> a list of paths."""
    if x is None:
        return []
    return [Path(x)] if isinstance(x, (str, Path)) else [Path(f) for f in x]


def prompt_sets(harmful, benign, task, prompts, max_prompts: int | None = None
                ) -> tuple[dict[str, list[str]], dict[str, list[Path]], dict[str, dict]]:
    """The harmful, benign and task prompts; sets over max_prompts are sampled (prompts.sample_prompts).
    Returns (sets, files by role, what was sampled by set)."""
    prompts = dict(prompts or {})
    files = {"harmful": as_paths(harmful), "benign": as_paths(benign), "task": as_paths(task)}
    sets: dict[str, list[str]] = {}
    sampled: dict[str, dict] = {}
    for name in ("harmful", "benign", "task"):
        if files[name]:
            sets[name] = [p for f in files[name] for p in read_prompts(f)]
        elif prompts.get(name) is not None:
            if isinstance(prompts[name], str) or not all(isinstance(p, str) for p in prompts[name]):
                raise MSCPError(f"the {name} prompts must be a list of strings")
            sets[name] = [p.strip() for p in prompts[name] if p and p.strip()]
            if not sets[name]:
                raise MSCPError(f"the {name} prompt list is empty")
        elif name in ("harmful", "benign"):
            sets[name] = default_prompts(name)
        if name in sets and max_prompts is not None:
            sets[name], info = sample_prompts(sets[name], max_prompts, name)
            if info:
                sampled[name] = info
    if "task" not in sets:
        sets["task"] = sets["benign"]
    return sets, {f"prompts:{k}": v for k, v in files.items() if v}, sampled
