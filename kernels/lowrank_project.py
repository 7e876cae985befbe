"""`mscp::lowrank_project`: the masked projection of lora_B onto the safety direction.

    V = W_a - W_b,   C = V V^T / ||V||_F
    B'[rows] = B[rows] + alpha * ((C B)[rows] - B[rows]),   every other row of B' is B's, bit for bit

C B is computed as V (V^T B) / ||V||_F: G = V^T B (d_in, r) and ||V||_F come from one pass over
W_a and W_b; the selected rows then need only W_a[rows] and W_b[rows]. C and B A are never built.
B may hold several adapters side by side (d_out, r*K). Returns (B', ||V||_F as a 0-d fp32 tensor).
When V is zero the module has no safety direction: B' is B and ||V||_F = 0.
"""
from __future__ import annotations

import torch

from mscp.kernels._backend import register, select

OP = "mscp::lowrank_project"


def _check(W_a, W_b, B, rows):
    torch._check(W_a.shape == W_b.shape and W_a.dim() == 2, lambda: "W_a and W_b must be the same 2-D shape")
    torch._check(B.dim() == 2 and B.shape[0] == W_a.shape[0], lambda: "B must be (d_out, r)")
    torch._check(rows.dim() == 1 and rows.dtype == torch.int64, lambda: "rows must be a 1-D int64 tensor")


def accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, fp32 otherwise (bf16/fp16 storage, fp32 accumulation)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@register(OP, "torch")
def lowrank_project_torch(W_a, W_b, B, rows, alpha):
    """Reference: G and ||V|| from the whole of V, then the selected rows."""
    acc = accumulate_dtype(W_a, W_b, B)
    V = W_a.to(acc) - W_b.to(acc)
    norm_v = torch.linalg.vector_norm(V)
    out = B.clone()
    if rows.numel() and norm_v > 0:
        G = V.T @ B.to(acc)
        B_rows = B[rows].to(acc)
        CB_rows = (V[rows] @ G) / norm_v
        out[rows] = (B_rows + alpha * (CB_rows - B_rows)).to(B.dtype)
    return out, norm_v.float()


@torch.library.custom_op(OP, mutates_args=())
def lowrank_project(
    W_a: torch.Tensor, W_b: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(W_a, W_b, B, rows)
    _name, fn = select(OP, B.device.type)
    return fn(W_a, W_b, B, rows, alpha)


@lowrank_project.register_fake
def _(W_a, W_b, B, rows, alpha):
    _check(W_a, W_b, B, rows)
    return torch.empty_like(B), B.new_empty((), dtype=torch.float32)
