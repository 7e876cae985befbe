"""The run report and atomic output.

OUT is written by mscp.core.atomic: assembled in a temporary sibling folder and swapped into place,
so a failed run leaves no half-written OUT, and an existing OUT is replaced only with --overwrite.
Beside the weights it holds the JSON report, its HTML rendering (report_html.py) and the input's
model card with an mscp section added.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import stat
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mscp.core.atomic import check_writable, remove_stale, write_atomically
from mscp.core.checkpoint import check_finite, sha256_file
from mscp.core.textfiles import json_type, read_json_object
from mscp.errors import MSCPError

REPORT_NAME = "mscp_report.json"
HTML_NAME = "report.html"
CARD_NAME = "README.md"
# what a complete output folder holds; write_adapter_atomically puts them in place in one atomic swap
OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", REPORT_NAME, HTML_NAME, CARD_NAME)
# Fewer calibration or task prompts than this: the curves and row scores rest on too little data.
MIN_PROMPTS = 8
STATUSES = ("ok", "warnings", "noop")
# mscp_report.json's schema version (its key `report_version`): bump it when a key is renamed, dropped or
# changes meaning (a new key does not need it). A report without the key (written before it was
# recorded) is version 1. Whatever reads a report back goes through `check_report`.
REPORT_VERSION = 1


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("mscp", "torch", "transformers", "peft", "safetensors", "triton", "numpy", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_report(*, config: dict, safety_layers: list[int], n_layers: int, layer_curves: list[dict],
                 modules: dict[str, dict], lora_parameters: int, prompts: dict[str, int], prompt_sources: dict,
                 backends: dict[str, str], compute_dtype: str, timings: dict, inputs_sha256, paths: dict,
                 versions: dict | None = None, passed_through: dict | None = None, **extra) -> dict:
    """The report of a patched adapter (mscp_report.json): the one builder, for `patch` and for a
    continual state's adapter alike. `modules`: lora_B key -> ModuleEdit.to_dict().

    A skipped module (e.g. V is zero) keeps its selection as `selected_rows`; its `rows`, the rows
    edited, are empty. `status` is 'noop' when no parameter was edited, 'warnings' when `warnings`
    says why the result deserves a look, else 'ok'."""
    versions = versions or package_versions()
    modules = {key: _module_entry(m) for key, m in sorted(modules.items())}
    edited = sum(m["n_rows"] * m["rank"] for m in modules.values())
    status, warnings = assess(modules, prompts, safety_layers, config, edited)
    return {
        "report_version": REPORT_VERSION,
        "mscp_version": versions["mscp"],
        "status": status,
        "warnings": warnings,
        "safety_layers": safety_layers,
        "n_layers": n_layers,
        "layer_curves": layer_curves,
        "modules": modules,
        "edit_fraction": edited / lora_parameters if lora_parameters else 0.0,
        "edited_parameters": edited,
        "lora_parameters": lora_parameters,
        "projected_modules": [key for key, m in modules.items() if m["n_rows"]],
        "skipped_modules": {key: m["skipped"] for key, m in modules.items() if m["skipped"]},
        "passed_through": passed_through or {"modules_to_save": [], "tensors": []},
        "prompts": prompts,
        "prompt_sources": prompt_sources,
        "config": config,
        "backends": backends,
        "compute_dtype": compute_dtype,
        "timings_s": timings,
        "versions": versions,
        "inputs_sha256": inputs_sha256,
        "paths": paths,
        **extra,
    }


def check_report(report, where) -> dict:
    """A report read back (mscp_report.json, a stored copy of one), checked to be a report this mscp
    reads: a JSON object whose `report_version` (1 when absent) is a version up to REPORT_VERSION.
    MSCPError, one line naming `where`, for anything else."""
    if not isinstance(report, dict):
        raise MSCPError(f"{where} is not an mscp report (a JSON {json_type(report)}, not an object)")
    version = report.get("report_version", 1)
    if type(version) is not int or version < 1:
        raise MSCPError(f"{where} is not an mscp report (report_version {version!r})")
    if version > REPORT_VERSION:
        raise MSCPError(f"{where} is an mscp report of version {version}, written by a newer mscp "
                        f"({report.get('mscp_version')}); this one reads versions up to {REPORT_VERSION}")
    if not isinstance(report.get("status"), str):
        raise MSCPError(f"{where} is not an mscp report (no 'status')")
    return report


def read_report(path) -> dict:
    """mscp_report.json (the file, or the folder holding it) read (strict JSON; the curves may hold
    NaN, as json.dumps writes it) and checked by `check_report`."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    return check_report(read_json_object(path, "mscp report", allow_nan=True), path)


