"""The run report and atomic output.

OUT is written by mscp.core.atomic: assembled in a temporary sibling folder and swapped into place,
so a failed run leaves no half-written OUT, and an existing OUT is replaced only with --overwrite.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from mscp.core.atomic import write_atomically
from mscp.core.checkpoint import sha256_file
from mscp.errors import MSCPError

REPORT_NAME = "mscp_report.json"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("mscp", "torch", "transformers", "peft", "safetensors", "triton", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_report(*, config: dict, safety_layers: list[int], n_layers: int, layer_curves: list[dict],
                 modules: dict[str, dict], lora_parameters: int, prompts: dict[str, int], prompt_sources: dict,
                 backends: dict[str, str], compute_dtype: str, timings: dict, inputs_sha256, paths: dict,
                 versions: dict | None = None, **extra) -> dict:
    """The report of a patched adapter (mscp_report.json): the one builder, for `patch` and for a
    continual state's adapter alike. `modules`: lora_B key -> ModuleEdit.to_dict()."""
    versions = versions or package_versions()
    edited = sum(m["n_rows"] * m["rank"] for m in modules.values() if not m["skipped"])
    return {
        "mscp_version": versions["mscp"],
        "safety_layers": safety_layers,
        "n_layers": n_layers,
        "layer_curves": layer_curves,
        "modules": dict(sorted(modules.items())),
        "edit_fraction": edited / lora_parameters if lora_parameters else 0.0,
        "edited_parameters": edited,
        "lora_parameters": lora_parameters,
        "skipped_modules": sorted(key for key, m in modules.items() if m["skipped"]),
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


def prompt_sources(sets: dict[str, list[str]], files: dict[str, list[Path]]) -> dict:
    return {name: [str(f) for f in files.get(f"prompts:{name}", [])] or "built-in or in-memory" for name in sets}


def input_checksums(files: dict[str, list[Path]]) -> dict[str, dict[str, str]]:
    """{role: {path: sha256}} for every input file."""
    return {role: {str(p): sha256_file(p) for p in paths} for role, paths in files.items()}


def check_out_dir(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Fail before any work when OUT cannot be written."""
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p in out.parents or out in p.parents:
            raise MSCPError(f"output folder {out} overlaps input {p}; inputs are never modified")
    if out.exists() and not overwrite:
        raise MSCPError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise MSCPError(f"output path {out} exists and is not a folder")
    if not out.parent.exists():
        raise MSCPError(f"parent folder of the output does not exist: {out.parent}")


def write_adapter_atomically(out: Path, adapter_config: dict, tensors: dict[str, torch.Tensor], report: dict,
                             overwrite: bool) -> None:
    """OUT = adapter_config.json, adapter_model.safetensors and the report, swapped in at once."""
    def fill(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    write_atomically(out, fill, overwrite=overwrite)
