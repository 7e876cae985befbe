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
- csulora: CSULoRA (Marchenko Breneur et al. 2026, arXiv 2605.30640), as we read its abstract (no
  reference code or full text was available): each LoRA direction keeps its part inside the
  aligned-minus-base safety subspace and has the rest shrunk by 1/(1 + lambda_j); see `csulora`.

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


def _displacement(m, base: Checkpoint, aligned: Checkpoint) -> torch.Tensor:
    """V = W_aligned - W_base of one LoRA module's weight, float64 (d_out x d_in)."""
    return aligned.get(m.weight_key).double() - base.get(m.weight_key).double()


def safe_lora_cosines(adapter: Adapter, base: Checkpoint, aligned: Checkpoint) -> dict[str, dict]:
    """cos(C dW, dW) of each module, computed in the rank-r space (no d x d matrix, no B A)."""
    out = {}
    for m in adapter.modules.values():
        b = adapter.tensors[m.key_b].double()
        a = adapter.tensors[m.key_a].double()
        v = _displacement(m, base, aligned)
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


# -- CSULoRA -------------------------------------------------------------------------------------------
CSULORA_ENERGY = 0.9  # documented defaults, not tuned on any split of the organism
CSULORA_LAM = 4.0
CSULORA_EPS = 1e-12  # rho_j below this counts as eps: lambda_j ~ lam / eps, the direction is removed
ALIGNED_TOL = 1e-6  # for the report only: rho_j >= 1 - tol "fully aligned", <= tol "off-subspace"


def csulora_subspace(d: torch.Tensor, energy: float = CSULORA_ENERGY) -> torch.Tensor:
    """U_k (d_out x k, float64): the fewest top left singular vectors of D = W_aligned - W_base whose
    squared singular values hold at least `energy` of ||D||_F^2 (k = 0 when D = 0)."""
    u, sv, _ = torch.linalg.svd(d.double(), full_matrices=False)
    e = sv.square()
    total = float(e.sum())
    if total == 0:
        return u[:, :0]
    # first index whose cumulative energy reaches the share; clamped as rounding may leave the
    # last cumulative sum a hair below energy * total when energy = 1
    first = int(torch.searchsorted(torch.cumsum(e, 0), torch.tensor([energy * total], dtype=e.dtype))[0])
    return u[:, :min(first + 1, len(sv))]


def csulora_b(b: torch.Tensor, a: torch.Tensor, u_k: torch.Tensor, lam: float = CSULORA_LAM,
              eps: float = CSULORA_EPS) -> tuple[torch.Tensor, dict]:
    """The corrected lora_B (float64) of one module with lora_A kept; see `csulora` for the closed form.

    Works in the rank-r space: B = Q_B R_B, A^T = Q_A R_A, R_B R_A^T = U~ S V~^T, so B A = U S V^T
    with U = Q_B U~ (d_out x r); no d_out x d_in matrix and no d_out x d_out projector is formed.
    The LoRA scale s multiplies every sigma_j alike and changes neither U nor B'."""
    b64, a64 = b.double(), a.double()
    qb, rb = torch.linalg.qr(b64)
    _, ra = torch.linalg.qr(a64.T)
    core_u, sigma, _ = torch.linalg.svd(rb @ ra.T)
    u = qb @ core_u  # left singular vectors of B A
    rho = (u_k.T @ u).square().sum(0).clamp(0.0, 1.0)  # ||P u_j||^2, the share of u_j inside the subspace
    lambdas = lam * (1 - rho) / rho.clamp_min(eps)
    c = 1 / (1 + lambdas)  # what the off-subspace part (I - P) u_j is multiplied by
    y = u @ (c[:, None] * (u.T @ b64))  # U C U^T B
    b_new = y + u_k @ (u_k.T @ (b64 - y))  # P B + (I - P) U C U^T B
    energy = sigma.square()
    # ||s (B' - B) A||_F / ||s B A||_F = sqrt(sum sigma_j^2 (1 - c_j)^2 (1 - rho_j) / sum sigma_j^2)
    removed = float((energy * (1 - c).square() * (1 - rho)).sum())
    total = float(energy.sum())
    info = {"rho": rho.tolist(), "lambda": lambdas.tolist(), "c": c.tolist(),
            "relative_change": (removed / total) ** 0.5 if total > 0 else 0.0,
            "fully_aligned": int((rho >= 1 - ALIGNED_TOL).sum()), "off_subspace": int((rho <= ALIGNED_TOL).sum())}
    info["partially_aligned"] = len(rho) - info["fully_aligned"] - info["off_subspace"]
    return b_new, info


