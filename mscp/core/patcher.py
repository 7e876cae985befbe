"""The staged patcher: what a patch opens once, and its stages as methods.

    patcher = Patcher.open(base, aligned, adapters, harmful=..., config=config, cache=...)
    window = patcher.localize()                  # level 1: curves and safety layers, for every adapter
    patcher.score(patcher.runs)                  # level 2: each adapter's row scores (run.scores)
    masks = [patcher.select(run) for run in patcher.runs]     # the one row-selection rule
    projected = patcher.project(patcher.runs, masks)          # the masked low-rank projection
    results = [patcher.result(run, p) for run, p in zip(patcher.runs, projected)]

`Patcher.open` reads the models' headers, the adapters, the prompts and the tokenizer, and looks
up the result cache; no layer runs before `localize`. One sweep over the layers advances the
base and aligned streams (the curves) and, with the Wanda scores in one pass (finetuned_pass
'with_calibration'), the fine-tuned streams and their observers too, so each weight is read once:
`score` then only collects what they recorded. With 'after_window' the fine-tuned streams run in
`score`, up to the window's last layer; the attribution score runs there too.

`Patcher(config, aligned_model=..., window=...)` alone selects rows from scores computed before
(`mscp tune`'s candidates, the harness's methods, `mscp continual add`), by the same `select`.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mscp.core.adapter import Adapter, LoraModule, check_against_model, layer_index
from mscp.core.attribution import (SetScores, attribution_scores, attribution_scores_sets, greedy_answers,
                                   scored_greedy_answers)
from mscp.core.budget import REFUSAL_OPENING, benign_refusal_targets, choose_budgets
from mscp.core.cache import ResultCache, files_sha256
from mscp.core.checkpoint import config_files, resolve_model_path
from mscp.core.config import PatchConfig
from mscp.core.localize import BENIGN, HARMFUL, TASK, Curves, safety_layers
from mscp.core.project import ModuleEdit, project_for, project_module, projection_options, rows_from
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
    check_out_dir,
    input_checksums,
    package_versions,
    prompt_sources,
    write_adapter_atomically,
)
from mscp.core.scoring import (LoraAdded, WandaScores, global_safety_rows, safety_rank, safety_rows, top_rows,
                                weight_safety_mass)
from mscp.core.sequential import Observer, Step, advance_with, sweep
from mscp.core.streaming import ModelShell, Stream, resident_budget
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


# -- the stages' results ------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """`localize`: the safety layers, chosen from the layer curves (shared by every adapter)."""

    safety_layers: list[int]
    layer_curves: list[dict] = field(default_factory=list)


@dataclass
class Scores:
    """`score`, for one adapter: its modules' row scores and what the score records beside them."""

    rows: dict[str, dict[str, torch.Tensor]]  # lora_B key -> {"harmful": I^H, "task": I^T, "rms_*": n}
    details: dict = field(default_factory=dict)  # the attribution score's log-likelihoods, token counts
    every_row: tuple | None = None  # (tensors, edits) of every window row projected (attribution): `project` copies
    budget: int | None = None  # the adaptive budget's row count (config.adaptive_budget), else None: q decides


@dataclass(frozen=True)
class Projected:
    """`project`, for one adapter: its patched state dict and each projected module's edit."""

    tensors: dict[str, torch.Tensor]
    edits: dict[str, ModuleEdit]


@dataclass
class AdapterRun:
    """One adapter through the stages: its modules by layer, then its scores."""

    lora: Adapter
    by_layer: dict[int, dict[str, LoraModule]]  # layer index -> name inside the layer -> module
    given: object = None  # the adapter as the caller gave it (a folder, a hub id, an Adapter): the report's paths
    scores: Scores | None = None
    task_observer: WandaScores | None = None  # I^T of its fine-tuned stream, while that stream runs

    @classmethod
    def of_scores(cls, lora: Adapter, rows: dict[str, dict[str, torch.Tensor]]) -> AdapterRun:
        """A run from scores kept elsewhere (a finished patch's, a stored pass): the scored modules,
        in the adapter's order, by the layer index their names carry."""
        by_layer: dict[int, dict[str, LoraModule]] = {}
        for m in lora.modules.values():
            if m.key_b in rows:
                by_layer.setdefault(layer_index(m.module), {})[m.module] = m
        return cls(lora, by_layer, scores=Scores(rows))


