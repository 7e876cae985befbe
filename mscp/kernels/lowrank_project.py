"""`mscp::lowrank_project`: the masked projection of lora_B onto the safety direction.

    V = W_a - W_b,   C = V V^T / ||V||_F
    B'[rows] = (1 - alpha) B[rows] + alpha (C B)[rows],   every other row of B' is B's, bit for bit

(the blend B + alpha (C B - B), written so that it does not cancel when C B is much smaller than B:
with alpha = 1 the old form lost about three digits in fp32 on the organism)

C B is computed as V (V^T B) / ||V||_F: G = V^T B (d_in, r) and ||V||_F come from one pass over
W_a and W_b; the selected rows then need only W_a[rows] and W_b[rows]. C and B A are never built.
B may hold several adapters side by side (d_out, r*K). Returns (B', ||V||_F as a 0-d fp32 tensor).
When V is zero the module has no safety direction: B' is B and ||V||_F = 0.
"""
from __future__ import annotations

import torch
from mscp.kernels import _ext
from mscp.kernels._backend import register, select
from mscp.kernels._triton_utils import cdiv, dot_block, lazy_kernels, triton_available

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
        # every row, then the selected ones: a product of a subset of rows may round differently,
        # and a row must come out the same whichever others are selected (core/project.rows_from)
        CB_rows = (V @ G)[rows] / norm_v
        out[rows] = ((1 - alpha) * B_rows + alpha * CB_rows).to(B.dtype)  # no cancellation when C B << B
    return out, norm_v.float()