def csulora(base, aligned, adapter, out, *, energy: float = CSULORA_ENERGY, lam: float = CSULORA_LAM) -> dict:
    """CSULoRA (Marchenko Breneur et al. 2026, "Closest Safe Update Low-Rank Adaptation", arXiv
    2605.30640) as we read its abstract; only the abstract was available (no full text, no reference
    code), so every detail below is our reading, not the authors' specification.

    Per LoRA module, with D = W_aligned - W_base (the tensors Safe LoRA reads):
    - the safety subspace: U_k, the fewest top left singular vectors of D holding `energy` of
      ||D||_F^2 (default 0.9), and P = U_k U_k^T (on the output side, like Safe LoRA's C B);
    - the update dW = s B A = sum_j sigma_j u_j v_j^T (thin SVD, rank <= r), and each direction's
      relative energy inside the subspace rho_j = ||P u_j||^2 in [0, 1]: rho_j = 1 fully aligned,
      0 < rho_j < 1 partially aligned, rho_j = 0 off-subspace (the abstract's three components);
    - per direction, the penalized minimum-change problem
          X_j = argmin_X ||X - sigma_j u_j v_j^T||_F^2 + lambda_j ||(I - P) X||_F^2,
          lambda_j = lam (1 - rho_j) / max(rho_j, eps)   (eps = 1e-12; the penalty grows as u_j
      leaves the subspace). Setting the gradient to zero, with (I - P)^T (I - P) = I - P:
          (I + lambda_j (I - P)) X = sigma_j u_j v_j^T,
      and as P and I - P are complementary projectors, (I + lambda (I - P))^{-1} = P + (I - P)/(1 + lambda):
          X_j = sigma_j [P u_j + (I - P) u_j / (1 + lambda_j)] v_j^T.
      The part inside the subspace is kept exactly; the rest is shrunk by c_j = 1/(1 + lambda_j)
      (kept for rho_j = 1, removed up to ~eps/lam for rho_j = 0; lam = 0 changes nothing);
    - the corrected update dW' = sum_j X_j = G dW with G = P + (I - P) U C U^T, C = diag(c_j)
      (U^T dW = S V^T). So lora_A is kept and lora_B alone changes: B' = G B, s B' A = dW'. It is
      computed as Y = U C (U^T B), B' = Y + U_k (U_k^T (B - Y)), never forming d x d matrices.
    A module whose D is zero has no subspace and is left as it is (as Safe LoRA skips it).

    Defaults (energy 0.9, lam 4) are documented choices, not tuned on any split. Edit fraction: the
    project's one rule, changed rows of B x r over all LoRA parameters; G is dense, so a changed
    module usually changes every row of its B (counted as written, after the cast to B's dtype)."""
    if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise MSCPError(f"csulora: energy must be a fraction in (0, 1], got {energy!r}")
    if not (isinstance(lam, (int, float)) and 0 <= lam < float("inf")):
        raise MSCPError(f"csulora: lam must be a finite number >= 0, got {lam!r}")
    ad = Adapter.load(adapter)
    base_ck, aligned_ck = Checkpoint(base, label="base"), Checkpoint(aligned, label="aligned")
    tensors = dict(ad.tensors)
    modules, edited = {}, {}
    for m in ad.modules.values():
        u_k = csulora_subspace(_displacement(m, base_ck, aligned_ck), energy)
        if u_k.shape[1] == 0:
            modules[m.key_b] = {"k": 0, "skipped": "W_aligned == W_base", "changed_rows": 0}
            continue
        b = ad.tensors[m.key_b]
        b_new, info = csulora_b(b, ad.tensors[m.key_a], u_k, lam)
        written = b_new.to(b.dtype)
        changed = int((written != b).any(dim=1).sum()) if lam > 0 else 0
        if changed:
            tensors[m.key_b] = written
            edited[m.key_b] = changed
        modules[m.key_b] = {"k": u_k.shape[1], "d_out": b.shape[0], "changed_rows": changed, **info}
    report = {"method": "csulora", "energy": energy, "lam": lam, "eps": CSULORA_EPS,
              "reading": "our reading of the abstract of arXiv 2605.30640 (no reference code)",
              "changed": sorted(edited), "n_modules": len(edited), "modules": modules, **_edit_fraction(ad, edited)}
    write_adapter(adapter, tensors, out, report)
    return report
