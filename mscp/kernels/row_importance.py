"""`mscp::row_importance`: Wanda row scores of a (possibly LoRA-updated) weight.

    out = |W + scale * B A| @ N          W (d_out, d_in), B (d_out, r), A (r, d_in), N (d_in, K) fp32

returned as fp32 (d_out, K). K columns score several activation statistics in one read of W
(e.g. harmful and task channel norms). B and A may be absent: then out = |W| @ N. The effective
weight W + scale * B A is only ever formed a block of rows at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from mscp.kernels import _ext
from mscp.kernels._backend import register, select
from mscp.kernels._triton_utils import cdiv, dot_block, lazy_kernels, next_power_of_2, triton_available

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


# ---------------------------------------------------------------------------------------------
# Triton: one program per BLOCK_M rows; it walks d_in in BLOCK_K tiles, forms the tile of
# W + scale * B A in registers (B tile (BM, R) times A tile (R, BK)), takes |.|, and multiplies
# by the N tile, accumulating (BM, K) in fp32. Neither B A nor |W_eff| is ever stored.
# ---------------------------------------------------------------------------------------------
def _build_triton():
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _row_importance_kernel(
        w_ptr, b_ptr, a_ptr, n_ptr, out_ptr, d_out, d_in, r, scale,
        stride_w, stride_b, stride_a, stride_n, stride_o,
        K: tl.constexpr, HAS_LORA: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KN: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < d_out
        kn = tl.arange(0, BLOCK_KN)
        acc = tl.zeros((BLOCK_M, BLOCK_KN), dtype=tl.float32)
        rr = tl.arange(0, BLOCK_R)
        if HAS_LORA:
            b = tl.load(b_ptr + rows[:, None] * stride_b + rr[None, :],
                        mask=row_ok[:, None] & (rr[None, :] < r), other=0.0)
            if not LOW_PRECISION_DOT:
                b = b.to(tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < d_in
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            if HAS_LORA:
                a = tl.load(a_ptr + rr[:, None] * stride_a + cols[None, :],
                            mask=(rr[:, None] < r) & col_ok[None, :], other=0.0)
                if not LOW_PRECISION_DOT:
                    a = a.to(tl.float32)
                # bf16/fp16 products are exact in fp32, so the tensor-core dot with fp32
                # accumulation equals the fp32 product; fp32 operands use IEEE fp32 (no TF32).
                if LOW_PRECISION_DOT:
                    w += scale * tl.dot(b, a, out_dtype=tl.float32)
                else:
                    w += scale * tl.dot(b, a, input_precision="ieee", out_dtype=tl.float32)
            w = tl.abs(w)
            for k in tl.static_range(K):
                n_k = tl.load(n_ptr + cols * stride_n + k, mask=col_ok, other=0.0).to(tl.float32)
                part = tl.sum(w * n_k[None, :], axis=1)
                acc += tl.where(kn[None, :] == k, part[:, None], 0.0)
        tl.store(out_ptr + rows[:, None] * stride_o + kn[None, :], acc,
                 mask=row_ok[:, None] & (kn[None, :] < K))

    return _row_importance_kernel


_triton_kernel = lazy_kernels(_build_triton)


@register(OP, "triton", available=triton_available)
def row_importance_triton(W, B, A, scale, N):
    d_out, d_in = W.shape
    K = N.shape[1]
    out = torch.empty(d_out, K, dtype=torch.float32, device=W.device)
    if d_out == 0 or K == 0:
        return out
    if d_in == 0:
        return out.zero_()
    W = W if W.stride(-1) == 1 else W.contiguous()
    N = N.float().contiguous()
    has_lora = B is not None and B.shape[1] > 0
    if has_lora:
        r = B.shape[1]
        low = B.dtype == A.dtype and B.dtype in (torch.bfloat16, torch.float16) and W.is_cuda
        if low:
            B, A = B.contiguous(), A.contiguous()
        else:
            B, A = B.float().contiguous(), A.float().contiguous()
        block_r = dot_block(r, 1 << 30)
    else:
        r, low, block_r = 0, False, 16
        B = A = W  # unused placeholders (HAS_LORA=False)
    block_m = 32 if W.is_cuda else 16
    block_k = max(16, min(128 if W.is_cuda else 32, next_power_of_2(d_in), 8192 // block_r))
    grid = (cdiv(d_out, block_m),)
    _triton_kernel()[grid](
        W, B, A, N, out, d_out, d_in, r, float(scale),
        W.stride(0), B.stride(0), A.stride(0), N.stride(0), out.stride(0),
        K=K, HAS_LORA=has_lora, LOW_PRECISION_DOT=low,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_KN=next_power_of_2(K),
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: csrc/, built on first use by kernels/_ext.py
# ---------------------------------------------------------------------------------------------
@register(OP, "cpp", available=_ext.cpu_available)
def row_importance_cpp(W, B, A, scale, N):
    return _ext.ops().row_importance(W, B, A, float(scale), N)


@register(OP, "cuda", available=_ext.cuda_available)
def row_importance_cuda(W, B, A, scale, N):
    return _ext.ops().row_importance(W, B, A, float(scale), N)


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