# ---------------------------------------------------------------------------------------------
# Triton. Pass one: programs own a (BLOCK_N columns) x (BLOCK_R ranks) tile of G = V^T B and a
# range of rows; they read W_a and W_b tile by tile, form V in fp32 registers and accumulate
# G (tl.dot) and ||V||^2 (partials, summed by the launcher). Pass two: programs own BLOCK_S
# selected rows, compute V[rows] @ G / ||V|| tile by tile and write (1 - alpha) B + alpha CB into a
# clone of B; rows outside the selection are never touched. fp64 inputs (the reference
# accumulates in fp64) are delegated to the reference.
# ---------------------------------------------------------------------------------------------
def _build_triton():
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _project_pass1(
        wa_ptr, wb_ptr, b_ptr, g_ptr, sq_ptr, d_out, d_in, r, rows_per_split,
        stride_wa, stride_wb, stride_b, stride_g,
        ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_n = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1).to(tl.int64)
        pid_m = tl.program_id(2).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d_in
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < r
        g = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_start = pid_m * rows_per_split
        row_stop = tl.minimum(row_start + rows_per_split, d_out)
        for m0 in range(row_start, row_stop, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < row_stop
            tile_ok = row_ok[:, None] & col_ok[None, :]
            wa = tl.load(wa_ptr + rows[:, None] * stride_wa + cols[None, :], mask=tile_ok, other=0.0)
            wb = tl.load(wb_ptr + rows[:, None] * stride_wb + cols[None, :], mask=tile_ok, other=0.0)
            v = wa.to(tl.float32) - wb.to(tl.float32)
            b = tl.load(b_ptr + rows[:, None] * stride_b + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
            g += tl.dot(tl.trans(v), b, input_precision="ieee", out_dtype=tl.float32)
            sq += v * v
        g_ptrs = g_ptr + cols[:, None] * stride_g + ranks[None, :]
        g_mask = col_ok[:, None] & rank_ok[None, :]
        if ATOMIC:
            tl.atomic_add(g_ptrs, g, mask=g_mask)
        else:
            tl.store(g_ptrs, g, mask=g_mask)
        if pid_r == 0:
            tl.store(sq_ptr + pid_m * tl.num_programs(0) + pid_n, tl.sum(tl.sum(sq, axis=1), axis=0))

    @triton.jit
    def _project_pass2(
        wa_ptr, wb_ptr, b_ptr, g_ptr, norm_ptr, rows_ptr, out_ptr, n_sel, d_in, r, alpha,
        stride_wa, stride_wb, stride_b, stride_g, stride_o,
        BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_s = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1).to(tl.int64)
        sel = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        sel_ok = sel < n_sel
        rows = tl.load(rows_ptr + sel, mask=sel_ok, other=0)
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < r
        cb = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, d_in, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < d_in
            tile_ok = sel_ok[:, None] & col_ok[None, :]
            wa = tl.load(wa_ptr + rows[:, None] * stride_wa + cols[None, :], mask=tile_ok, other=0.0)
            wb = tl.load(wb_ptr + rows[:, None] * stride_wb + cols[None, :], mask=tile_ok, other=0.0)
            v = wa.to(tl.float32) - wb.to(tl.float32)
            g = tl.load(g_ptr + cols[:, None] * stride_g + ranks[None, :],
                        mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            cb += tl.dot(v, g, input_precision="ieee", out_dtype=tl.float32)
        norm = tl.load(norm_ptr)
        out_mask = sel_ok[:, None] & rank_ok[None, :]
        b_raw = tl.load(b_ptr + rows[:, None] * stride_b + ranks[None, :], mask=out_mask, other=0.0)
        b = b_raw.to(tl.float32)
        safe = tl.where(norm > 0, norm, 1.0)
        new = (1.0 - alpha) * b + alpha * (cb / safe)
        new = tl.where(norm > 0, new.to(b_raw.dtype), b_raw)
        tl.store(out_ptr + rows[:, None] * stride_o + ranks[None, :], new, mask=out_mask)

    return _project_pass1, _project_pass2


_triton_kernels = lazy_kernels(_build_triton)


@register(OP, "triton", available=triton_available)
def lowrank_project_triton(W_a, W_b, B, rows, alpha):
    if accumulate_dtype(W_a, W_b, B) == torch.float64:
        return lowrank_project_torch(W_a, W_b, B, rows, alpha)
    pass1, pass2 = _triton_kernels()
    d_out, d_in = W_a.shape
    r = B.shape[1]
    W_a = W_a if W_a.stride(-1) == 1 else W_a.contiguous()
    W_b = W_b if W_b.stride(-1) == 1 else W_b.contiguous()
    Bc = B.contiguous()
    out = Bc.clone()
    if d_out == 0 or d_in == 0:
        return out, torch.zeros((), dtype=torch.float32, device=B.device)
    on_gpu = B.is_cuda
    block_m = 64 if on_gpu else 16
    block_n = 64 if on_gpu else 16
    block_r = dot_block(r, 64)
    n_tiles, r_tiles = cdiv(d_in, block_n), cdiv(max(r, 1), block_r)
    split = 1
    if on_gpu:  # enough programs to fill the device; then G is reduced with atomics
        sms = torch.cuda.get_device_properties(B.device).multi_processor_count
        split = max(1, min(cdiv(2 * sms, n_tiles * r_tiles), cdiv(d_out, 4 * block_m)))
    rows_per_split = cdiv(cdiv(d_out, split), block_m) * block_m
    split = cdiv(d_out, rows_per_split)
    G = torch.zeros(d_in, max(r, 1), dtype=torch.float32, device=B.device)
    partial = torch.zeros(split * n_tiles, dtype=torch.float32, device=B.device)
    pass1[(n_tiles, r_tiles, split)](
        W_a, W_b, Bc, G, partial, d_out, d_in, r, rows_per_split,
        W_a.stride(0), W_b.stride(0), Bc.stride(0), G.stride(0),
        ATOMIC=split > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    norm_v = partial.sum().sqrt()
    n_sel = rows.numel()
    if n_sel and r:
        idx = rows.to(device=B.device, dtype=torch.int64)
        idx = torch.where(idx < 0, idx + d_out, idx).contiguous()
        if not on_gpu and ((idx < 0) | (idx >= d_out)).any():
            raise IndexError(f"row index out of bounds for d_out = {d_out}")
        block_s = 16
        pass2[(cdiv(n_sel, block_s), r_tiles)](
            W_a, W_b, Bc, G, norm_v, idx, out, n_sel, d_in, r, float(alpha),
            W_a.stride(0), W_b.stride(0), Bc.stride(0), G.stride(0), out.stride(0),
            BLOCK_S=block_s, BLOCK_N=block_n if on_gpu else 32, BLOCK_R=block_r,
        )
    return out, norm_v


# ---------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: csrc/, built on first use by kernels/_ext.py
# ---------------------------------------------------------------------------------------------
@register(OP, "cpp", available=_ext.cpu_available)
def lowrank_project_cpp(W_a, W_b, B, rows, alpha):
    return _ext.ops().lowrank_project(W_a, W_b, B, rows, float(alpha))


@register(OP, "cuda", available=_ext.cuda_available)
def lowrank_project_cuda(W_a, W_b, B, rows, alpha):
    return _ext.ops().lowrank_project(W_a, W_b, B, rows, float(alpha))


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
