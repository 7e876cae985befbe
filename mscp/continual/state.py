"""Continual projection over safety dimensions (docs/method.md, "Continual projection ..."; docs/continual.md).

A *state* directory holds what every later dimension reuses, and the adapter after each step:

    STATE/state.json          models, options, safety layers, curves, modules, dimensions (masks,
                              prompt checksums, config), the union P of projected rows, the history
                              (continual/record.py: the typed record, its schema version)
    STATE/b0/                 the input adapter, copied (B0: every projection starts from it)
    STATE/cache/scores.safetensors     task scores per LoRA module (task::KEY; rms_task::KEY for wanda_weight)
    STATE/cache/projected.safetensors  lora_B of every safety-layer module with *all* rows projected
                                       from B0 (B0 + alpha (C B0 - B0)); a step copies its new rows
    STATE/dims/NAME.safetensors        each dimension's harmful scores (harmful::KEY, rms_harmful::KEY)
    STATE/adapter/            the patched adapter after the last step (peft folder + mscp_report.json)
    STATE/figures/*.png       curves, per-dimension sizes and edit fractions, clustered overlap, layers

`init` runs the localisation work that does not depend on a dimension once: the base/aligned
curves and the safety layers (level 1, global), the task scores I^T of the fine-tuned model, and
the projection of every row of every safety-layer module from B0 (each row of C B0 depends on B0
and the module only, never on the mask). `add` then streams only the aligned model, only on the
dimension's harmful prompts and only up to the last safety layer, scores I^H, takes
S_k = top_q(I^H) minus top_p(I^T), and copies the rows S_k minus P from the cache into the adapter.
So the adapter after any set of dimensions is B0 with the union's rows projected, in any order;
rows already projected are never written again; a repeated dimension edits nothing.

Every update builds the new state in a temporary sibling folder and swaps it in (one atomic
renameat2(RENAME_EXCHANGE) where the kernel has it, else two renames), under an exclusive lock:
a failed or interrupted step leaves the previous state as it was. Inputs are only read.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file

from mscp.continual.analytics import (
    analytics,
    edit_fraction,
    edited_parameters,
    write_figures,
)
from mscp.continual.record import STATE_VERSION, Dimension, Module, State
from mscp.core.adapter import Adapter
from mscp.core.atomic import check_writable, link_tree, write_atomically
from mscp.core.checkpoint import config_files, sha256_file
from mscp.core.config import PatchConfig, config_from_mapping, with_overrides
from mscp.core.patcher import AdapterRun, Patcher, Scores, Window, as_paths, modules_by_layer
from mscp.core.prompts import load_tokenizer, read_prompts, sample_prompts
from mscp.core.report import (
    REPORT_NAME,
    build_report,
    check_out_dir,
    input_checksums,
    package_versions,
    prompt_sources,
    save_tensors,
)
from mscp.core.streaming import ModelShell
from mscp.core.textfiles import read_json_object
from mscp.errors import MSCPError

STATE_FILE = "state.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------
# init / add / status
# ---------------------------------------------------------------------------------------------
def init(base, aligned, adapter, out, *, harmful=None, benign=None, task=None, prompts=None, tokenizer=None,
         config: PatchConfig | None = None, overwrite: bool = False, figures: bool = True, **overrides) -> State:
    """Create a continual state in `out` (see the module docstring); returns its record.

    Takes what `mscp.patch` takes: harmful/benign prompts choose the safety layers (the curves),
    task prompts give I^T. No dimension is applied yet: STATE/adapter is B0.
    """
    config = with_overrides(config or PatchConfig(), overrides)
    # each dimension adds its top q rows by its own harmful score: the adaptive budget is a patch's, and
    # a dimension scores no benign prompts for the benign penalty to rank by
    config = replace(config, budget="fixed" if config.budget == "auto" else config.budget, benign_penalty=0.0)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise MSCPError("--device cuda requested but CUDA is not available")
    out = Path(out)
    paths = {"base": Path(base), "aligned": Path(aligned), "adapter": Path(adapter)}
    if tokenizer is not None:
        paths["tokenizer"] = Path(tokenizer)
    inputs = [*paths.values(), *as_paths(harmful), *as_paths(benign), *as_paths(task)]
    check_out_dir(out, overwrite, [p for p in inputs if p.exists()])
    started = time.perf_counter()
    patcher = Patcher.open(base, aligned, [adapter], harmful=harmful, benign=benign, task=task, prompts=prompts,
                           tokenizer=tokenizer, config=config)
    window = patcher.localize()
    patcher.score(patcher.runs)
    run = patcher.runs[0]
    lora, by_layer, scores = run.lora, run.by_layer, run.scores.rows
    candidates = {m.key_b: torch.arange(lora.tensors[m.key_b].shape[0])
                  for index in window.safety_layers for m in by_layer.get(index, {}).values()}
    done = patcher.project([run], [candidates])[0]  # each row of C B0 depends on B0 alone: `add` copies rows of it
    projected, edits = done.tensors, done.edits

    modules = {}
    for index, rels in sorted(by_layer.items()):
        for rel, m in sorted(rels.items()):
            e = edits.get(m.key_b)
            modules[m.key_b] = Module(module=m.module, layer=index, name=rel, d_out=lora.tensors[m.key_b].shape[0],
                                      rank=m.rank, safety_layer=index in window.safety_layers,
                                      norm_v=e.norm_v if e else None, skipped=e.skipped if e else None)
    files = {"base": patcher.base_model.ckpt.files + config_files(patcher.base_model.ckpt.path),
             "aligned": patcher.aligned_model.ckpt.files + config_files(patcher.aligned_model.ckpt.path),
             "adapter": lora.files, **patcher.prompt_files}
    if tokenizer is not None:
        files["tokenizer"] = [p for p in Path(tokenizer).iterdir() if p.is_file()] if Path(tokenizer).is_dir() else []
    state = State(
        format=STATE_VERSION,
        mscp_version=package_versions()["mscp"],
        created=_now(),
        paths={k: str(v.resolve()) if v.exists() else str(v) for k, v in paths.items()},
        config=config.to_dict(),
        n_layers=patcher.base_model.n_layers,
        safety_layers=window.safety_layers,
        layer_curves=window.layer_curves,
        modules=modules,
        lora_parameters=lora.n_parameters(),
        adapter_config=lora.config,
        prompts={name: len(p) for name, p in patcher.sets.items()},
        prompts_sha256={name: _prompts_sha256(p) for name, p in patcher.sets.items()},
        prompts_sampled=patcher.sampled or None,
        prompt_sources=prompt_sources(patcher.sets, patcher.prompt_files),
        backends=dict(sorted(patcher.backends.items())),
        compute_dtype=str(patcher.base_model.dtype).removeprefix("torch."),
        init_timings_s=patcher.timings,
        inputs_sha256=input_checksums(files) if config.hash_inputs else "not computed (hash_inputs=False)",
        inputs_stat={role: _stat(fs) for role, fs in files.items() if role in ("aligned", "tokenizer")},
        versions=package_versions(),
        dimensions=[],
        union={k: [] for k, m in modules.items() if m.safety_layer},
        history=[],
    )
    tensors_scores = {f"{kind}::{k}": v[name].contiguous() for k, v in scores.items()
                      for kind, name in (("task", "task"), ("harmful_init", "harmful"), ("rms_task", "rms_task"))
                      if name in v}
    projected_b = {k: projected[k].contiguous() for k in candidates}

    def write(tmp: Path):
        nonlocal state
        (tmp / "b0").mkdir()
        _copy_adapter(lora, tmp / "b0")
        (tmp / "cache").mkdir()
        save_tensors(tensors_scores, tmp / "cache" / "scores.safetensors", finite=False)
        save_tensors(projected_b, tmp / "cache" / "projected.safetensors")
        (tmp / "dims").mkdir()
        (tmp / "adapter").mkdir()
        for name in ADAPTER_FILES:
            link_tree(tmp / "b0" / name, tmp / "adapter" / name)
        (tmp / "adapter" / REPORT_NAME).write_text(json.dumps(_adapter_report(state, state.union), indent=2) + "\n")
        state = replace(state, history=[{"step": 0, "op": "init", "time": _now(), "new_rows": 0, "new_parameters": 0,
                                         "cumulative_edit_fraction": 0.0,
                                         "timings_s": {**patcher.timings, "total": time.perf_counter() - started},
                                         "adapter_sha256": sha256_file(tmp / "adapter" / "adapter_model.safetensors")}])
        if figures:
            write_figures(state, tmp / "figures")
        _write_json(tmp / STATE_FILE, state.to_json())

    _commit(out, write, keep=(), overwrite=overwrite)
    return state


def add(state_dir, name: str, *, harmful=None, prompts: list[str] | None = None, q: float | None = None,
        p: float | None = None, device: str | None = None, backend: str | None = None, progress: bool | None = None,
        figures: bool = True) -> dict:
    """Add safety dimension `name` (its harmful prompts: files, or a list as `prompts`); returns the
    history entry. Only the rows S_k minus P change in STATE/adapter, each set from B0."""
    state_dir = Path(state_dir)
    if not NAME_RE.match(name or ""):
        raise MSCPError(f"dimension name {name!r} must be 1-64 letters, digits, '_', '.', '+' or '-' "
                        "(starting with a letter or digit)")
    files = as_paths(harmful)
    if files:
        texts = [p for f in files for p in read_prompts(f)]
    elif prompts is not None:
        texts = [x.strip() for x in prompts if x and x.strip()]
        if not texts:
            raise MSCPError(f"the harmful prompt list of dimension {name} is empty")
    else:
        raise MSCPError(f"dimension {name} needs its harmful prompts (--harmful FILE ...)")
    with _locked(state_dir):
        state = load_state(state_dir)
        started = time.perf_counter()
        config = PatchConfig(**config_from_mapping(state.config, where=f"{state_dir / STATE_FILE}: config"))
        changes = {k: v for k, v in dict(q=q, p=p, device=device, backend=backend, progress=progress).items()
                   if v is not None}
        config = replace(config, **changes)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise MSCPError("--device cuda requested but CUDA is not available")
        check_writable(state_dir)
        texts, sampled = sample_prompts(texts, config.max_prompts, f"dimension {name}")
        digest = _prompts_sha256(texts)
        file_sums = {str(f): sha256_file(f) for f in files}
        existing = {d.name: d for d in state.dimensions}
        step = len(state.history)
        entry = {"step": step, "op": "add", "name": name, "time": _now(), "prompts": len(texts),
                 "prompts_sha256": digest, "q": config.q, "p": config.p, **({"prompts_sampled": sampled} if sampled else {})}
        if name in existing:
            old = existing[name]
            if old.prompts_sha256 != digest or old.q != config.q or old.p != config.p:
                raise MSCPError(f"dimension {name} already exists with other prompts or q/p; add it under another name")
            entry.update(repeat_of=name, mask_rows=old.mask_rows, new_rows=0, new_parameters=0,
                         incremental_edit_fraction=0.0, cumulative_edit_fraction=edit_fraction(state, state.union),
                         note="same name, prompts and q/p as a recorded dimension: its mask is reused, nothing edited",
                         timings_s={"total": time.perf_counter() - started})
            state = replace(state, history=[*state.history, entry])
            _commit(state_dir, lambda tmp: _write_json(tmp / STATE_FILE, state.to_json()),
                    keep=("b0", "cache", "dims", "adapter", "figures"))
            return entry

        _check_unchanged(state)
        clock = time.perf_counter()
        aligned = _shell(state.paths["aligned"], "aligned", config)
        tok = load_tokenizer(state.paths.get("tokenizer") or state.paths["aligned"])
        b0 = Adapter.load(state_dir / "b0")
        run = AdapterRun(b0, modules_by_layer(b0, aligned))
        # the init's window: its modules are those the state records as in a safety layer
        patcher = Patcher(config, aligned_model=aligned, tok=tok, window=Window(state.safety_layers))
        timings = {"load": time.perf_counter() - clock}
        clock = time.perf_counter()
        edits = None
        if config.score == "attribution":  # each row's edit: its projection (cached at init) minus B0
            projected = load_file(str(state_dir / "cache" / "projected.safetensors"))
            edits = {k: projected[k].float() - b0.tensors[k].float() for k in projected}  # the window's modules
        scores = patcher.score_harmful(texts, run, edits=edits)
        timings["stream"] = time.perf_counter() - clock
        clock = time.perf_counter()
        cached = load_file(str(state_dir / "cache" / "scores.safetensors"))
        for k, sc in scores.items():
            if f"task::{k}" in cached:  # absent when init scored with p = 0 (attribution)
                sc["task"] = cached[f"task::{k}"]
            if f"rms_task::{k}" in cached:
                sc["rms_task"] = cached[f"rms_task::{k}"]
        run.scores = Scores(scores)
        rows = patcher.select(run)
        mask = {k: rows[k].tolist() for k in sorted(scores)}
        new = {k: sorted(set(rows) - set(state.union.get(k, []))) for k, rows in mask.items()}
        new = {k: rows for k, rows in new.items() if rows}
        union = {k: sorted(set(state.union.get(k, [])) | set(mask.get(k, []))) for k in state.union}
        n_new_params = edited_parameters(state, new)
        timings["select"] = time.perf_counter() - clock

        clock = time.perf_counter()
        tensors = None
        if n_new_params or any(new.values()):
            projected = load_file(str(state_dir / "cache" / "projected.safetensors"))
            current = load_file(str(state_dir / "adapter" / "adapter_model.safetensors"))
            tensors = dict(current)
            for key, rows in new.items():
                if state.modules[key].skipped:
                    continue  # V is zero: these rows stay B0's (recorded, not edited), as in `patch`
                idx = torch.tensor(rows, dtype=torch.int64)
                B = current[key].clone()
                B[idx] = projected[key][idx]
                tensors[key] = B
        timings["project"] = time.perf_counter() - clock
        mask_rows = sum(len(r) for r in mask.values())
        entry.update(mask_rows=mask_rows, new_rows=sum(len(r) for r in new.values()), new_parameters=n_new_params,
                     incremental_edit_fraction=n_new_params / state.lora_parameters,
                     cumulative_edit_fraction=edit_fraction(state, union))
        dim = Dimension(name=name, step=step, harmful_files=[str(f) for f in files] or "in-memory",
                        harmful_sha256=file_sums, prompts_sha256=digest, prompts=len(texts), q=config.q, p=config.p,
                        prompts_sampled=sampled or None, mask_rows=mask_rows,
                        mask_parameters=edited_parameters(state, mask),
                        mask_edit_fraction=edited_parameters(state, mask) / state.lora_parameters,
                        new_rows=entry["new_rows"], new_parameters=n_new_params,
                        incremental_edit_fraction=entry["incremental_edit_fraction"],
                        cumulative_edit_fraction=entry["cumulative_edit_fraction"], rows=mask, new_rows_by_module=new)
        state = replace(state, dimensions=[*state.dimensions, dim], union=union)
        dim_scores = {f"{name}::{k}": t.contiguous() for k, sc in scores.items() for name, t in sc.items()
                      if name in ("harmful", "rms_harmful")}

        def write(tmp: Path):
            write_clock = time.perf_counter()
            save_tensors(dim_scores, tmp / "dims" / f"{name}.safetensors", finite=False)
            if tensors is not None:
                (tmp / "adapter").mkdir()
                link_tree(state_dir / "b0" / "adapter_config.json", tmp / "adapter" / "adapter_config.json")
                save_tensors(tensors, tmp / "adapter" / "adapter_model.safetensors")
                (tmp / "adapter" / REPORT_NAME).write_text(json.dumps(_adapter_report(state, union), indent=2) + "\n")
            timings["write"] = time.perf_counter() - write_clock
            if figures:  # without figures the old PNGs (of an earlier step) are dropped, not kept stale
                write_figures(state, tmp / "figures")
            entry["adapter_sha256"] = sha256_file(tmp / "adapter" / "adapter_model.safetensors")
            entry["timings_s"] = {**timings, "total": time.perf_counter() - started}
            _write_json(tmp / STATE_FILE, replace(state, history=[*state.history, entry]).to_json())

        keep = ("b0", "cache", "dims") + (() if tensors is not None else ("adapter",))
        _commit(state_dir, write, keep=keep)
        return entry


def load_state(state_dir) -> State:
    """The record of STATE/state.json; a missing, damaged or foreign file is one MSCPError line."""
    state_dir = Path(state_dir)
    f = state_dir / STATE_FILE
    if not f.is_file():
        hint = ""
        if not state_dir.exists() and list(state_dir.parent.glob(f".{state_dir.name}.old-*")):
            hint = f" (an interrupted update left {next(state_dir.parent.glob(f'.{state_dir.name}.old-*'))}: rename it back)"
        raise MSCPError(f"{state_dir} is not a continual state (no {STATE_FILE}; create one with `mscp continual init`){hint}")
    # the curves may hold NaN, as json.dumps writes it
    return State.from_json(read_json_object(f, "continual state", allow_nan=True), f)


def status(state_dir) -> dict:
    """The analytics of a state (what `mscp continual status --json` prints)."""
    state_dir = Path(state_dir)
    state = load_state(state_dir)
    out = analytics(state)
    out["state"] = str(state_dir)
    out["adapter"] = str(state_dir / "adapter")
    out["figures"] = sorted(str(p) for p in (state_dir / "figures").glob("*.png"))
    return out


def _shell(path, label: str, config: PatchConfig) -> ModelShell:
    return ModelShell(path, label=label, device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle)


def _prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stat(files: list[Path]) -> dict[str, list[int]]:
    return {str(Path(f).resolve()): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


def _check_unchanged(state: State) -> None:
    """The aligned model (and tokenizer) must be the files `init` read: a cheap size/mtime check."""
    for role, files in state.inputs_stat.items():
        for f, (size, mtime) in files.items():
            try:
                st = os.stat(f)
            except OSError:
                raise MSCPError(f"{role} file {f} recorded by `continual init` is missing; run init again") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise MSCPError(f"{role} file {f} changed since `continual init`; run init again")


def _adapter_report(state: State, union: dict[str, list[int]]) -> dict:
    """STATE/adapter/mscp_report.json: `patch`'s report, for the union of the dimensions.
    A function of the union and the init only, so an add that changes nothing leaves it identical."""
    mods = {k: {"module": m.module, "rows": rows, "n_rows": len(rows), "d_out": m.d_out, "rank": m.rank,
                "norm_v": m.norm_v, "skipped": m.skipped}
            for k, rows in union.items() for m in [state.modules[k]]}
    return build_report(
        config=state.config, safety_layers=state.safety_layers, n_layers=state.n_layers,
        layer_curves=state.layer_curves, modules=mods, lora_parameters=state.lora_parameters,
        prompts=state.prompts, prompt_sources=state.prompt_sources, backends=state.backends,
        compute_dtype=state.compute_dtype, timings=state.init_timings_s, versions=state.versions,
        inputs_sha256=state.inputs_sha256, paths=state.paths,
        continual="the union of the dimensions recorded in ../state.json, projected from ../b0")


def _copy_adapter(lora: Adapter, folder: Path) -> None:
    """B0: the input adapter's files as they are (safetensors), else its tensors saved as safetensors."""
    src_config = lora.path / "adapter_config.json"
    shutil.copyfile(src_config, folder / "adapter_config.json")
    weights = [f for f in lora.files if f.name != "adapter_config.json"]
    if len(weights) == 1 and weights[0].suffix == ".safetensors":
        shutil.copyfile(weights[0], folder / "adapter_model.safetensors")
    else:
        save_tensors(lora.tensors, folder / "adapter_model.safetensors")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _locked(state_dir: Path):
    """An exclusive, non-blocking lock on the state folder for the whole read-modify-swap."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        load_state(state_dir)  # the one-line error
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MSCPError(f"another mscp continual command is updating {state_dir}; try again when it ends") from None
        if os.fstat(fd).st_ino != os.stat(state_dir).st_ino:  # swapped while we waited
            raise MSCPError(f"{state_dir} was updated by another command; try again")
        yield
    finally:
        os.close(fd)


def _commit(state_dir: Path, write, *, keep=(), overwrite: bool = True) -> None:
    """Build the next state in a temporary sibling (hard links for the parts kept), then swap it in."""
    write_atomically(state_dir, write, keep=keep, overwrite=overwrite)
