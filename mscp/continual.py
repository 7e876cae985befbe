"""Continual projection over safety dimensions (METHOD.md, "Continual projection over safety dimensions").

A *state* directory holds what every later dimension reuses, and the adapter after each step:

    STATE/state.json          models, options, safety layers, curves, modules, dimensions (masks,
                              prompt checksums, config), the union P of projected rows, the history
    STATE/b0/                 the input adapter, copied (B0: every projection starts from it)
    STATE/cache/scores.safetensors     I^T per LoRA module (fine-tuned model, task prompts)
    STATE/cache/projected.safetensors  lora_B of every safety-layer module with *all* rows projected
                                       from B0 (B0 + alpha (C B0 - B0)); a step copies its new rows
    STATE/dims/NAME.safetensors        I^H of each dimension (for re-analysis)
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
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mscp.adapter import Adapter, LoraModule
from mscp.checkpoint import config_files, sha256_file
from mscp.config import PatchConfig
from mscp.errors import MSCPError
from mscp.pipeline import as_paths, harmful_scores, localize, progress_bar
from mscp.project import project_adapter
from mscp.prompts import load_tokenizer, read_prompts
from mscp.report import REPORT_NAME, check_out_dir, input_checksums, package_versions
from mscp.scoring import safety_rows
from mscp.streaming import ModelShell

STATE_FORMAT = 1
STATE_FILE = "state.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------
# init / add / status
# ---------------------------------------------------------------------------------------------
def init(base, aligned, adapter, out, *, harmful=None, benign=None, task=None, prompts=None, tokenizer=None,
         config: PatchConfig | None = None, overwrite: bool = False, figures: bool = True, **overrides) -> dict:
    """Create a continual state in `out` (see the module docstring); returns the state dict.

    Takes what `mscp.patch` takes: harmful/benign prompts choose the safety layers (the curves),
    task prompts give I^T. No dimension is applied yet: STATE/adapter is B0.
    """
    config = replace(config or PatchConfig(), **overrides) if overrides else (config or PatchConfig())
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise MSCPError("--device cuda requested but CUDA is not available")
    out = Path(out)
    paths = {"base": Path(base), "aligned": Path(aligned), "adapter": Path(adapter)}
    if tokenizer is not None:
        paths["tokenizer"] = Path(tokenizer)
    inputs = [*paths.values(), *as_paths(harmful), *as_paths(benign), *as_paths(task)]
    check_out_dir(out, overwrite, [p for p in inputs if p.exists()])
    started = time.perf_counter()
    loc = localize(base, aligned, [adapter], harmful=harmful, benign=benign, task=task, prompts=prompts,
                   tokenizer=tokenizer, config=config)
    lora, by_layer, scores = loc.runs[0].lora, loc.runs[0].by_layer, loc.runs[0].scores
    candidates = {m.key_b: torch.arange(lora.tensors[m.key_b].shape[0])
                  for index in loc.safety_layers for m in by_layer.get(index, {}).values()}
    clock = time.perf_counter()
    projected, edits = project_adapter(lora, loc.base_model.ckpt, loc.aligned_model.ckpt, candidates, alpha=config.alpha,
                                       projector=config.projector, exact_rank=config.exact_rank, device=config.device,
                                       backend=config.backend, progress=progress_bar(config))
    loc.timings["project_all_rows"] = time.perf_counter() - clock

    modules = {}
    for index, rels in sorted(by_layer.items()):
        for rel, m in sorted(rels.items()):
            e = edits.get(m.key_b)
            modules[m.key_b] = {"module": m.module, "layer": index, "name": rel, "d_out": lora.tensors[m.key_b].shape[0],
                                "rank": m.rank, "safety_layer": index in loc.safety_layers,
                                "norm_v": e.norm_v if e else None, "skipped": e.skipped if e else None}
    files = {"base": loc.base_model.ckpt.files + config_files(loc.base_model.ckpt.path),
             "aligned": loc.aligned_model.ckpt.files + config_files(loc.aligned_model.ckpt.path),
             "adapter": lora.files, **loc.prompt_files}
    if tokenizer is not None:
        files["tokenizer"] = [p for p in Path(tokenizer).iterdir() if p.is_file()] if Path(tokenizer).is_dir() else []
    state = {
        "format": STATE_FORMAT,
        "mscp_version": package_versions()["mscp"],
        "created": _now(),
        "paths": {k: str(v.resolve()) if v.exists() else str(v) for k, v in paths.items()},
        "config": config.to_dict(),
        "n_layers": loc.base_model.n_layers,
        "safety_layers": loc.safety_layers,
        "layer_curves": loc.layer_curves,
        "modules": modules,
        "lora_parameters": lora.n_parameters(),
        "adapter_config": lora.config,
        "prompts": {name: len(p) for name, p in loc.sets.items()},
        "prompts_sha256": {name: _prompts_sha256(p) for name, p in loc.sets.items()},
        "prompt_sources": {name: [str(f) for f in loc.prompt_files.get(f"prompts:{name}", [])] or "built-in or in-memory"
                           for name in loc.sets},
        "inputs_sha256": input_checksums(files) if config.hash_inputs else "not computed (hash_inputs=False)",
        "inputs_stat": {role: _stat(fs) for role, fs in files.items() if role in ("aligned", "tokenizer")},
        "versions": package_versions(),
        "dimensions": [],
        "union": {k: [] for k, m in modules.items() if m["safety_layer"]},
        "history": [],
    }
    tensors_scores = {f"task::{k}": v["task"].contiguous() for k, v in scores.items()}
    tensors_scores.update({f"harmful_init::{k}": v["harmful"].contiguous() for k, v in scores.items()})
    projected_b = {k: projected[k].contiguous() for k in candidates}

    def write(tmp: Path):
        (tmp / "b0").mkdir()
        _copy_adapter(lora, tmp / "b0")
        (tmp / "cache").mkdir()
        save_file(tensors_scores, str(tmp / "cache" / "scores.safetensors"), metadata={"format": "pt"})
        save_file(projected_b, str(tmp / "cache" / "projected.safetensors"), metadata={"format": "pt"})
        (tmp / "dims").mkdir()
        (tmp / "adapter").mkdir()
        for name in ADAPTER_FILES:
            _link_or_copy(tmp / "b0" / name, tmp / "adapter" / name)
        (tmp / "adapter" / REPORT_NAME).write_text(json.dumps(_adapter_report(state, state["union"]), indent=2) + "\n")
        state["history"].append({"step": 0, "op": "init", "time": _now(), "new_rows": 0, "new_parameters": 0,
                                  "cumulative_edit_fraction": 0.0,
                                  "timings_s": {**loc.timings, "total": time.perf_counter() - started},
                                  "adapter_sha256": sha256_file(tmp / "adapter" / "adapter_model.safetensors")})
        if figures:
            write_figures(state, tmp / "figures")
        _write_json(tmp / STATE_FILE, state)

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
        config = PatchConfig(**{**state["config"], "layers": _tuple(state["config"]["layers"])})
        changes = {k: v for k, v in dict(q=q, p=p, device=device, backend=backend, progress=progress).items()
                   if v is not None}
        config = replace(config, **changes)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise MSCPError("--device cuda requested but CUDA is not available")
        digest = _prompts_sha256(texts)
        file_sums = {str(f): sha256_file(f) for f in files}
        existing = {d["name"]: d for d in state["dimensions"]}
        step = len(state["history"])
        entry = {"step": step, "op": "add", "name": name, "time": _now(), "prompts": len(texts),
                 "prompts_sha256": digest, "q": config.q, "p": config.p}
        if name in existing:
            old = existing[name]
            if old["prompts_sha256"] != digest or old["q"] != config.q or old["p"] != config.p:
                raise MSCPError(f"dimension {name} already exists with other prompts or q/p; add it under another name")
            entry.update(repeat_of=name, mask_rows=old["mask_rows"], new_rows=0, new_parameters=0,
                         incremental_edit_fraction=0.0, cumulative_edit_fraction=_edit_fraction(state, state["union"]),
                         note="same name, prompts and q/p as a recorded dimension: its mask is reused, nothing edited",
                         timings_s={"total": time.perf_counter() - started})
            state["history"].append(entry)
            _commit(state_dir, lambda tmp: _write_json(tmp / STATE_FILE, state),
                    keep=("b0", "cache", "dims", "adapter", "figures"))
            return entry

        _check_unchanged(state)
        clock = time.perf_counter()
        aligned = _shell(state["paths"]["aligned"], "aligned", config)
        tok = load_tokenizer(state["paths"].get("tokenizer") or state["paths"]["aligned"])
        targets: dict[int, dict[str, LoraModule]] = {}
        for key, m in state["modules"].items():
            if m["safety_layer"]:
                targets.setdefault(m["layer"], {})[m["name"]] = _module_stub(key, m)
        timings = {"load": time.perf_counter() - clock}
        clock = time.perf_counter()
        scores = harmful_scores(aligned, tok, texts, targets, config)
        timings["stream"] = time.perf_counter() - clock
        clock = time.perf_counter()
        task = load_file(str(state_dir / "cache" / "scores.safetensors"))
        mask = {k: safety_rows(scores[k], task[f"task::{k}"], config.q, config.p).tolist() for k in sorted(scores)}
        new = {k: sorted(set(rows) - set(state["union"].get(k, []))) for k, rows in mask.items()}
        new = {k: rows for k, rows in new.items() if rows}
        union = {k: sorted(set(state["union"].get(k, [])) | set(mask.get(k, []))) for k in state["union"]}
        n_new_params = _edited_parameters(state, new)
        timings["select"] = time.perf_counter() - clock

        clock = time.perf_counter()
        tensors = None
        if n_new_params or any(new.values()):
            projected = load_file(str(state_dir / "cache" / "projected.safetensors"))
            current = load_file(str(state_dir / "adapter" / "adapter_model.safetensors"))
            tensors = dict(current)
            for key, rows in new.items():
                if state["modules"][key]["skipped"]:
                    continue  # V is zero: these rows stay B0's (recorded, not edited), as in `patch`
                idx = torch.tensor(rows, dtype=torch.int64)
                B = current[key].clone()
                B[idx] = projected[key][idx]
                tensors[key] = B
        timings["project"] = time.perf_counter() - clock
        mask_rows = sum(len(r) for r in mask.values())
        entry.update(mask_rows=mask_rows, new_rows=sum(len(r) for r in new.values()), new_parameters=n_new_params,
                     incremental_edit_fraction=n_new_params / state["lora_parameters"],
                     cumulative_edit_fraction=_edit_fraction(state, union))
        dim = {"name": name, "step": step, "harmful_files": [str(f) for f in files] or "in-memory",
               "harmful_sha256": file_sums, "prompts_sha256": digest, "prompts": len(texts), "q": config.q,
               "p": config.p, "mask_rows": mask_rows, "mask_parameters": _edited_parameters(state, mask),
               "mask_edit_fraction": _edited_parameters(state, mask) / state["lora_parameters"],
               "new_rows": entry["new_rows"], "new_parameters": n_new_params,
               "incremental_edit_fraction": entry["incremental_edit_fraction"],
               "cumulative_edit_fraction": entry["cumulative_edit_fraction"], "rows": mask, "new_rows_by_module": new}
        state["dimensions"].append(dim)
        state["union"] = union
        dim_scores = {k: v.contiguous() for k, v in scores.items()}

        def write(tmp: Path):
            save_file(dim_scores, str(tmp / "dims" / f"{name}.safetensors"), metadata={"format": "pt"})
            if tensors is not None:
                (tmp / "adapter").mkdir()
                _link_or_copy(state_dir / "b0" / "adapter_config.json", tmp / "adapter" / "adapter_config.json")
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter" / "adapter_model.safetensors"),
                          metadata={"format": "pt"})
                (tmp / "adapter" / REPORT_NAME).write_text(json.dumps(_adapter_report(state, union), indent=2) + "\n")
            timings["write"] = time.perf_counter() - clock
            if figures:  # without figures the old PNGs (of an earlier step) are dropped, not kept stale
                write_figures(state, tmp / "figures")
            entry["adapter_sha256"] = sha256_file(tmp / "adapter" / "adapter_model.safetensors")
            entry["timings_s"] = {**timings, "total": time.perf_counter() - started}
            state["history"].append(entry)
            _write_json(tmp / STATE_FILE, state)

        keep = ("b0", "cache", "dims") + (() if tensors is not None else ("adapter",))
        _commit(state_dir, write, keep=keep)
        return entry


def load_state(state_dir) -> dict:
    state_dir = Path(state_dir)
    f = state_dir / STATE_FILE
    if not f.is_file():
        hint = ""
        if not state_dir.exists() and list(state_dir.parent.glob(f".{state_dir.name}.old-*")):
            hint = f" (an interrupted update left {next(state_dir.parent.glob(f'.{state_dir.name}.old-*'))}: rename it back)"
        raise MSCPError(f"{state_dir} is not a continual state (no {STATE_FILE}; create one with `mscp continual init`){hint}")
    try:
        state = json.loads(f.read_text())
    except json.JSONDecodeError:
        raise MSCPError(f"corrupt continual state: {f}") from None
    if state.get("format") != STATE_FORMAT:
        raise MSCPError(f"{f} has state format {state.get('format')!r}; this mscp reads format {STATE_FORMAT}")
    return state


def status(state_dir) -> dict:
    """The analytics of a state (what `mscp continual status --json` prints)."""
    state_dir = Path(state_dir)
    state = load_state(state_dir)
    out = analytics(state)
    out["state"] = str(state_dir)
    out["adapter"] = str(state_dir / "adapter")
    out["figures"] = sorted(str(p) for p in (state_dir / "figures").glob("*.png"))
    return out


def analytics(state: dict) -> dict:
    """Per-dimension sizes and edit fractions, the Jaccard overlap (clustered), where rows sit."""
    from mscp.figures import cluster_order

    dims = state["dimensions"]
    names = [d["name"] for d in dims]
    sets = [{(k, r) for k, rows in d["rows"].items() for r in rows} for d in dims]
    n = len(dims)
    inter = [[len(a & b) for b in sets] for a in sets]
    jaccard = [[(len(a & b) / len(a | b)) if (a | b) else 1.0 for b in sets] for a in sets]
    order, merges = cluster_order(jaccard)
    modules = state["modules"]
    layers = state["safety_layers"]
    per_layer = {name: [sum(1 for k, _ in s if modules[k]["layer"] == l) for l in layers] for name, s in zip(names, sets)}
    types = sorted({m["name"].rsplit(".", 1)[-1] for m in modules.values() if m["safety_layer"]})
    per_type = {name: {t: sum(1 for k, _ in s if modules[k]["name"].rsplit(".", 1)[-1] == t) for t in types}
                for name, s in zip(names, sets)}
    count: dict = {}
    for s in sets:
        for x in s:
            count[x] = count.get(x, 0) + 1
    core = {x for x, c in count.items() if c == n} if n >= 2 else set()
    specific = {name: {x for x in s if count[x] == 1} for name, s in zip(names, sets)} if n >= 2 else {}
    by_layer_kind = {"core (all dimensions)": [sum(1 for k, _ in core if modules[k]["layer"] == l) for l in layers],
                     "shared (2+, not all)": [sum(1 for (k, _), c in count.items() if 1 < c < n and modules[k]["layer"] == l)
                                              for l in layers],
                     "specific (one dimension)": [sum(1 for (k, _), c in count.items() if c == 1 and n >= 2
                                                      and modules[k]["layer"] == l) for l in layers]}
    if n < 2:
        by_layer_kind = {"rows": [sum(1 for k, _ in count if modules[k]["layer"] == l) for l in layers]}
    union_rows = sum(len(r) for r in state["union"].values())
    return {
        "n_layers": state["n_layers"],
        "safety_layers": layers,
        "lora_parameters": state["lora_parameters"],
        "union_rows": union_rows,
        "edit_fraction": _edit_fraction(state, state["union"]),
        "edited_parameters": _edited_parameters(state, state["union"]),
        "config": {k: state["config"][k] for k in ("q", "p", "alpha", "projector", "rho", "criterion", "layers")},
        "dimensions": [{k: d[k] for k in ("name", "step", "prompts", "prompts_sha256", "harmful_sha256", "q", "p",
                                          "mask_rows", "mask_edit_fraction", "new_rows", "new_parameters",
                                          "incremental_edit_fraction", "cumulative_edit_fraction")}
                       for d in dims],
        "overlap": {"names": names, "jaccard": jaccard, "intersection": inter, "cluster_order": [names[i] for i in order],
                    "merges": [{"a": a, "b": b, "distance": dist, "size": size} for a, b, dist, size in merges],
                    "clustering": "average linkage on 1 - Jaccard over (module, row) pairs"},
        "layers": {"layers": layers, "rows_by_dimension": per_layer, "rows_by_kind": by_layer_kind,
                   "core_rows": len(core), "specific_rows": {k: len(v) for k, v in specific.items()},
                   "multiplicity": _histogram(count.values(), n)},
        "module_types": per_type,
        "history": [{k: h.get(k) for k in ("step", "op", "name", "time", "mask_rows", "new_rows", "new_parameters",
                                           "incremental_edit_fraction", "cumulative_edit_fraction", "repeat_of")
                     if h.get(k) is not None} | {"seconds": h.get("timings_s", {}).get("total")}
                    for h in state["history"]],
    }


def write_figures(state: dict, folder: Path) -> list[Path]:
    """PNGs of the state: layer curves, per-dimension sizes, clustered overlap, layer distribution."""
    from mscp import figures as fg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = analytics(state)
    curves = state["layer_curves"]
    layers = state["safety_layers"]
    out = [fg.line_curves(folder / "curves.png", [c["layer"] for c in curves],
                          {"sigma": [c["sigma"] for c in curves], "d li_gap": [c["d_li_gap"] for c in curves]},
                          title="Layer criteria (level 1)", xlabel="decoder layer", ylabel="value",
                          shade=(layers[0], layers[-1]), shade_label="safety layers")]
    dims = a["dimensions"]
    if not dims:
        return out
    names = [d["name"] for d in dims]
    out.append(fg.bar_panels(folder / "dimensions.png", names, [
        {"series": {"mask rows": [d["mask_rows"] for d in dims], "new rows": [d["new_rows"] for d in dims]},
         "ylabel": "rows"},
        {"series": {"incremental edit %": [100 * d["incremental_edit_fraction"] for d in dims]},
         "line": {"cumulative edit %": [100 * d["cumulative_edit_fraction"] for d in dims]}, "ylabel": "% of LoRA parameters"},
    ], title="Dimensions in the order added"))
    ov = a["overlap"]
    idx = [ov["names"].index(x) for x in ov["cluster_order"]]
    out.append(fg.heatmap(folder / "overlap.png", [[ov["jaccard"][i][j] for j in idx] for i in idx], ov["cluster_order"],
                          title="Jaccard overlap of dimension masks (clustered)", cbar_label="Jaccard", vmin=0, vmax=1))
    lay = a["layers"]
    out.append(fg.heatmap(folder / "layers.png", [lay["rows_by_dimension"][x] for x in ov["cluster_order"]],
                          ov["cluster_order"], [str(l) for l in layers], title="Mask rows per safety layer",
                          cbar_label="rows", fmt="{:.0f}", xlabel="decoder layer"))
    out.append(fg.stacked_bars(folder / "layers_core_specific.png", [str(l) for l in layers], lay["rows_by_kind"],
                               title="Union rows by how many dimensions share them", xlabel="decoder layer",
                               ylabel="rows"))
    return out


def format_status(s: dict) -> str:
    lines = [f"{s['state']}: {len(s['dimensions'])} dimension(s); safety layers {s['safety_layers'][0]}-"
             f"{s['safety_layers'][-1]} of {s['n_layers']}; union {s['union_rows']} rows; edit fraction "
             f"{100 * s['edit_fraction']:.3f} % ({s['edited_parameters']} of {s['lora_parameters']} LoRA parameters)"]
    if s["dimensions"]:
        width = max(9, *(len(d["name"]) for d in s["dimensions"]))
        lines.append(f"{'step':>4}  {'dimension':<{width}}  {'prompts':>7}  {'mask rows':>9}  {'new rows':>8}  "
                     f"{'+edit %':>8}  {'total %':>8}")
        for d in s["dimensions"]:
            lines.append(f"{d['step']:>4}  {d['name']:<{width}}  {d['prompts']:>7}  {d['mask_rows']:>9}  {d['new_rows']:>8}  "
                         f"{100 * d['incremental_edit_fraction']:>8.3f}  {100 * d['cumulative_edit_fraction']:>8.3f}")
        repeats = [h for h in s["history"] if h.get("repeat_of")]
        if repeats:
            lines.append(f"repeated adds (0 new rows): {', '.join(h['name'] + ' @ step ' + str(h['step']) for h in repeats)}")
        ov = s["overlap"]
        order = ov["cluster_order"]
        w = max(6, *(len(x) for x in order))
        lines.append("Jaccard overlap (clustered order):")
        lines.append(" " * (w + 2) + "".join(f"{x[:w]:>{w + 1}}" for x in order))
        for x in order:
            i = ov["names"].index(x)
            lines.append(f"{x:<{w + 2}}" + "".join(f"{ov['jaccard'][i][ov['names'].index(y)]:>{w + 1}.2f}" for y in order))
        lay = s["layers"]
        lines.append("union rows per safety layer: " + ", ".join(
            f"{l}: " + "/".join(str(v[i]) for v in lay["rows_by_kind"].values()) for i, l in enumerate(lay["layers"]))
            + f"  ({' / '.join(lay['rows_by_kind'])})")
    if s.get("figures"):
        lines.append("figures: " + ", ".join(Path(f).name for f in s["figures"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI (wired into mscp/cli.py's COMMANDS as "continual")
# ---------------------------------------------------------------------------------------------
def cli_args(p) -> None:
    from mscp.config import BACKEND_CHOICES

    sub = p.add_subparsers(dest="continual_command", required=True)
    p_init = sub.add_parser("init", help="create a continual state: localisation shared by all dimensions",
                            description="Create STATE (--out): safety layers, task scores and the projection "
                                        "cache, shared by every dimension added later. Options as `mscp patch`.")
    _init_args(p_init)
    p_init.add_argument("--no-figures", action="store_true", help="do not write STATE/figures/*.png")
    p_add = sub.add_parser("add", help="add a safety dimension (its harmful prompts) to a state")
    p_add.add_argument("state", help="continual state folder (made by `mscp continual init`)")
    p_add.add_argument("--name", required=True, help="the dimension's name, e.g. a harm category")
    p_add.add_argument("--harmful", nargs="+", action="extend", metavar="FILE", required=True,
                       help="the dimension's harmful prompt files")
    p_add.add_argument("--q", type=float, help="safety-row fraction for this dimension (default: the state's)")
    p_add.add_argument("--p", type=float, help="task-row fraction for this dimension (default: the state's)")
    p_add.add_argument("--device", help="cpu or cuda[:N] (default: the state's)")
    p_add.add_argument("--backend", choices=BACKEND_CHOICES, help="kernel backend (default: the state's)")
    p_add.add_argument("--no-figures", action="store_true", help="do not rewrite STATE/figures/*.png")
    p_add.add_argument("--quiet", action="store_true", help="no progress bars")
    p_status = sub.add_parser("status", help="per-dimension mask sizes, edit fractions, overlap")
    p_status.add_argument("state", help="continual state folder")
    p_status.add_argument("--json", action="store_true", help="print the analytics as JSON")


def _init_args(p) -> None:
    """`mscp patch`'s model, prompt and config options (one adapter; --out is the state folder)."""
    from mscp.cli import add_config_args

    p.add_argument("--base", required=True, help="pre-alignment model folder")
    p.add_argument("--aligned", required=True, help="aligned model folder")
    p.add_argument("--adapter", required=True, help="peft LoRA adapter folder (B0), fine-tuned on the aligned model")
    p.add_argument("--out", required=True, help="the continual state folder to create")
    add_config_args(p)  # its --q/--p are the dimensions' defaults; --harmful only feeds the layer curves


