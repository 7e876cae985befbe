"""The projection: masked, low-rank, training-free (METHOD.md, "Projection").

For each LoRA module with a row mask S:  B'[S] = (1 - alpha) B[S] + alpha (C B)[S],  C = V V^T / ||V||_F,
V = W_aligned - W_base, computed as V (V^T B) / ||V||_F by the `mscp::lowrank_project` op.
C and B A are never built; rows outside S are untouched bit for bit; A is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mscp.core.adapter import Adapter, LoraModule
from mscp.core.checkpoint import check_finite, open_source
from mscp.core.streaming import read_ahead
from mscp.errors import MSCPError
from mscp.kernels import lowrank_project, use_backend
from mscp.kernels.lowrank_project import accumulate_dtype


@dataclass
class ModuleEdit:
    """What the projection did to one module (one entry of the report's `modules`)."""

    module: str
    rows: list[int]
    norm_v: float
    rank: int
    d_out: int
    skipped: str | None = None  # why nothing was edited, e.g. "V is zero"

    @property
    def edited_parameters(self) -> int:
        return 0 if self.skipped else len(self.rows) * self.rank

    def to_dict(self) -> dict:
        return {"module": self.module, "rows": self.rows, "n_rows": len(self.rows), "d_out": self.d_out,
                "rank": self.rank, "norm_v": self.norm_v, "skipped": self.skipped}


def project_adapter(adapter: Adapter, base, aligned, masks: dict[str, object], **kwargs
                    ) -> tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]:
    """Project the masked rows of every lora_B in `masks`; returns (new tensors, edits by lora_B key)."""
    return project_adapters([adapter], base, aligned, [masks], **kwargs)[0]


@torch.no_grad()
def project_adapters(adapters: list[Adapter], base, aligned, masks: list[dict[str, object]], *, alpha: float = 1.0,
                     projector: str = "safelora", exact_rank: int = 64, device=None, backend: str = "auto",
                     allow_pickle: bool = False, progress=None) -> list[tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]]:
    """`project_adapter` for several adapters of one model: each weight is read once for all of them.

    Every adapter is projected by its own call of the op on the same W_a and W_b, so each result
    is exactly what projecting that adapter alone gives.
    """
    base = open_source(base, "base", allow_pickle=allow_pickle)
    aligned = open_source(aligned, "aligned", allow_pickle=allow_pickle)
    device = torch.device(device or "cpu")
    by_weight: dict[str, list[tuple[int, LoraModule, torch.Tensor]]] = {}  # weight key -> (adapter, module, rows)
    for k, (adapter, adapter_masks) in enumerate(zip(adapters, masks)):
        by_b = adapter.by_b_key()
        unknown = sorted(set(adapter_masks) - set(by_b))
        if unknown:
            raise MSCPError(f"mask key {unknown[0]} is not a lora_B tensor of the adapter")
        for key_b, rows in adapter_masks.items():
            m = by_b[key_b]
            B = adapter.tensors[key_b]
            for src in (base, aligned):
                if tuple(src.shape(m.weight_key)) != (B.shape[0], adapter.tensors[m.key_a].shape[1]):
                    raise MSCPError(f"{src.label} weight {m.weight_key} {tuple(src.shape(m.weight_key))} does not fit "
                                    f"the adapter's {m.module}")
            by_weight.setdefault(m.weight_key, []).append((k, m, _rows_tensor(rows, B.shape[0], key_b)))
    results = [(dict(adapter.tensors), {}) for adapter in adapters]  # untouched tensors are shared, never modified
    def load(weight_key):
        # Mapped, not copied (the op only reads them), and unchecked: a NaN or Inf in W_a or W_b
        # makes ||V|| non-finite, which is checked below. Both save a pass over the weights.
        W_a = aligned.get(weight_key, device=device, check=False, mapped=True)
        return W_a, base.get(weight_key, device=device, check=False, mapped=True).to(W_a.dtype)

    weights = read_ahead(sorted(by_weight), load)  # the next module is mapped while this one computes
    for weight_key, (W_a, W_b) in (progress(weights, desc="project", unit="module", total=len(by_weight))
                                   if progress else weights):
        for k, m, rows in by_weight[weight_key]:
            key_b = m.key_b
            B = adapters[k].tensors[key_b]
            with use_backend(backend):
                if projector == "exact":
                    B_new, norm_v = _exact_projection(W_a, W_b, B.to(device), rows.to(device), alpha, exact_rank)
                else:
                    B_new, norm_v = lowrank_project(W_a, W_b, B.to(device), rows.to(device), float(alpha))
            norm_v = float(norm_v)
            if not math.isfinite(norm_v):
                _name_non_finite(W_a, W_b, aligned, base, weight_key)
            skipped = "V is zero" if norm_v == 0.0 else None
            tensors, edits = results[k]
            edits[key_b] = ModuleEdit(m.module, rows.tolist(), norm_v, m.rank, B.shape[0], skipped)
            if rows.numel() and not skipped:
                B_new = B_new.to(device="cpu", dtype=B.dtype)
                _check_projected(B_new[rows], key_b, alpha)
                tensors[key_b] = B_new
        del W_a, W_b
    return results


