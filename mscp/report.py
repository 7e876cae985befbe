"""The run report and atomic output.

OUT is assembled in a temporary sibling folder and renamed into place, so a failed run leaves
no half-written OUT and an existing OUT is replaced only with --overwrite, in one rename.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from mscp.checkpoint import sha256_file
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
    out = Path(out).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            if not overwrite:
                raise MSCPError(f"output folder {out} already exists (pass --overwrite to replace it)")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
