"""`mscp::lora_attribution`: the attribution score of each row of a LoRA edit (mscp/core/attribution.py).

For a LoRA module y = W x + s B (A x), with u = A x (tokens, r), the output gradient G (tokens, d_out)
and the edit E (d_out, r) of lora_B, row i scores

    a_i = s * sum_t G[t, i] * (u[t] . E[i])  =  s * sum_k E[i, k] * (G^T u)[i, k]

returned as fp64 (d_out). grad and u share any leading dims ([..., d_out] and [..., r]). The right-hand
form only needs P = G^T u (d_out, r): the tokens x d_out effect s u E^T is never built, so the op
reads G, u and E once and writes d_out values.
"""
from __future__ import annotations

import math

import torch
from mscp.kernels import _ext
from mscp.kernels._backend import register, select
from mscp.kernels._triton_utils import cdiv, dot_block, lazy_kernels, triton_available

OP = "mscp::lora_attribution"
TOKENS_PER_BLOCK = 2048  # bounds the reference's fp64 copy of G to 2048 x d_out


def _check(grad, u, edit):
    torch._check(grad.dim() >= 1 and u.dim() == grad.dim() and grad.shape[:-1] == u.shape[:-1],
                 lambda: "grad [..., d_out] and u [..., r] must share their leading dims")
    torch._check(edit.dim() == 2 and edit.shape[0] == grad.shape[-1] and edit.shape[1] == u.shape[-1],
                 lambda: "edit must be (d_out, r)")


def _flat(grad, u):
    """grad as (tokens, d_out) and u as (tokens, r); views where the strides allow."""
    tokens = math.prod(grad.shape[:-1])  # not -1: d_out or r may be 0
    return grad.reshape(tokens, grad.shape[-1]), u.reshape(tokens, u.shape[-1])


@register(OP, "torch")
def lora_attribution_torch(grad, u, edit, scale):
    """Reference: P = G^T u in fp64, a block of tokens at a time, then s * sum_k E * P."""
    G, U = _flat(grad, u)
    P = torch.zeros(edit.shape, dtype=torch.float64, device=grad.device)
    for start in range(0, G.shape[0], TOKENS_PER_BLOCK):
        stop = min(start + TOKENS_PER_BLOCK, G.shape[0])
        P.addmm_(G[start:stop].T.double(), U[start:stop].double())
    return (P * edit.to(device=grad.device, dtype=torch.float64)).sum(dim=1) * float(scale)