class EveryRowEdits(Observer):
    """The projection of every row of each targeted module (the attribution score's edits), computed
    in the sweep while the module's layer of both models is loaded: base i's weights are held until
    aligned i arrives, then both go to `project_module`, the call `project_for` makes, and only the
    projected B (d_out x r) and the edit are kept. The weights are the tensors `project_for` reads
    (the aligned checkpoint's dtype, on the compute device: `Patcher._every_row_observer` checks it
    before the sweep, and a module whose weights differ is left out, so the separate stage runs),
    so the result is `project_for`'s bit for bit (tests/test_reads.py). Costs one more layer of
    base weights held while aligned i's projections run."""

    def __init__(self, runs: list[AdapterRun], targets: dict[int, list[tuple[int, str, LoraModule]]],
                 base: Stream, aligned: Stream, sources: tuple, options: dict):
        self.runs, self.targets = runs, targets  # layer index -> (adapter, name inside the layer, module)
        self.base, self.aligned = base, aligned
        self.sources, self.options = sources, options  # (base, aligned) checkpoints; project_module's settings
        self.projected: list[dict[str, tuple]] = [{} for _ in runs]  # lora_B key -> (B' or None, edit)
        self.seconds = 0.0
        self._held: dict[str, torch.Tensor] = {}

    def before(self, stream, index, layer):
        mods = self.targets.get(index)
        if not mods:
            return
        if stream is self.base:
            self._held = {rel: layer.get_parameter(f"{rel}.weight").detach() for _, rel, _ in mods}
            return
        if stream is not self.aligned:
            return
        clock = time.perf_counter()
        held, self._held = self._held, {}
        aligned_ckpt = self.sources[1]
        for k, rel, m in mods:
            W_a = layer.get_parameter(f"{rel}.weight").detach()
            if rel not in held or W_a.dtype != aligned_ckpt.dtype(m.weight_key):
                continue  # not the tensor project_for reads: left to the separate stage
            B = self.runs[k].lora.tensors[m.key_b]
            self.projected[k][m.key_b] = project_module(W_a, held[rel].to(W_a.dtype), m, B, torch.arange(B.shape[0]),
                                                        sources=self.sources, **self.options)
        del held
        self.seconds += time.perf_counter() - clock

    def results(self) -> list[tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]]:
        """Per adapter, what `project_adapters` returns for every row of the modules projected."""
        out = []
        for run, projected in zip(self.runs, self.projected):
            tensors, edits = dict(run.lora.tensors), {}
            by_b = run.lora.by_b_key()
            for key_b in sorted(projected, key=lambda key: by_b[key].weight_key):  # project_adapters' order
                B_new, edits[key_b] = projected[key_b]
                if B_new is not None:
                    tensors[key_b] = B_new
            out.append((tensors, edits))
        return out


# -- the patcher ---------------------------------------------------------------------------------
_NEEDS = {"base_model": "the models", "aligned_model": "the aligned model", "tok": "the tokenizer",
          "window": "the safety window (localize, or window=)"}