def _module_entry(m: dict) -> dict:
    """A module's report entry; a skipped module's selection moves to `selected_rows`."""
    m = dict(m)
    if m.get("skipped"):
        m["selected_rows"] = m.get("selected_rows", m["rows"])
        m["rows"], m["n_rows"] = [], 0
    return m


def assess(modules: dict[str, dict], prompts: dict[str, int], safety_layers: list[int], config: dict,
           edited: int) -> tuple[str, list[str]]:
    """(status, warnings): what makes a patch edit nothing or almost nothing, in words."""
    warnings = []
    window = f"{safety_layers[0]}-{safety_layers[-1]}" if safety_layers else "(none)"
    skipped = {k: m["skipped"] for k, m in modules.items() if m["skipped"]}
    active = [m for k, m in modules.items() if k not in skipped]
    empty = [m for m in active if not m["n_rows"]]
    if not modules:
        warnings.append(f"the adapter has no LoRA module in the safety layers {window}: nothing to project")
    elif len(skipped) == len(modules):
        reasons = sorted(set(skipped.values()))
        warnings.append(f"every module in the safety layers {window} was skipped ({'; '.join(reasons)}): "
                        "base and aligned weights do not differ there")
    elif skipped:
        warnings.append(f"{len(skipped)} of {len(modules)} modules in the safety layers were skipped "
                        f"({'; '.join(sorted(set(skipped.values())))})")
    if active and len(empty) == len(active):
        warnings.append(f"the row selection is empty in every module: top_q(I^H) \\ top_p(I^T) kept no row "
                        f"(q={config.get('q')}, p={config.get('p')}, score {config.get('score')})")
    elif active and 2 * len(empty) >= len(active) and config.get("score") != "attribution":
        # attribution ranks the rows of all modules together: most modules holding none is by design
        warnings.append(f"the row selection is empty in {len(empty)} of {len(active)} modules "
                        f"(q={config.get('q')}, p={config.get('p')})")
    for name in ("harmful", "benign", "task"):
        n = prompts.get(name)
        if n is not None and n < MIN_PROMPTS:
            warnings.append(f"only {n} {name} prompt{'s' if n != 1 else ''} (fewer than {MIN_PROMPTS}): the layer "
                            "curves and row scores rest on too little data")
    status = "noop" if edited == 0 else "warnings" if warnings else "ok"
    return status, warnings


def prompt_sources(sets: dict[str, list[str]], files: dict[str, list[Path]]) -> dict:
    return {name: [str(Path(f).resolve()) for f in files.get(f"prompts:{name}", [])] or "built-in or in-memory"
            for name in sets}


def input_checksums(files: dict[str, list[Path]]) -> dict[str, dict[str, str]]:
    """{role: {absolute path: sha256}} for every input file."""
    return {role: {str(Path(p).resolve()): sha256_file(p) for p in paths} for role, paths in files.items()}


def check_out_dir(out: Path, overwrite: bool, inputs: list[Path], *, parents: bool = False) -> None:
    """Fail before any work when OUT cannot be written; remove what dead runs left beside it.

    OUT may not be an input, lie inside one, or hold one. Folders are compared by identity (device
    and inode), not by their path strings, so a bind mount, a symbolic link or `..` in a path does
    not hide an overlap. OUT itself may not be a symbolic link (dangling or not: the write would
    land at its target). parents: missing parent folders will be created (`--out-dir`)."""
    if not str(out).strip():
        raise MSCPError("the output path is empty")
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise MSCPError(f"output path {out} is a symbolic link{'' if out.exists() else ' to nothing'}; "
                        "give the real path")
    hit = _overlapping_input(out, inputs)
    if hit is not None:
        raise MSCPError(f"output folder {out} overlaps input {hit}; inputs are never modified")
    remove_stale(out)  # first: it may rename back an OUT that a killed swap had moved aside
    if out.exists() and not overwrite:
        raise MSCPError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise MSCPError(f"output path {out} exists and is not a folder")
    if not out.parent.exists() and not parents:
        raise MSCPError(f"parent folder of the output does not exist: {out.parent}")
    check_writable(out)