def cli_run(args) -> int:
    if args.continual_command == "init":
        from mscp.cli import config_from_args

        config = config_from_args(args)
        state = init(args.base, args.aligned, args.adapter, args.out, harmful=args.harmful, benign=args.benign,
                     task=args.task, tokenizer=args.tokenizer, config=config, overwrite=args.overwrite,
                     figures=not args.no_figures)
        layers = state["safety_layers"]
        print(f"safety layers: {layers[0]}-{layers[-1]} of {state['n_layers']}; "
              f"{sum(m['safety_layer'] for m in state['modules'].values())} LoRA modules can be projected; "
              f"init took {state['history'][0]['timings_s']['total']:.2f} s")
        print(f"wrote {args.out} (STATE/adapter is the input adapter until a dimension is added)")
        return 0
    if args.continual_command == "add":
        for name in ("q", "p"):
            value = getattr(args, name)
            if value is not None and not 0 <= value <= 1:
                raise MSCPError(f"--{name} must be a fraction in [0, 1], got {value}")
        entry = add(args.state, args.name, harmful=args.harmful, q=args.q, p=args.p, device=args.device,
                    backend=args.backend, progress=False if args.quiet else None, figures=not args.no_figures)
        print(f"dimension {args.name}: mask {entry['mask_rows']} rows, {entry['new_rows']} new; incremental edit "
              f"fraction {100 * entry['incremental_edit_fraction']:.3f} %, total {100 * entry['cumulative_edit_fraction']:.3f} %"
              f"{' (repeat: nothing edited)' if entry.get('repeat_of') else ''}; {entry['timings_s']['total']:.2f} s")
        return 0
    s = status(args.state)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _shell(path, label: str, config: PatchConfig) -> ModelShell:
    return ModelShell(path, label=label, device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle)