class Patcher:
    """What a patch opens once (models, tokenizer, prompts, result cache, weight reads, backends)
    and the stages that use it; see the module docstring."""

    def __init__(self, config: PatchConfig, *, aligned_model: ModelShell | None = None, tok=None,
                 window: Window | None = None):
        """A patcher that selects rows (and, with the aligned model and tokenizer, scores a prompt
        set's harmful side: `score_harmful`); `Patcher.open` makes one for every stage."""
        self.config = config
        self.aligned_model = aligned_model  # wanda_weight's selection reads its weights
        self.tok = tok
        self.window = window
        self.progress = (lambda it=None, **kw: tqdm(it, **kw)) if config.progress else None
        self.backends: dict[str, str] = {}  # op -> the kernel backend that ran it, over every stage
        self.timings: dict = {"score": config.score}
        self.base_model: ModelShell | None = None
        self.runs: list[AdapterRun] = []
        self.reads: WeightReads | None = None
        self.every_row_in_stream: EveryRowEdits | None = None  # the sweep's projection of every window row

    @classmethod
    def open(cls, base, aligned, adapters: Sequence = (), *, harmful=None, benign=None, task=None, prompts=None,
             tokenizer=None, config: PatchConfig, revision: str | None = None, cache=None) -> Patcher:
        """Both models, the adapters (checked against them), the prompt sets and their micro-batches,
        the tokenizer and the result cache. With no adapter only `localize` has work to do. cache: a
        folder keeping the curves and the aligned model's answers between patches (core/cache.py);
        not used when a model is in memory (no files to key it by)."""
        clock = time.perf_counter()
        self = cls(config)
        self.base_model, self.aligned_model = open_models(base, aligned, config)
        self.reads = WeightReads(self.base_model.ckpt, self.aligned_model.ckpt)
        self.runs = [self.open_run(a, revision) for a in adapters]
        self.sets, self.prompt_files, self.sampled = prompt_sets(harmful, benign, task, prompts, config.max_prompts)
        self.tokenizer = tokenizer
        self.tok = load_tokenizer(tokenizer_path(tokenizer, self.aligned_model))
        self.calib = self._batches([(self.sets["harmful"], HARMFUL), (self.sets["benign"], BENIGN)])
        self.task_batches = self._batches([(self.sets["task"], TASK)])
        check_token_ids(self.tok, self.calib + self.task_batches, getattr(self.aligned_model.config, "vocab_size", None),
                        {HARMFUL: "harmful", BENIGN: "benign", TASK: "task"})
        self.wanda = config.score in ("wanda", "wanda_weight") and bool(self.runs)
        self.after_window = self.wanda and finetuned_pass(config, len(self.runs)) == "after_window"
        self.timings["finetuned_pass"] = ("after_window" if self.after_window else
                                          "with_calibration" if self.wanda else "none")
        in_memory = self.base_model.ckpt.path is None or self.aligned_model.ckpt.path is None
        self.cache_asked = cache is not None
        self.store = ResultCache(cache) if cache is not None and not in_memory else None
        self._curve_key = self._curves_key() if self.store is not None else None
        self._cached_curves = self.store.get("curves", self._curve_key) if self.store is not None else None
        self._harmful_observer: WandaScores | None = None
        self._task_stream: Stream | None = None
        self._shared_sums: dict | None = None
        self._versions: dict | None = None
        self.timings["load"] = time.perf_counter() - clock
        return self

    def open_run(self, adapter, revision: str | None = None) -> AdapterRun:
        """An adapter (a folder, a hub id, or an `Adapter` already in memory) checked against the
        aligned model, its modules by decoder layer."""
        self._needs("open_run", "aligned_model")
        lora = (adapter if isinstance(adapter, Adapter) else
                Adapter.load(adapter, allow_pickle=self.config.allow_pickle, revision=revision))
        if lora.path is not None and (lora.path / REPORT_NAME).is_file():
            warn(f"adapter {lora.path} was already repaired by mscp (it holds {REPORT_NAME}); projecting it again "
                 "moves its rows further from the fine-tune")
        check_against_model(lora, self.aligned_model.weight_shapes().get)
        return AdapterRun(lora, modules_by_layer(lora, self.aligned_model), given=adapter)

    def _needs(self, stage: str, *parts: str) -> None:
        """One line instead of an AttributeError when a stage runs on a patcher that lacks what it
        reads: `Patcher(config, ...)` alone selects rows; the other stages need `Patcher.open`."""
        missing = [part for part in parts if getattr(self, part, None) is None]
        if missing:
            raise MSCPError(f"Patcher.{stage} needs {' and '.join(_NEEDS.get(m, m) for m in missing)}: this patcher was "
                            "made without them (Patcher(config, ...) only selects rows; use Patcher.open)")

    @contextlib.contextmanager
    def _kernels(self):
        """A stage's kernels: the configured backend, and which backend ran each op (the reports')."""
        with record_backends() as used, use_backend(self.config.backend):
            yield
        self.backends.update(used)

    def _batches(self, named: list[tuple[list[str], int]]) -> list:
        """Micro-batches of several prompt lists, each labelled with its group."""
        config = self.config
        seqs, groups = [], []
        for texts, group in named:
            ids = self._encode(texts)
            seqs += ids
            groups += [group] * len(ids)
        return make_batches(seqs, groups, config.batch_size, pad_id(self.tok))

    def _encode(self, texts: list[str]) -> list:
        return encode(self.tok, texts, max_length=self.config.max_length, chat_template=self.config.chat_template)

    def _curves_key(self) -> dict:
        """What the curves depend on: the model files, the calibration prompts' tokens, the settings."""
        base, aligned = self.base_model, self.aligned_model
        return {"base": files_sha256(model_files(base)), "aligned": files_sha256(model_files(aligned)),
                "harmful": self._encode(self.sets["harmful"]), "benign": self._encode(self.sets["benign"]),
                "batch_size": self.config.batch_size, "dtype": str(base.dtype), "device": str(base.device)}

    # -- level 1 ---------------------------------------------------------------------------------
    def localize(self) -> Window:
        """The layer curves (from the cache, or one sweep of base and aligned) and the safety layers.
        The sweep also runs when the Wanda scores need the aligned stream (with the cache's curves,
        the base model is not run): their observers ride it (see the module docstring)."""
        self._needs("localize", "base_model")
        config, timings = self.config, self.timings
        with self._kernels():
            timings["kernels_load"] = prepare(torch.device(config.device).type)  # a first C++ build is not layer time
            layer_curves = self._cached_curves
            if layer_curves is None or self.wanda:
                curves = self._sweep(need_base=layer_curves is None)
                if curves is not None:
                    layer_curves = curves.curves()
                    if self.store is not None:
                        self.store.put("curves", self._curve_key, layer_curves)
            self.window = Window(safety_layers(layer_curves, config), layer_curves)
        self.reads.mark("other")  # the embedding and the head, read on first use
        return self.window

    def _sweep(self, need_base: bool) -> Curves | None:
        """One pass over the layers (base 0, aligned 0, base 1, ...): the curves when `need_base`,
        and with the Wanda scores the harmful-side observer (shared by every adapter) and, in one
        pass, each adapter's fine-tuned stream and task observer."""
        timings, clock = self.timings, time.perf_counter()
        base_model, aligned_model = self.base_model, self.aligned_model
        base_stream = base_model.capture({"calib": self.calib})["calib"] if need_base else None
        aligned_streams = aligned_model.capture({"calib": self.calib, "task": self.task_batches} if self.wanda
                                                else {"calib": self.calib})
        aligned_stream, self._task_stream = aligned_streams["calib"], aligned_streams.get("task")
        del aligned_streams
        curves = Curves(base_stream, aligned_stream) if need_base else None
        self._harmful_observer = WandaScores(aligned_stream, target_names(self.runs), group=HARMFUL)
        timings["capture"] = time.perf_counter() - clock

        # With the safety layers given up front, no row after the window is ever selected: the
        # fine-tuned streams and the scoring stop at its last layer (the curves still cover all).
        last_scored = self.config.layers[1] if self.config.layers is not None else base_model.n_layers - 1
        observers: list = ([curves] if curves else []) + ([self._harmful_observer] if self.wanda else [])
        self.every_row_in_stream = self._every_row_observer(base_stream, aligned_stream)
        if self.every_row_in_stream is not None:
            observers.append(self.every_row_in_stream)
        finetuned = (self._start_finetuned(self.runs, observers) if self.wanda and not self.after_window else [])
        steps = []
        for index in range(base_model.n_layers):
            if need_base:
                steps.append(Step(base_model, index, [base_stream]))
            scored = index <= last_scored
            steps.append(Step(aligned_model, index, [aligned_stream] + (finetuned if scored else []),
                              release=finetuned if index == last_scored else []))
        self._harmful_observer.layers = set(range(last_scored + 1))
        times = sweep(steps, advance_with(observers), progress=self.progress, desc="layers")
        self.reads.mark("stream")
        timings["stream"] = times.total
        timings["layers"], timings["layers_waiting_for_io"] = times.per_index(steps)
        if base_stream is not None:
            base_stream.release()
        aligned_stream.release()
        return curves

    def _every_row_observer(self, base_stream: Stream | None, aligned_stream: Stream) -> EveryRowEdits | None:
        """The attribution score's projection of every row of the window's modules, folded into the
        sweep (`EveryRowEdits`) where the window is known before it (config.layers, or a rho whose
        window is every layer) and the layers' weights are the tensors `project_for` reads (the
        aligned checkpoint's own dtype in both models' streams); else None: `_score_attribution`
        projects them in a stage of its own, reading W_a and W_b again."""
        config, base_model, aligned_model = self.config, self.base_model, self.aligned_model
        if config.score != "attribution" or not self.runs or base_stream is None:
            return None
        n = base_model.n_layers
        if config.layers is not None:
            window = range(config.layers[0], config.layers[1] + 1)
        elif round(config.rho * n) >= n:  # localize.safety_layers: a window as wide as the model
            window = range(n)
        else:
            return None  # chosen from the curves, known only after the sweep
        targets = {index: [(k, rel, m) for k, run in enumerate(self.runs)
                           for rel, m in run.by_layer.get(index, {}).items()] for index in window}
        targets = {index: mods for index, mods in targets.items() if mods}
        modules = [m for mods in targets.values() for _, _, m in mods]
        if not modules or any(aligned_model.ckpt.dtype(m.weight_key) != aligned_model.dtype for m in modules) \
                or base_model.dtype != aligned_model.dtype or base_model.device != aligned_model.device:
            return None  # the stream's layers are cast: not the tensors the projection reads
        return EveryRowEdits(self.runs, targets, base_stream, aligned_stream, (base_model.ckpt, aligned_model.ckpt),
                             {**projection_options(config), "device": torch.device(config.device or "cpu")})

    def _start_finetuned(self, runs: list[AdapterRun], observers: list, layers=None) -> list[Stream]:
        """Each adapter's fine-tuned stream starts from the aligned model's capture of the task prompts
        (the embedding does not see the LoRA); its LoRA and its I^T scoring join the observers."""
        streams = []
        for k, run in enumerate(runs):
            stream = self._task_stream if k == len(runs) - 1 else self._task_stream.copy()
            run.task_observer = WandaScores(stream, {i: set(m) for i, m in run.by_layer.items()},
                                            lora=(run.lora, run.by_layer), layers=layers)
            observers += [LoraAdded(stream, run.lora, run.by_layer), run.task_observer]
            streams.append(stream)
        return streams

    # -- level 2: scores -------------------------------------------------------------------------
    def score(self, runs: list[AdapterRun]) -> None:
        """Each run's row scores (run.scores), by config.score, after `localize`. Wanda: I^H and I^T
        of the modules scored in both streams (with 'after_window', its second pass over the safety
        layers first); attribution: `_score_attribution`."""
        self._needs("score", "base_model", "window")
        window = self.window.safety_layers
        with self._kernels():
            if self.after_window:
                observers: list = []
                finetuned = self._start_finetuned(runs, observers, layers=window)
                steps = [Step(self.aligned_model, index, finetuned) for index in range(window[-1] + 1)]
                times = sweep(steps, advance_with(observers), progress=self.progress, desc="fine-tuned")
                self.reads.mark("stream_finetuned")
                self.timings["stream_finetuned"] = times.total
                self.timings["finetuned_layers"] = times.steps
            self._task_stream = None
            if self.wanda:
                for run in runs:
                    run.scores = Scores(scores_by_key(run, self._harmful_observer, run.task_observer,
                                                      layers=window if self.after_window else None))
            elif runs:
                self._score_attribution(runs)
        self.reads.mark("other")

    def _score_attribution(self, runs: list[AdapterRun]) -> None:
        """The attribution scores of each adapter's modules in the window (core/attribution.py): the
        aligned model's answers to the harmful prompts are generated once; the edit of every row (the
        projection of all rows) and the forward and backward pass over those answers run for every
        adapter together, each weight read once; then per adapter its own answers to the task prompts
        and their pass. At p = 0 no task row is ever removed, so the task side (a third of the time)
        is skipped."""
        # every stage below runs the aligned model: layers loaded by one stay loaded for the next, up to
        # the resident budget (a model that fits is read once for all of them)
        with self.aligned_model.resident(self._greedy()["resident_bytes"]):
            self._score_attribution_stages(runs)

    def _score_attribution_stages(self, runs: list[AdapterRun]) -> None:
        config, timings, mark, window = self.config, self.timings, self.reads.mark, self.window.safety_layers
        head = self.aligned_model.head()
        mark("other")  # the final norm and the output embedding
        harmful, task = self._encode(self.sets["harmful"]), self._encode(self.sets["task"])
        gen = self._greedy()
        refusals, refusal_logliks = self._refusals(head, harmful, gen)
        scored = set(window)
        # every row's edit, for every adapter: computed in localize's sweep while each layer was loaded
        # (EveryRowEdits, nothing read here), else in one projection call, each weight read once for all
        clock = time.perf_counter()
        every_row = [{m.key_b: torch.arange(run.lora.tensors[m.key_b].shape[0])
                      for index in window for m in run.by_layer.get(index, {}).values()} for run in runs]
        in_stream, self.every_row_in_stream = self.every_row_in_stream, None
        projected_all = in_stream.results() if in_stream is not None else None
        if projected_all is not None and all(edits.keys() == rows.keys()
                                             for (_, edits), rows in zip(projected_all, every_row)):
            timings["edits_all_rows_in_stream"] = in_stream.seconds  # part of the stream's time
        else:
            projected_all = project_for(config, [run.lora for run in runs], self.base_model.ckpt,
                                        self.aligned_model.ckpt, every_row)
            mark("edits_all_rows")
            timings["edits_all_rows"] = time.perf_counter() - clock
        loras, all_edits = [], []
        for run, rows, (projected, edits) in zip(runs, every_row, projected_all):
            run.scores = Scores({}, every_row=(projected, edits))  # the final projection takes its rows from here
            loras.append((run.lora, run.by_layer))
            all_edits.append({key: projected[key].float() - run.lora.tensors[key].float() for key in rows})
        common = {k: gen[k] for k in ("batch_size", "pad_id", "progress")}
        # the harmful side: every adapter's forward and backward pass with each layer loaded once for all;
        # the benign prompts with the aligned model's usual refusal opening in the same pass (scored for
        # benign_penalty; forward only for the adaptive budget's references, whose refusal openings come
        # from the same forward pass). The aligned model's own references: on the harmful prompts from
        # the logits that chose its refusals; on the benign ones it rides along as one more stream.
        clock = time.perf_counter()
        adaptive = config.adaptive_budget
        benign = self._encode(self.sets["benign"]) if adaptive or config.benign_penalty else []
        sets = [(harmful, refusals)] + ([(benign, benign_refusal_targets(refusals, len(benign)))] if benign else [])
        aligned_stream = int(adaptive and bool(benign))  # the aligned model alone, over the benign prompts
        per_adapter = attribution_scores_sets(self.aligned_model, head, sets, loras + [None] * aligned_stream,
                                              all_edits + [{}] * aligned_stream, scored,
                                              opening=REFUSAL_OPENING if adaptive else None,
                                              unscored=frozenset() if config.benign_penalty else frozenset({1}),
                                              alone=frozenset({1}), **common)
        aligned_side = None
        if adaptive:
            aligned_side = [SetScores({}, sum(map(sum, refusal_logliks)), torch.tensor(
                [sum(each[:REFUSAL_OPENING]) for each in refusal_logliks], dtype=torch.float64))]
            aligned_side += per_adapter.pop()[1:] if aligned_stream else []
        mark("attribution")
        timings["attribution"] = time.perf_counter() - clock
        for run, lora, edits, per_set in zip(runs, loras, all_edits, per_adapter):
            scores = run.scores
            a_harmful, ll_harmful = per_set[0].scores, per_set[0].total
            scores.rows = {m.key_b: {"harmful": a_harmful[index][rel]}
                           for index in window for rel, m in run.by_layer.get(index, {}).items()}
            scores.details = {"targets_loglik": {"harmful": ll_harmful},
                              "target_tokens": {"harmful": sum(map(len, refusals))}}
            if config.benign_penalty and len(per_set) > 1:  # per harmful prompt, times as many: a_i's unit
                a_benign, ll_benign = per_set[1].scores, per_set[1].total
                scale = len(harmful) / len(benign)
                for index in window:
                    for rel, m in run.by_layer.get(index, {}).items():
                        scores.rows[m.key_b]["benign_refusal"] = a_benign[index][rel] * scale
                scores.details["targets_loglik"]["benign_refusal"] = ll_benign
            if config.p > 0:  # each adapter's own answers to the task prompts: its own pass
                clock = time.perf_counter()
                answers = greedy_answers(self.aligned_model, head, task, config.target_tokens, lora=lora, **gen)
                mark("targets_task")
                timings["targets_task"] = time.perf_counter() - clock
                clock = time.perf_counter()
                a_task, ll_task = attribution_scores(self.aligned_model, head, task, answers, lora, edits, scored,
                                                     **common)
                mark("attribution_task")
                timings["attribution_task"] = time.perf_counter() - clock
                for index in window:
                    for rel, m in run.by_layer.get(index, {}).items():
                        scores.rows[m.key_b]["task"] = a_task[index][rel]
                scores.details["targets_loglik"]["task"] = ll_task
                scores.details["target_tokens"]["task"] = sum(map(len, answers))
            else:
                scores.details["task"] = "not scored: p = 0 removes no task rows"
        if adaptive:
            clock = time.perf_counter()
            budgets = choose_budgets(self.aligned_model, head, sets, runs, [self._rank(run) for run in runs],
                                     aligned_side, per_adapter, config, **common)
            for run, budget in zip(runs, budgets):
                run.scores.budget = budget.rows
                run.scores.details["targets_loglik"]["aligned"] = aligned_side[0].total
                run.scores.details["budget"] = budget.to_dict()
            mark("budget_checks")
            timings["budget_checks"] = time.perf_counter() - clock

    def _rank(self, run: AdapterRun) -> dict[str, torch.Tensor]:
        """The attribution score's selection order of the run's rows (scoring.safety_rank)."""
        penalty = self.config.benign_penalty
        if penalty and any("benign_refusal" not in sc for sc in run.scores.rows.values()):
            raise MSCPError("benign_penalty needs each row's benign refusal score, and these scores were computed "
                            "without it (score with benign_penalty > 0, or select with benign_penalty 0)")
        return safety_rank(run.scores.rows, penalty)

    def _refusals(self, head, harmful: list, gen: dict) -> tuple[list, list]:
        """The aligned model's greedy answers to the harmful prompts, and its log-likelihood of each of
        their tokens: the result cache's, or generated."""
        clock = time.perf_counter()
        model, config, store = self.aligned_model, self.config, self.store
        key = None if store is None else {
            "aligned": files_sha256(model_files(model)), "harmful": harmful, "tokens": config.target_tokens,
            "eos": sorted(gen["eos"]), "pad": gen["pad_id"], "batch_size": config.batch_size,
            "dtype": str(model.dtype), "device": str(model.device)}
        cached = store.get("targets_harmful", key) if store is not None else None
        if _well_formed_refusals(cached, len(harmful)):  # else a miss: absent, or damaged into other JSON
            refusals, logliks = cached["answers"], cached["logliks"]
        else:
            refusals, logliks = scored_greedy_answers(model, head, harmful, config.target_tokens, **gen)
            if store is not None:
                store.put("targets_harmful", key, {"answers": refusals, "logliks": logliks})
        self.reads.mark("targets_harmful")
        self.timings["targets_harmful"] = time.perf_counter() - clock
        return refusals, logliks

    def _greedy(self) -> dict:
        """What every greedy decoding of a patch shares (attribution.greedy_answers): the EOS and pad
        rules, the batch size, the progress bar and the budget of layers kept across tokens."""
        model, config = self.aligned_model, self.config
        return dict(eos=eos_ids(self.tok, model.config), batch_size=config.batch_size, pad_id=pad_id(self.tok),
                    progress=self.progress, resident_bytes=resident_budget(config.resident_gb, model.device))

    def score_harmful(self, prompts: list[str], run: AdapterRun, edits: dict | None = None) -> dict[str, dict]:
        """The harmful-side scores of one prompt set (a continual dimension) for the run's modules in
        the window: lora_B key -> {"harmful": ...} and, for the Wanda scores, "rms_harmful". Wanda
        streams the aligned model alone up to the window's last layer; the attribution score runs
        the fine-tuned model (every module of the run) and needs each targeted row's edit (`edits`,
        lora_B key -> E). Needs only the aligned model and the tokenizer."""
        self._needs("score_harmful", "aligned_model", "tok", "window")
        config, model = self.config, self.aligned_model
        targets = {index: run.by_layer[index] for index in self.window.safety_layers if index in run.by_layer}
        with use_backend(config.backend):
            if config.score == "attribution":
                head = model.head()
                ids = self._encode(prompts)
                gen = self._greedy()
                refusals = greedy_answers(model, head, ids, config.target_tokens, **gen)
                common = {k: gen[k] for k in ("batch_size", "pad_id", "progress")}
                scores, _ = attribution_scores(model, head, ids, refusals, (run.lora, run.by_layer), edits,
                                               set(targets), **common)
                return {m.key_b: {"harmful": scores[index][rel]} for index, mods in targets.items()
                        for rel, m in mods.items()}
            stream = model.capture({"harmful": self._batches([(prompts, HARMFUL)])})["harmful"]
            wanda = WandaScores(stream, {index: set(mods) for index, mods in targets.items()}, group=HARMFUL)
            steps = [Step(model, index, [stream]) for index in range(max(targets, default=-1) + 1)]
            sweep(steps, advance_with([wanda]), progress=self.progress, desc="layers")
        return {m.key_b: {"harmful": wanda.scores[index][rel], "rms_harmful": wanda.rms[index][rel]}
                for index, mods in targets.items() for rel, m in mods.items()}

    # -- level 2: selection ----------------------------------------------------------------------
    def select(self, run: AdapterRun) -> dict[str, torch.Tensor]:
        """The rows to project of each of the run's modules in the safety window (docs/method.md):
        wanda: top_q(I^H) minus top_p(I^T) per module; wanda_weight: the top q rows by safety-only
        mass per module; attribution: the top q of all rows together (or the adaptive budget's count)
        minus the top p by task damage. The one selection rule: a patch, `mscp tune`, the harness's
        methods and continual add."""
        self._needs("select", "window", *(("aligned_model",) if self.config.score == "wanda_weight" else ()))
        if run.scores is None:
            raise MSCPError("Patcher.select needs the run's scores (run `score` first, or give them: AdapterRun.of_scores)")
        config, scores = self.config, run.scores.rows
        modules = {m.key_b: m for index in self.window.safety_layers for m in run.by_layer.get(index, {}).values()}
        if config.score == "attribution":
            rank = self._rank(run)
            return global_safety_rows({k: rank[k] for k in modules}, {k: scores[k].get("task") for k in modules},
                                      config.q, config.p, count=run.scores.budget)
        masks = {}
        for key, m in modules.items():
            sc = scores[key]
            if config.score == "wanda":
                masks[key] = safety_rows(sc["harmful"], sc["task"], config.q, config.p)
            else:
                W = self.aligned_model.ckpt.get(m.weight_key, check=False, mapped=True)
                mass = weight_safety_mass(W, sc["rms_harmful"], sc["rms_task"], config.q, config.p,
                                          run.lora.tensors[m.key_b], run.lora.tensors[m.key_a], m.scale)
                top = top_rows(mass, config.q)
                masks[key] = torch.sort(top[mass[top] > 0]).values
        return masks

    # -- projection and results ------------------------------------------------------------------
    def project(self, runs: list[AdapterRun], masks: list[dict[str, torch.Tensor]]) -> list[Projected]:
        """The masked low-rank projection of each run's lora_B rows, every adapter in one pass over
        the weights; rows the attribution pass already projected are copied, bit for bit (rows_from)."""
        self._needs("project", "base_model")
        with self._kernels():
            clock = time.perf_counter()
            if all(run.scores is not None and run.scores.every_row is not None for run in runs):
                projected = [rows_from(run.lora, run.scores.every_row, mask) for run, mask in zip(runs, masks)]
            else:
                projected = project_for(self.config, [run.lora for run in runs], self.base_model.ckpt,
                                        self.aligned_model.ckpt, masks, progress=self.progress)
            self.reads.mark("project")
            self.timings["project"] = time.perf_counter() - clock
        return [Projected(tensors, edits) for tensors, edits in projected]

    def result(self, run: AdapterRun, projected: Projected, extra: dict | None = None) -> PatchResult:
        """One adapter's PatchResult: its report (extra: more keys, the batch runner's or tune's), the
        patched tensors, its scores, and the input's adapter_config.json and model card to write."""
        self._needs("result", "base_model", "window")
        config, lora, base_model = self.config, run.lora, self.base_model
        if self._shared_sums is None and config.hash_inputs:
            self._shared_sums = input_checksums({"base": model_files(base_model),
                                                 "aligned": model_files(self.aligned_model), **self.prompt_files})
        if self._versions is None:
            self._versions = package_versions()
        report = build_report(
            config=config.to_dict(), safety_layers=self.window.safety_layers, n_layers=base_model.n_layers,
            layer_curves=self.window.layer_curves,
            modules={key: e.to_dict() for key, e in projected.edits.items()}, lora_parameters=lora.n_parameters(),
            prompts={name: len(p) for name, p in self.sets.items()},
            prompt_sources=prompt_sources(self.sets, self.prompt_files),
            backends=dict(sorted(self.backends.items())), compute_dtype=str(base_model.dtype).removeprefix("torch."),
            timings=self.timings, versions=self._versions,
            inputs_sha256=({**self._shared_sums, **input_checksums({"adapter": lora.files})} if config.hash_inputs
                           else "not computed (hash_inputs=False)"),
            paths=self._report_paths(run),
            adapter={"target_modules": lora.config.get("target_modules"), "modules": len(lora.modules),
                     "r": lora.config.get("r"), "lora_alpha": lora.config.get("lora_alpha"),
                     "base_model_name_or_path": lora.config.get("base_model_name_or_path")},
            passed_through=passed_through(lora),
            adapters_in_pass=len(self.runs), torch_threads=torch.get_num_threads(),
            **({"score_details": run.scores.details} if run.scores.details else {}),
            **({"prompts_sampled": self.sampled} if self.sampled else {}),
            **({"cache": self.cache_record()} if self.cache_asked else {}),
            **(extra or {}),
            bytes_read={"base": base_model.ckpt.bytes_read, "aligned": self.aligned_model.ckpt.bytes_read},
            weight_reads=self.reads.record())
        for warning in report["warnings"]:  # the CLI prints them from the report; a library routes them
            log.warning("%s: %s", report["paths"].get("adapter", "adapter"), warning)
        return PatchResult(report, projected.tensors, run.scores.rows, adapter_config=adapter_config_file(lora),
                           model_card=model_card(lora))

    def cache_record(self) -> dict:
        """The report's `cache`: what came from the result cache ("hit") or went into it ("stored")."""
        if self.store is None:
            return {"not used": "a model is in memory (no files to key it by)"}
        return {"folder": str(self.store.folder.resolve()), **self.store.used}

    def _report_paths(self, run: AdapterRun) -> dict:
        """The report's `paths`: absolute, or what an in-memory input is; a hub id beside its snapshot."""
        def where(path, memory: str):
            return str(Path(path).absolute()) if path is not None else memory

        tokenizer = self.tokenizer
        out = {"base": where(self.base_model.ckpt.path, "in memory"),
               "aligned": where(self.aligned_model.ckpt.path, getattr(self.aligned_model, "description", "in memory")),
               "adapter": where(run.lora.path, "in memory")}
        if isinstance(run.given, (str, Path)) and not Path(run.given).exists():
            out["adapter_hub_id"] = str(run.given)
        if tokenizer is not None:
            out["tokenizer"] = str(tokenizer) if not Path(tokenizer).exists() else str(Path(tokenizer).absolute())
        return out


