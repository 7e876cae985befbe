"""`mscp::row_importance`: Wanda row scores of a (possibly LoRA-updated) weight.

    out = |W + scale * B A| @ N          W (d_out, d_in), B (d_out, r), A (r, d_in), N (d_in, K) fp32

returned as fp32 (d_out, K). K columns score several activation statistics in one read of W
(e.g. harmful and task channel norms). B and A may be absent: then out = |W| @ N. The effective
weight W + scale * B A is only ever formed a block of rows at a time.
"""
from __future__ import annotations

from typing import Optional

import torch

from mscp.kernels._backend import register, select

OP = "mscp::row_importance"
ROWS_PER_BLOCK = 1024  # bounds the reference's temporary to 1024 x d_in


def _check(W, B, A, N):
    torch._check(W.dim() == 2 and N.dim() == 2 and N.shape[0] == W.shape[1], lambda: "N must be (d_in, K)")
    torch._check((B is None) == (A is None), lambda: "B and A come together")
    if B is not None:
        torch._check(B.shape[0] == W.shape[0] and A.shape[1] == W.shape[1] and B.shape[1] == A.shape[0],
                     lambda: "B must be (d_out, r) and A (r, d_in)")


@register(OP, "torch")
def row_importance_torch(W, B, A, scale, N):
    """Reference: fp32 blocks of rows of |W + scale B A| times N."""
    N = N.float()
    out = torch.empty(W.shape[0], N.shape[1], dtype=torch.float32, device=W.device)
    A32 = A.float() if A is not None else None
    for start in range(0, W.shape[0], ROWS_PER_BLOCK):
        stop = min(start + ROWS_PER_BLOCK, W.shape[0])
        block = W[start:stop].to(torch.float32, copy=True)  # never write into W
        if B is not None:
            block = block.addmm_(B[start:stop].float(), A32, alpha=scale)
        torch.mm(block.abs_(), N, out=out[start:stop])
    return out


@torch.library.custom_op(OP, mutates_args=())
def row_importance(
    W: torch.Tensor, B: Optional[torch.Tensor], A: Optional[torch.Tensor], scale: float, N: torch.Tensor
) -> torch.Tensor:
    _check(W, B, A, N)
    _name, fn = select(OP, W.device.type)
    return fn(W, B, A, scale, N)


@row_importance.register_fake
def _(W, B, A, scale, N):
    _check(W, B, A, N)
    return W.new_empty(W.shape[0], N.shape[1], dtype=torch.float32)