def _module_stub(key_b: str, m: dict) -> LoraModule:
    """A LoraModule for scoring I^H, which needs only names (no LoRA weights)."""
    return LoraModule(m["module"], key_b.replace("lora_B", "lora_A"), key_b, m["rank"], 1.0)


def _prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _tuple(x):
    return tuple(x) if x is not None else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stat(files: list[Path]) -> dict[str, list[int]]:
    return {str(Path(f).resolve()): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


def _check_unchanged(state: dict) -> None:
    """The aligned model (and tokenizer) must be the files `init` read: a cheap size/mtime check."""
    for role, files in state.get("inputs_stat", {}).items():
        for f, (size, mtime) in files.items():
            try:
                st = os.stat(f)
            except OSError:
                raise MSCPError(f"{role} file {f} recorded by `continual init` is missing; run init again") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise MSCPError(f"{role} file {f} changed since `continual init`; run init again")


def _edited_parameters(state: dict, rows: dict[str, list[int]]) -> int:
    return sum(len(r) * state["modules"][k]["rank"] for k, r in rows.items() if not state["modules"][k]["skipped"])


def _edit_fraction(state: dict, rows: dict[str, list[int]]) -> float:
    return _edited_parameters(state, rows) / state["lora_parameters"] if state["lora_parameters"] else 0.0


def _histogram(values, n: int) -> dict[str, int]:
    out = {str(k): 0 for k in range(1, n + 1)}
    for v in values:
        out[str(v)] += 1
    return out


def _adapter_report(state: dict, union: dict[str, list[int]]) -> dict:
    """STATE/adapter/mscp_report.json: `patch`'s report keys, for the union of the dimensions.
    A function of the union and the init only, so an add that changes nothing leaves it identical."""
    mods = {k: {"module": state["modules"][k]["module"], "rows": rows, "n_rows": len(rows),
                "d_out": state["modules"][k]["d_out"], "rank": state["modules"][k]["rank"],
                "norm_v": state["modules"][k]["norm_v"], "skipped": state["modules"][k]["skipped"]}
            for k, rows in sorted(union.items())}
    return {"mscp_version": state["mscp_version"], "safety_layers": state["safety_layers"], "n_layers": state["n_layers"],
            "layer_curves": state["layer_curves"], "modules": mods, "edit_fraction": _edit_fraction(state, union),
            "edited_parameters": _edited_parameters(state, union), "lora_parameters": state["lora_parameters"],
            "skipped_modules": sorted(k for k, m in mods.items() if m["skipped"]), "config": state["config"],
            "versions": state["versions"], "inputs_sha256": state["inputs_sha256"], "paths": state["paths"],
            "continual": "the union of the dimensions recorded in ../state.json, projected from ../b0"}


def _copy_adapter(lora: Adapter, folder: Path) -> None:
    """B0: the input adapter's files as they are (safetensors), else its tensors saved as safetensors."""
    src_config = lora.path / "adapter_config.json"
    shutil.copyfile(src_config, folder / "adapter_config.json")
    weights = [f for f in lora.files if f.name != "adapter_config.json"]
    if len(weights) == 1 and weights[0].suffix == ".safetensors":
        shutil.copyfile(weights[0], folder / "adapter_model.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in lora.tensors.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    elif src.exists():
        _link_or_copy(src, dst)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _commit(state_dir: Path, write, *, keep=(), overwrite: bool = True) -> None:
    """Build the next state in a temporary sibling (hard links for the parts kept), then swap it in."""
    state_dir = Path(state_dir).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{state_dir.name}.tmp-", dir=state_dir.parent))
    try:
        for rel in keep:
            _link_tree(state_dir / rel, tmp / rel)
        write(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        if not state_dir.exists():
            os.rename(tmp, state_dir)
            return
        if not overwrite:
            raise MSCPError(f"output folder {state_dir} already exists (pass --overwrite to replace it)")
        if _exchange(tmp, state_dir):  # tmp now holds the previous state
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = state_dir.parent / f".{state_dir.name}.old-{os.getpid()}"
        os.rename(state_dir, old)
        os.rename(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


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


# ---------------------------------------------------------------------------------------------
# Measurement: the cost of `add` against a fresh `patch` (docs/continual.md)
# ---------------------------------------------------------------------------------------------
def measure_reuse(base, aligned, adapter, dims: dict[str, Path], work: Path, *, task=None, repeats: int = 3,
                  **overrides) -> dict:
    """In one process (imports and warm-up excluded), per dimension: wall and CPU seconds of a fresh
    `patch` with the dimension's harmful prompts against `add` of the same prompts to a state; the
    runs are interleaved and each is repeated (median). Also init against patch."""
    import statistics

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(progress=False, hash_inputs=False, **overrides)

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out

    first = next(iter(dims.values()))
    patch_fn = lambda files: __import__("mscp.pipeline", fromlist=["patch"]).patch(
        base, aligned, adapter, harmful=files, task=task, **kw)
    patch_fn([first])  # warm-up: imports, first-touch of the files
    rows: dict[str, dict[str, list[float]]] = {}
    states = []
    for r in range(repeats):
        state = work / f"state-{r}"
        shutil.rmtree(state, ignore_errors=True)
        w, c, _ = timed(lambda: patch_fn(None))  # the same prompts as init: built-in harmful + benign
        rows.setdefault("patch (init's prompts)", {}).setdefault("wall", []).append(w)
        rows["patch (init's prompts)"].setdefault("cpu", []).append(c)
        w, c, st = timed(lambda: init(base, aligned, adapter, state, task=task, figures=False, **kw))
        rows.setdefault("init", {}).setdefault("wall", []).append(w)
        rows["init"].setdefault("cpu", []).append(c)
        states.append(state)
        for name, f in dims.items():
            w, c, res = timed(lambda: patch_fn([f]))
            rows.setdefault(f"patch {name}", {}).setdefault("wall", []).append(w)
            rows[f"patch {name}"].setdefault("cpu", []).append(c)
            w, c, entry = timed(lambda: add(state, name, harmful=[f], progress=False, figures=False))
            rows.setdefault(f"add {name}", {}).setdefault("wall", []).append(w)
            rows[f"add {name}"].setdefault("cpu", []).append(c)
    st = load_state(states[-1])
    return {"safety_layers": st["safety_layers"], "n_layers": st["n_layers"], "repeats": repeats,
            "median_s": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rows.items()},
            "dimensions": [{k: d[k] for k in ("name", "mask_rows", "new_rows", "incremental_edit_fraction",
                                              "cumulative_edit_fraction")} for d in st["dimensions"]]}


if __name__ == "__main__":  # python -m mscp.continual TRIO_DIR WORK_DIR DIM.txt ... [--task F] [--layers A-B] [--repeats N]
    import argparse

    from mscp.config import parse_layer_range

    ap = argparse.ArgumentParser(description="time `continual add` against a fresh `patch` (in one process)")
    ap.add_argument("trio", help="folder with base/, aligned/, adapter/ (as `mscp synth` writes)")
    ap.add_argument("work", help="scratch folder for the states")
    ap.add_argument("dims", nargs="+", help="one harmful prompt file per dimension (named after the file)")
    ap.add_argument("--task")
    ap.add_argument("--layers")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    extra = {"layers": parse_layer_range(a.layers)} if a.layers else {}
    trio = Path(a.trio)
    result = measure_reuse(trio / "base", trio / "aligned", trio / "adapter", {Path(f).stem: Path(f) for f in a.dims},
                           Path(a.work), task=a.task, repeats=a.repeats, **extra)
    print(json.dumps(result, indent=2))