def check_cache_dir(cache, inputs: list[Path], outs: list[Path]) -> None:
    """Fail before any work when the result cache (`--cache`) would write where it must not: into
    an input (the same identity check as OUT's), or into an OUT, which is replaced whole."""
    if not str(cache).strip():
        raise MSCPError("the cache path is empty")
    cache = Path(os.path.abspath(cache))
    hit = _overlapping_input(cache, inputs)
    if hit is not None:
        raise MSCPError(f"cache folder {cache} overlaps input {hit}; inputs are never modified")
    for out in outs:
        out = Path(os.path.abspath(out))
        # OUT may not exist yet: compare resolved paths too, not only identities
        inside = _identity(out) is not None and _identity(out) in _identities(cache)
        if inside or Path(os.path.realpath(cache)).is_relative_to(os.path.realpath(out)):
            raise MSCPError(f"cache folder {cache} is {'the' if cache == out else 'inside the'} output folder {out}, "
                            "which is replaced whole; give the cache a folder of its own")
    if cache.exists() and not cache.is_dir():
        raise MSCPError(f"cache path {cache} exists and is not a folder")


def _overlapping_input(path: Path, inputs: list[Path]) -> Path | None:
    """The first input that `path` equals, lies inside or holds, compared by identity (device and
    inode): a bind mount, a symbolic link or `..` does not hide an overlap."""
    chain = _identities(path)  # path and every folder above it
    path_id = _identity(path)
    for p in inputs:
        p = Path(os.path.abspath(p))
        p_id = _identity(p)
        if p_id is not None and (p_id in chain or (path_id is not None and path_id in _identities(p))):
            return p
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _identities(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and of each folder above it, along the path as written and along
    its resolved form (a symbolic link's target has other ancestors than the link)."""
    found = set()
    for chain in (path, Path(os.path.realpath(path))):
        for q in (chain, *chain.parents):
            ident = _identity(q)
            if ident is not None:
                found.add(ident)
    return found


def check_all_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Nothing non-finite is ever written."""
    for name, t in tensors.items():
        check_finite(t, what, name)


@contextlib.contextmanager
def safetensors_write_errors(path: Path):
    """safetensors reports a failed write (disk full...) as SafetensorError: make it the OSError it is."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))  # "... (os error 28)" or "Os { code: 28, ..."
        err = int(code[1] or code[2]) if code else errno.EIO
        raise OSError(err, os.strerror(err), str(path)) from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None, *,
                 finite: bool = True) -> None:
    """`safetensors.torch.save_file` (of finite tensors unless finite=False), write errors as OSError."""
    if finite:
        check_all_finite(tensors, f"output {Path(path).name}")
    with safetensors_write_errors(path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def write_adapter_atomically(out: Path, adapter_config: dict | bytes, tensors: dict[str, torch.Tensor], report: dict,
                             overwrite: bool, model_card: str | None = None, *, parents: bool = False) -> None:
    """OUT = adapter_config.json, adapter_model.safetensors, the report (JSON and HTML) and the model
    card (the input's README.md, if any, with an mscp section), swapped in at once. adapter_config:
    the input file's bytes (copied unchanged), or a dict (an adapter held in memory)."""
    from mscp.core.report_html import model_card_with_mscp_section, render_html

    check_all_finite(tensors, "patched adapter")

    def fill(tmp: Path):
        (tmp / "adapter_config.json").write_bytes(
            adapter_config if isinstance(adapter_config, bytes)
            else (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode())
        weights = tmp / "adapter_model.safetensors"
        with safetensors_write_errors(weights):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the mode every other file here gets (umask)
        os.chmod(weights, stat.S_IMODE((tmp / "adapter_config.json").stat().st_mode))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / HTML_NAME).write_text(render_html(report), encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card_with_mscp_section(model_card, report), encoding="utf-8")

    write_atomically(out, fill, overwrite=overwrite, parents=parents)