# -- what the stages share -----------------------------------------------------------------------
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


def check_same_architecture(base: ModelShell, aligned: ModelShell) -> None:
    if base.config.model_type != aligned.config.model_type:
        raise MSCPError(f"base ({base.config.model_type}) and aligned ({aligned.config.model_type}) are different architectures")
    if base.n_layers != aligned.n_layers:
        raise MSCPError(f"base has {base.n_layers} decoder layers, aligned has {aligned.n_layers}")
    b, a = base.weight_shapes(), aligned.weight_shapes()
    for key in sorted(set(a) | set(b)):
        if b.get(key) != a.get(key):
            raise MSCPError(f"base and aligned differ in shape at {key}: {b.get(key)} vs {a.get(key)}")


def _well_formed_refusals(entry, n: int) -> bool:
    """A targets_harmful cache entry as `Patcher._refusals` stores it: n answers of token ids, each
    with one log-likelihood per token."""
    if not (isinstance(entry, dict) and isinstance(entry.get("answers"), list)
            and isinstance(entry.get("logliks"), list) and len(entry["answers"]) == len(entry["logliks"]) == n):
        return False
    return all(isinstance(a, list) and isinstance(ll, list) and len(a) == len(ll)
               and all(isinstance(t, int) for t in a) and all(isinstance(x, float) for x in ll)
               for a, ll in zip(entry["answers"], entry["logliks"]))


