"""`mscp::channel_sumsq`: per-input-channel sum of squares over the valid tokens of a batch.

    acc[j]  += sum over tokens t with token_mask[t] of x[t, j]^2      (fp32)
    count[0] += number of such tokens                                 (int64)

This is the Wanda activation statistic: the RMS of channel j is sqrt(acc[j] / count).
"""
from __future__ import annotations

import torch
from mscp.kernels import _ext
from mscp.kernels._backend import register, select
from mscp.kernels._triton_utils import calculate_settings, cdiv, lazy_kernels, triton_available

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


# ---------------------------------------------------------------------------------------------
# Triton: one read of x; the token mask is applied and x upcast to fp32 in registers; each
# program reduces a (tokens x BLOCK_D) stripe and adds it to acc with one atomic per channel;
# the programs of the first channel block also count their valid tokens (atomic on count).
# ---------------------------------------------------------------------------------------------
TOKENS_PER_PROGRAM = 64


def _build_triton():
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _channel_sumsq_kernel(
        x_ptr, mask_ptr, acc_ptr, count_ptr, n_tokens, d, stride_x,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS_PER_PROG: tl.constexpr,
    ):
        pid_t = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1).to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        n_valid = tl.zeros((BLOCK_T,), dtype=tl.int64)
        t_start = pid_t * TOKENS_PER_PROG
        for t0 in range(0, TOKENS_PER_PROG, BLOCK_T):
            toks = t_start + t0 + tl.arange(0, BLOCK_T)
            tok_ok = toks < n_tokens
            valid = tl.load(mask_ptr + toks, mask=tok_ok, other=0) != 0
            x = tl.load(
                x_ptr + toks[:, None] * stride_x + cols[None, :],
                mask=valid[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x * x, axis=0)
            n_valid += valid.to(tl.int64)
        tl.atomic_add(acc_ptr + cols, acc, mask=col_ok)
        if pid_d == 0:
            tl.atomic_add(count_ptr, tl.sum(n_valid, axis=0))

    return _channel_sumsq_kernel


_triton_kernel = lazy_kernels(_build_triton)


@register(OP, "triton", available=triton_available)
def channel_sumsq_triton(x, token_mask, acc, count):
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mask = token_mask.reshape(-1).contiguous().view(torch.uint8)
    n_tokens = x2.shape[0]
    if n_tokens == 0 or d == 0:
        return
    out_acc = acc if acc.is_contiguous() else torch.zeros_like(acc, memory_format=torch.contiguous_format)
    block_d, num_warps = calculate_settings(min(d, 512), max_block=512)  # (16 x 512) fp32 tile
    block_t = 16
    grid = (cdiv(n_tokens, TOKENS_PER_PROGRAM), cdiv(d, block_d))
    _triton_kernel()[grid](
        x2, mask, out_acc, count, n_tokens, d, x2.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d, TOKENS_PER_PROG=TOKENS_PER_PROGRAM, num_warps=num_warps,
    )
    if out_acc is not acc:
        acc.add_(out_acc)


# ---------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: csrc/, built on first use by kernels/_ext.py
# ---------------------------------------------------------------------------------------------
@register(OP, "cpp", available=_ext.cpu_available)
def channel_sumsq_cpp(x, token_mask, acc, count):
    _ext.ops().channel_sumsq(x, token_mask, acc, count)


@register(OP, "cuda", available=_ext.cuda_available)
def channel_sumsq_cuda(x, token_mask, acc, count):
    _ext.ops().channel_sumsq(x, token_mask, acc, count)


@torch.library.custom_op(OP, mutates_args=("acc", "count"))
def channel_sumsq(x: torch.Tensor, token_mask: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
    _check(x, token_mask, acc, count)
    _name, fn = select(OP, x.device.type)
    fn(x, token_mask, acc, count)


@channel_sumsq.register_fake
def _(x, token_mask, acc, count):
    _check(x, token_mask, acc, count)