# ---------------------------------------------------------------------------------------------
# Triton: programs own BLOCK_D rows x one BLOCK_R slice of ranks x one range of tokens; they walk
# their tokens in BLOCK_T tiles, accumulating P (BLOCK_D, BLOCK_R) += G_tile^T u_tile (tl.dot,
# fp32), then reduce sum_k E * P in fp64 and store (one program per row block and rank slice) or
# atomically add (several token ranges or rank slices) the row block's partial scores. The launcher
# multiplies by the scale in fp64. fp64 grad or u is delegated to the reference.
# ---------------------------------------------------------------------------------------------
def _build_triton():
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_attribution_kernel(
        g_ptr, u_ptr, e_ptr, out_ptr, n_tokens, d_out, r, tokens_per_split,
        stride_g, stride_u, stride_e,
        ATOMIC: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_d = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1).to(tl.int64)
        pid_r = tl.program_id(2).to(tl.int64)
        rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        row_ok = rows < d_out
        ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < r
        p = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        t_start = pid_t * tokens_per_split
        t_stop = tl.minimum(t_start + tokens_per_split, n_tokens)
        for t0 in range(t_start, t_stop, BLOCK_T):
            toks = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            tok_ok = toks < t_stop
            # G^T tile (rows, tokens): consecutive rows are consecutive in memory
            g = tl.load(g_ptr + toks[None, :] * stride_g + rows[:, None],
                        mask=row_ok[:, None] & tok_ok[None, :], other=0.0)
            uu = tl.load(u_ptr + toks[:, None] * stride_u + ranks[None, :],
                         mask=tok_ok[:, None] & rank_ok[None, :], other=0.0)
            # bf16/fp16 products are exact in fp32 (tensor-core dot, fp32 accumulation);
            # fp32 or mixed operands use IEEE fp32 (no TF32).
            if LOW_PRECISION_DOT:
                p += tl.dot(g, uu, out_dtype=tl.float32)
            else:
                p += tl.dot(g.to(tl.float32), uu.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        e = tl.load(e_ptr + rows[:, None] * stride_e + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float64)
        a = tl.sum(p.to(tl.float64) * e, axis=1)
        if ATOMIC:
            tl.atomic_add(out_ptr + rows, a, mask=row_ok)
        else:
            tl.store(out_ptr + rows, a, mask=row_ok)

    return _lora_attribution_kernel


_triton_kernel = lazy_kernels(_build_triton)


@register(OP, "triton", available=triton_available)
def lora_attribution_triton(grad, u, edit, scale):
    if torch.float64 in (grad.dtype, u.dtype):
        return lora_attribution_torch(grad, u, edit, scale)
    G, U = _flat(grad, u)
    G = G if G.stride(-1) == 1 else G.contiguous()
    n_tokens, d_out = G.shape
    r = U.shape[1]
    out = torch.zeros(d_out, dtype=torch.float64, device=grad.device)
    if n_tokens == 0 or d_out == 0 or r == 0:
        return out
    on_gpu = grad.is_cuda
    low = G.dtype == U.dtype and G.dtype in (torch.bfloat16, torch.float16) and on_gpu
    U = U.contiguous() if low else U.float().contiguous()
    E = edit.to(device=grad.device, dtype=torch.float64).contiguous()
    block_d = 64 if on_gpu else 16
    block_t = 64 if on_gpu else 16
    block_r = dot_block(r, 64)
    d_tiles, r_tiles, t_tiles = cdiv(d_out, block_d), cdiv(r, block_r), cdiv(n_tokens, block_t)
    if on_gpu:  # enough programs to fill the device; the token ranges then add up with atomics
        sms = torch.cuda.get_device_properties(grad.device).multi_processor_count
        split = max(1, min(t_tiles, cdiv(2 * sms, d_tiles * r_tiles)))
    else:  # two token ranges: the interpreter runs the atomic path the GPU takes
        split = min(t_tiles, 2)
    tokens_per_split = cdiv(t_tiles, split) * block_t
    split = cdiv(n_tokens, tokens_per_split)
    _triton_kernel()[(d_tiles, split, r_tiles)](
        G, U, E, out, n_tokens, d_out, r, tokens_per_split,
        G.stride(0), U.stride(0), E.stride(0),
        ATOMIC=split > 1 or r_tiles > 1, LOW_PRECISION_DOT=low,
        BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_R=block_r,
        num_warps=4,
    )
    return out.mul_(float(scale))


# ---------------------------------------------------------------------------------------------
# C++ (CPU) and CUDA: csrc/, built on first use by kernels/_ext.py
# ---------------------------------------------------------------------------------------------
@register(OP, "cpp", available=_ext.cpu_available)
def lora_attribution_cpp(grad, u, edit, scale):
    return _ext.ops().lora_attribution(grad, u, edit, float(scale))


@register(OP, "cuda", available=_ext.cuda_available)
def lora_attribution_cuda(grad, u, edit, scale):
    return _ext.ops().lora_attribution(grad, u, edit, float(scale))


@torch.library.custom_op(OP, mutates_args=())
def lora_attribution(grad: torch.Tensor, u: torch.Tensor, edit: torch.Tensor, scale: float) -> torch.Tensor:
    _check(grad, u, edit)
    _name, fn = select(OP, grad.device.type)
    return fn(grad, u, edit, scale)


@lora_attribution.register_fake
def _(grad, u, edit, scale):
    _check(grad, u, edit)
    return grad.new_empty(grad.shape[-1], dtype=torch.float64)
