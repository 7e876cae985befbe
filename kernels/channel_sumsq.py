"""`mscp::channel_sumsq`: per-input-channel sum of squares over the valid tokens of a batch.

    acc[j]  += sum over tokens t with token_mask[t] of x[t, j]^2      (fp32)
    count[0] += number of such tokens                                 (int64)

This is the Wanda activation statistic: the RMS of channel j is sqrt(acc[j] / count).
"""
from __future__ import annotations

import torch

from mscp.kernels._backend import register, select

OP = "mscp::channel_sumsq"


def _check(x, token_mask, acc, count):
    torch._check(x.shape[:-1] == token_mask.shape, lambda: "token_mask must match x's leading dims")
    torch._check(token_mask.dtype == torch.bool, lambda: "token_mask must be bool")
    torch._check(acc.dtype == torch.float32 and acc.shape == (x.shape[-1],), lambda: "acc must be fp32 (d,)")
    torch._check(count.dtype == torch.int64 and count.numel() == 1, lambda: "count must be int64 (1,)")


@register(OP, "torch")
def channel_sumsq_torch(x, token_mask, acc, count):
    """Reference: select the valid tokens, upcast, square, reduce."""
    rows = x.reshape(-1, x.shape[-1])[token_mask.reshape(-1)]
    acc.add_(rows.float().square().sum(dim=0))
    count.add_(rows.shape[0])


@torch.library.custom_op(OP, mutates_args=("acc", "count"))
def channel_sumsq(x: torch.Tensor, token_mask: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
    _check(x, token_mask, acc, count)
    _name, fn = select(OP, x.device.type)
    fn(x, token_mask, acc, count)


@channel_sumsq.register_fake
def _(x, token_mask, acc, count):
    _check(x, token_mask, acc, count)