def fast_project(adapter, base, aligned, masks: dict[str, object], *, alpha: float = 1.0, device=None,
                 projector: str = "safelora", backend: str = "auto", allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Project known row masks of a LoRA adapter onto the safety direction; returns the new state dict.

    adapter: an adapter folder or a state dict (peft key names); base, aligned: model folders,
    safetensors files or state dicts (checkpoint key names); masks: lora_B key -> row indices.
    Inputs are never modified.
    """
    adapter = adapter if isinstance(adapter, Adapter) else (
        Adapter.from_state_dict(adapter) if isinstance(adapter, dict) else Adapter.load(adapter, allow_pickle=allow_pickle))
    tensors, _ = project_adapter(adapter, base, aligned, masks, alpha=alpha, projector=projector,
                                 device=device, backend=backend, allow_pickle=allow_pickle)
    return tensors


def edit_fraction(adapter: Adapter, edits: dict[str, ModuleEdit]) -> float:
    """Edited LoRA parameters (|S| * r per module) over all LoRA parameters of the adapter."""
    total = adapter.n_parameters()
    return sum(e.edited_parameters for e in edits.values()) / total if total else 0.0


def _name_non_finite(W_a, W_b, aligned, base, key: str) -> None:
    """||V|| is not finite: say which model's weight holds the NaN or Inf (or that V overflowed)."""
    check_finite(W_a, aligned.label, key)
    check_finite(W_b, base.label, key)
    raise MSCPError(f"||W_aligned - W_base|| of {key} overflows")


def _check_projected(rows: torch.Tensor, key: str, alpha) -> None:
    """Nothing non-finite is ever written: e.g. an alpha or a V so large that B' overflows its dtype."""
    if rows.is_floating_point() and rows.numel() and not bool(torch.isfinite(rows).all()):
        raise MSCPError(f"the projection of {key} gives NaN or Inf (alpha {alpha}, dtype "
                        f"{str(rows.dtype).removeprefix('torch.')}); nothing was written")


def _rows_tensor(rows, d_out: int, key: str) -> torch.Tensor:
    t = torch.as_tensor(rows if not isinstance(rows, torch.Tensor) else rows.cpu(), dtype=torch.int64).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_out):
        raise MSCPError(f"mask for {key} has a row index outside 0..{d_out - 1}")
    return torch.unique(t)  # sorted, no duplicates


def _exact_projection(W_a, W_b, B, rows, alpha, rank):
    """C = Q Q^T with Q the top-`rank` left singular vectors of V: an idempotent projector."""
    acc = accumulate_dtype(W_a, W_b, B)
    V = W_a.to(acc) - W_b.to(acc)
    norm_v = torch.linalg.vector_norm(V)
    out = B.clone()
    if rows.numel() and norm_v > 0:
        Q = torch.linalg.svd(V, full_matrices=False).U[:, : min(rank, min(V.shape))]
        B_rows = B[rows].to(acc)
        CB_rows = Q[rows] @ (Q.T @ B.to(acc))
        out[rows] = ((1 - alpha) * B_rows + alpha * CB_rows).to(B.dtype)
    return out, norm_v.float()
