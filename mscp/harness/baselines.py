"""Baselines run through the same harness as MSCP; each writes a peft adapter folder and a report.

- safe_lora: Safe LoRA (Hsu et al. 2024). Per LoRA module, C = V V^T / ||V||_F with V = W_a - W_b,
  dW = s B A; the module is projected (B <- C B, so dW <- C dW, once) when cos(C dW, dW) is below
  `tau` ("threshold" mode) or is among the `k` lowest ("number" mode). The projection is applied
  once to the original B, as in IBM's reference (its "number" mode edits the model in a first pass
  at threshold 0.3, but the second pass recomputes every lora_B from a copy of the original, so the
  result is one projection there too). Edits every row of B of a chosen module.
- wanda: Antidote-like pruning: the MSCP safety rows S (top-q harmful Wanda rows minus top-p task
  rows, in the safety layers; taken from an MSCP report) have their lora_B rows zeroed instead of
  projected.
- drop_safety_layers: the adapter removed (lora_B zeroed) on every module of the safety layers.

Edit fraction everywhere: changed LoRA parameters (rows of B x r) / all LoRA parameters (A and B).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mscp.core.adapter import Adapter, layer_index
from mscp.core.atomic import write_atomically
from mscp.core.checkpoint import Checkpoint
from mscp.errors import MSCPError


def write_adapter(src: str | Path, tensors: dict[str, torch.Tensor], out: str | Path, report: dict) -> Path:
    """A peft adapter folder: the source's adapter_config.json, the tensors, and the method's report."""
    def fill(tmp: Path):
        shutil.copy2(Path(src) / "adapter_config.json", tmp / "adapter_config.json")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "baseline_report.json").write_text(json.dumps(report, indent=2) + "\n")

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, fill, overwrite=True)


def _edit_fraction(adapter: Adapter, edited_rows: dict[str, int]) -> dict:
    total = adapter.n_parameters()
    edited = sum(n * adapter.by_b_key()[k].rank for k, n in edited_rows.items())
    return {"edit_fraction": edited / total if total else 0.0, "edited_parameters": edited, "lora_parameters": total}


def safe_lora_cosines(adapter: Adapter, base: Checkpoint, aligned: Checkpoint) -> dict[str, dict]:
    """cos(C dW, dW) of each module, computed in the rank-r space (no d x d matrix, no B A)."""
    out = {}
    for m in adapter.modules.values():
        b = adapter.tensors[m.key_b].double()
        a = adapter.tensors[m.key_a].double()
        v = aligned.get(m.weight_key).double() - base.get(m.weight_key).double()
        norm_v = float(torch.linalg.norm(v))
        if norm_v == 0:
            out[m.key_b] = {"cos": None, "norm_v": 0.0}
            continue
        cb = v @ (v.T @ b) / norm_v  # C B
        aat = a @ a.T  # r x r; s cancels in the cosine
        inner = torch.trace(cb.T @ b @ aat)
        n1 = torch.sqrt(torch.clamp(torch.trace(cb.T @ cb @ aat), min=0))
        n2 = torch.sqrt(torch.clamp(torch.trace(b.T @ b @ aat), min=0))
        cos = float(inner / (n1 * n2)) if n1 > 0 and n2 > 0 else None
        out[m.key_b] = {"cos": cos, "norm_v": norm_v, "cb": cb}
    return out


def safe_lora(base, aligned, adapter, out, *, tau: float | None = 0.5, k: int | None = None) -> dict:
    """Safe LoRA: project B <- C B on modules with cos(C dW, dW) < tau (or the k lowest)."""
    ad = Adapter.load(adapter)
    cb_all = safe_lora_cosines(ad, Checkpoint(base, label="base"), Checkpoint(aligned, label="aligned"))
    cands = [(key, r["cos"]) for key, r in cb_all.items() if r["cos"] is not None]
    if k is not None:
        chosen = {key for key, _ in sorted(cands, key=lambda x: x[1])[:k]}
    elif tau is not None:
        chosen = {key for key, c in cands if c < tau}
    else:
        raise MSCPError("safe_lora: give tau or k")
    tensors = dict(ad.tensors)
    for key in chosen:
        tensors[key] = cb_all[key]["cb"].to(ad.tensors[key].dtype)
    report = {"method": "safe_lora", "tau": tau, "k": k, "n_modules": len(chosen),
              "cosines": {key: r["cos"] for key, r in cb_all.items()}, "projected": sorted(chosen),
              **_edit_fraction(ad, {key: ad.tensors[key].shape[0] for key in chosen})}
    write_adapter(adapter, tensors, out, report)
    return report


def wanda_prune(adapter, mscp_report: dict, out) -> dict:
    """Zero the lora_B rows MSCP selected (its safety rows), instead of projecting them."""
    ad = Adapter.load(adapter)
    tensors = dict(ad.tensors)
    edited = {}
    for key, m in mscp_report["modules"].items():
        rows = m.get("rows") or []
        if rows and key in tensors and not m.get("skipped"):
            t = tensors[key].clone()
            t[torch.tensor(rows, dtype=torch.long)] = 0
            tensors[key] = t
            edited[key] = len(rows)
    report = {"method": "wanda", "rows_from": "mscp safety rows", **_edit_fraction(ad, edited)}
    write_adapter(adapter, tensors, out, report)
    return report


def drop_layers(adapter, layers, out) -> dict:
    """Remove the adapter from the given decoder layers (lora_B := 0 there)."""
    ad = Adapter.load(adapter)
    layers = set(layers)
    tensors = dict(ad.tensors)
    edited = {}
    for m in ad.modules.values():
        if layer_index(m.module) in layers:
            tensors[m.key_b] = torch.zeros_like(tensors[m.key_b])
            edited[m.key_b] = tensors[m.key_b].shape[0]
    report = {"method": "drop_safety_layers", "layers": sorted(layers), **_edit_fraction(ad, edited)}
    write_adapter(adapter, tensors, out, report)
    return report