def modules_by_layer(lora: Adapter, aligned_model: ModelShell) -> dict[int, dict[str, LoraModule]]:
    """layer index -> module name inside the layer -> LoRA module."""
    by_layer: dict[int, dict[str, LoraModule]] = {}
    for m in lora.modules.values():
        where = aligned_model.layer_of(m.module)
        if where is None:
            raise MSCPError(f"adapter module {m.module} is outside the decoder layers; mscp patches decoder-layer linears")
        by_layer.setdefault(where[0], {})[where[1]] = m
    return by_layer


def finetuned_pass(config: PatchConfig, n_adapters: int) -> str:
    """config.finetuned_pass with 'auto' resolved (see PatchConfig)."""
    if config.finetuned_pass != "auto":
        return config.finetuned_pass
    return "after_window" if n_adapters > 1 and config.layers is None else "with_calibration"


def target_names(runs: list[AdapterRun]) -> dict[int, set[str]]:
    """layer index -> names inside the layer of the modules some adapter targets."""
    names: dict[int, set[str]] = {}
    for run in runs:
        for index, mods in run.by_layer.items():
            names.setdefault(index, set()).update(mods)
    return names


def scores_by_key(run: AdapterRun, harmful: WandaScores, task: WandaScores, layers=None) -> dict[str, dict]:
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
