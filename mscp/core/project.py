"""The projection: masked, low-rank, training-free (docs/method.md, "Projection").

For each LoRA module with a row mask S:  B'[S] = (1 - alpha) B[S] + alpha (C B)[S],  C = V V^T / ||V||_F,
V = W_aligned - W_base, computed as V (V^T B) / ||V||_F by the `mscp::lowrank_project` op.
C and B A are never built; rows outside S are untouched bit for bit; A is unchanged.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mscp.core.adapter import _LORA_KEY, PEFT_PREFIX, Adapter, LoraModule
from mscp.core.checkpoint import check_finite, open_source
from mscp.core.config import Backend, PathArg, Projector, check_arguments
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
            B_new, edit = project_module(W_a, W_b, m, adapters[k].tensors[m.key_b], rows, sources=(base, aligned),
                                         alpha=alpha, projector=projector, exact_rank=exact_rank, device=device,
                                         backend=backend)
            tensors, edits = results[k]
            edits[m.key_b] = edit
            if B_new is not None:
                tensors[m.key_b] = B_new
        del W_a, W_b
    return results


def project_module(W_a: torch.Tensor, W_b: torch.Tensor, m: LoraModule, B: torch.Tensor, rows: torch.Tensor, *,
                   sources: tuple, alpha: float, projector: str, exact_rank: int, device: torch.device,
                   backend: str) -> tuple[torch.Tensor | None, ModuleEdit]:
    """One module's projection of `rows` (sorted unique int64) of B, given W_a and W_b as
    `project_adapters` reads them (the aligned checkpoint's dtype, on `device`; W_b cast to it):
    (B' on the CPU in B's dtype, or None where nothing is edited; the module's edit). The one
    computation of a row's projection: `project_adapters` and the patcher's stream (every row of
    the window's modules while their layer is loaded) both call it. sources: (base, aligned), to
    name a non-finite weight."""
    # Each backend computes a row the same whichever other rows are selected, so the rows a
    # patch takes from its attribution pass (every row projected, `rows_from`) are these.
    with use_backend(backend):
        if projector == "exact":
            B_new, norm_v = _exact_projection(W_a, W_b, B.to(device), rows.to(device), alpha, exact_rank)
        else:
            B_new, norm_v = lowrank_project(W_a, W_b, B.to(device), rows.to(device), float(alpha))
    norm_v = float(norm_v)
    if not math.isfinite(norm_v):
        _name_non_finite(W_a, W_b, sources[1], sources[0], m.weight_key)
    skipped = "V is zero" if norm_v == 0.0 else None
    edit = ModuleEdit(m.module, rows.tolist(), norm_v, m.rank, B.shape[0], skipped)
    if not rows.numel() or skipped:
        return None, edit
    B_new = B_new.to(device="cpu", dtype=B.dtype)
    _check_projected(B_new[rows], m.key_b, alpha)
    return B_new, edit


def fast_project(adapter: PathArg | Adapter | torch.nn.Module | Mapping[str, torch.Tensor],
                 base: PathArg | Mapping[str, torch.Tensor],
                 aligned: PathArg | Mapping[str, torch.Tensor] | None = None, masks: Mapping[str, Any] | None = None,
                 *, alpha: float = 1.0, device: str | torch.device | None = None, projector: Projector = "safelora",
                 backend: Backend = "auto", allow_pickle: bool = False, adapter_name: str | None = None,
                 revision: str | None = None) -> dict[str, torch.Tensor]:
    """Project known row masks of a LoRA adapter onto the safety direction; returns the new state dict.

    adapter: an adapter folder or hub id (`revision` pins one), a peft `PeftModel` (then `aligned`
    may be None: its own base weights are the aligned model), or a peft state dict in either key
    style: as saved (`...lora_B.weight`) or as `PeftModel.state_dict()` holds it
    (`...lora_B.default.weight`, base weights beside; `adapter_name` picks one of several).
    base, aligned: model folders, hub ids, safetensors files or state dicts (checkpoint key names).
    masks: lora_B tensor -> rows, keyed by the adapter's lora_B key in either key style or by the
    module's name (`model.layers.3.mlp.up_proj`); rows are integer indices (any iterable: list,
    set, range, tensor, array) or a boolean mask of the module's d_out rows.

    Returns the adapter's tensors under the input's key names (for a `PeftModel.state_dict()`,
    only the chosen adapter's tensors, not the base weights); for a PeftModel, its adapter as peft
    saves it. Every returned tensor is new: none shares memory with the inputs, which are never
    modified. Bad input of any kind raises `MSCPError` with a one-line reason.
    """
    from mscp.core.peft_interop import (
        adapter_of_peft_model,
        adapter_state_dict,
        aligned_of_peft_model,
        fresh,
        is_peft_model,
    )

    check_projection_options(alpha=alpha, projector=projector, device=device, backend=backend)
    if masks is None or not isinstance(masks, Mapping):
        raise MSCPError(f"masks must be a mapping of lora_B tensor names to rows, got {type(masks).__name__}")
    paths = {name: (x, "path") for name, x in (("adapter", adapter), ("base", base), ("aligned", aligned))
             if isinstance(x, (str, os.PathLike))}  # '' would be the current folder
    check_arguments(**paths, allow_pickle=(allow_pickle, "bool"), revision=(revision, "str?"),
                    adapter_name=(adapter_name, "str?"), masks=(masks, "data"))
    if is_peft_model(adapter):
        name = adapter_name or "default"
        lora = adapter_of_peft_model(adapter, name)
        if aligned is None:
            aligned = aligned_of_peft_model(adapter).tensors
    elif isinstance(adapter, Adapter):
        lora = adapter
    elif isinstance(adapter, Mapping):
        lora = Adapter.from_state_dict(adapter_state_dict(dict(adapter), adapter_name))
    elif isinstance(adapter, (str, Path)):
        lora = Adapter.load(adapter, allow_pickle=allow_pickle, revision=revision)
    else:
        raise MSCPError("adapter must be a folder, a hub id, a PeftModel or a state dict, got "
                        f"{type(adapter).__name__}")
    for label, source in (("base", base), ("aligned", aligned)):
        if not isinstance(source, (str, Path, Mapping)) and not hasattr(source, "get"):
            raise MSCPError(f"{label} must be a model folder, a hub id, a safetensors file or a state dict, "
                            f"got {type(source).__name__}")
    base = dict(base) if isinstance(base, Mapping) else base
    aligned = dict(aligned) if isinstance(aligned, Mapping) else aligned
    check_arguments(base=(base, "data"), aligned=(aligned, "data"))  # a PeftModel's own weights included
    masks = mask_keys(lora, masks)
    tensors, _ = project_adapter(lora, base, aligned, masks, alpha=float(alpha), projector=projector,
                                 device=str(device) if device is not None else None, backend=backend,
                                 allow_pickle=allow_pickle)
    inputs = list(lora.tensors.values())
    for source in (base, aligned):
        if isinstance(source, dict):
            inputs += [t for t in source.values() if isinstance(t, torch.Tensor)]
    return fresh(tensors, inputs)


def check_projection_options(*, alpha, projector: Projector, device, backend: Backend) -> None:
    """The projection's options, checked as PatchConfig checks them, plus a CUDA device that exists."""
    from mscp.core.config import PatchConfig

    if isinstance(device, torch.device):
        device = str(device)
    PatchConfig(alpha=alpha, projector=projector, device="cpu" if device is None else device, backend=backend)
    check_device(device)


def check_device(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise MSCPError(f"device {device} requested but CUDA is not available (this torch is "
                            f"{torch.__version__})")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise MSCPError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")


def mask_keys(adapter: Adapter, masks: Mapping) -> dict[str, object]:
    """masks re-keyed by the adapter's own lora_B keys; a mask may name its module in either peft
    key style (with or without the adapter name) or by the module's checkpoint name."""
    by_b = adapter.by_b_key()
    out: dict[str, object] = {}
    for key, rows in masks.items():
        if not isinstance(key, str):
            raise MSCPError(f"mask keys must be lora_B tensor names, got {key!r}")
        found = key if key in by_b else None
        if found is None:
            m = _LORA_KEY.match(key)
            module = m["module"].removeprefix(PEFT_PREFIX) if m and m["which"] == "B" else \
                key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
            if (m is None or m["which"] == "B") and module in adapter.modules:
                found = adapter.modules[module].key_b
        if found is None:
            example = next(iter(by_b), "?")
            raise MSCPError(f"mask key {key} is not a lora_B tensor of the adapter (its lora_B keys look like "
                            f"{example})")
        if found in out:
            raise MSCPError(f"two mask keys name the same lora_B tensor {found}")
        out[found] = rows
    return out


def rows_from(adapter: Adapter, every_row: tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]],
              masks: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]:
    """What `project_adapters` returns for `masks`, taken from its result for every row of the same
    modules (`every_row`, as the attribution pass computes it) without reading a weight again. Each
    backend computes a row the same whichever others are selected (tests/test_ops_lowrank_project),
    so this is the same result, bit for bit (tests/test_reads.py)."""
    projected, edits_all = every_row
    tensors, edits = dict(adapter.tensors), {}
    for key_b, rows in masks.items():
        if key_b not in edits_all:
            raise MSCPError(f"mask key {key_b} was not projected in the attribution pass")
        B = adapter.tensors[key_b]
        rows = _rows_tensor(rows, B.shape[0], key_b)
        e = edits_all[key_b]
        edits[key_b] = ModuleEdit(e.module, rows.tolist(), e.norm_v, e.rank, e.d_out, e.skipped)
        if rows.numel() and not e.skipped:
            B_new = B.clone()
            B_new[rows] = projected[key_b][rows]
            tensors[key_b] = B_new
    return tensors, edits


def project_for(config, adapters: list[Adapter], base, aligned, masks: list[dict[str, object]], *, progress=None
                ) -> list[tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]]:
    """`project_adapters` with a PatchConfig's projection settings: the one way a patch, a Pareto
    point and `mscp tune` project rows."""
    return project_adapters(adapters, base, aligned, masks, **projection_options(config),
                            allow_pickle=config.allow_pickle, progress=progress)


def projection_options(config) -> dict:
    """A PatchConfig's projection settings, as `project_adapters` (and `project_module`) take them."""
    return dict(alpha=config.alpha, projector=config.projector, exact_rank=config.exact_rank, device=config.device,
                backend=config.backend)


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
    """Row indices (any iterable of integers) or a boolean mask of d_out rows -> sorted unique int64."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise MSCPError(f"mask for {key} must be row indices or a boolean mask, got {type(rows).__name__}")
    if isinstance(rows, torch.Tensor):
        t = rows.detach().cpu().reshape(-1)
    else:
        items = list(rows)
        bad = next((r for r in items if isinstance(r, (str, bytes)) or not _is_number(r)), None)
        if bad is not None:
            raise MSCPError(f"mask for {key} holds {bad!r}: rows must be integer indices or booleans")
        try:
            t = torch.as_tensor([_item(r) for r in items]).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise MSCPError(f"mask for {key} must be a flat list of row indices or booleans") from None
    if not t.numel() and t.dtype != torch.bool:
        return torch.empty(0, dtype=torch.int64)
    if t.dtype == torch.bool:
        if t.numel() != d_out:
            raise MSCPError(f"boolean mask for {key} has {t.numel()} entries, the module has {d_out} rows")
        return torch.nonzero(t).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise MSCPError(f"mask for {key} holds non-integer rows (e.g. {t[0].item()!r}); rows are integer indices "
                        "or booleans")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_out):
        raise MSCPError(f"mask for {key} has a row index outside 0..{d_out - 1}")
    return torch.unique(t)  # sorted, no duplicates


def _is_number(x) -> bool:
    return isinstance(x, (bool, int, float)) or (hasattr(x, "dtype") and hasattr(x, "item"))


def _item(x):
    return x.item() if hasattr(x, "item") and not isinstance(x, (bool, int, float)) else x


def _exact_projection(W_a, W_b, B, rows, alpha, rank):
    """C = Q Q^T with Q the top-`rank` left singular vectors of V: an idempotent projector."""
    acc = accumulate_dtype(W_a, W_b, B)
    V = W_a.to(acc) - W_b.to(acc)
    norm_v = torch.linalg.vector_norm(V)
    out = B.clone()
    if rows.numel() and norm_v > 0:
        Q = torch.linalg.svd(V, full_matrices=False).U[:, : min(rank, min(V.shape))]
        B_rows = B[rows].to(acc)
        CB_rows = (Q @ (Q.T @ B.to(acc)))[rows]  # every row, then the selected: row i's bits never depend on the others
        out[rows] = ((1 - alpha) * B_rows + alpha * CB_rows).to(B.dtype)
    return out, norm_v.float()
