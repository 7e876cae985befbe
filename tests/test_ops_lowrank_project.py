"""mscp::lowrank_project on every backend against a float64 formula (V (V^T B) / ||V||)."""
from __future__ import annotations

import pytest
import torch
from mscp.kernels import lowrank_project, use_backend
from ops_helpers import BACKENDS, DTYPES, TOL, assert_close_rel, backend_param, randn

OP = "mscp::lowrank_project"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return backend_param(request, monkeypatch, OP)


def _expected(W_a, W_b, B, rows, alpha):
    V = W_a.double() - W_b.double()
    norm = torch.linalg.vector_norm(V)
    B64 = B.double()
    exp = B64.clone()
    if rows.numel() and norm > 0:
        CB = V[rows] @ (V.T @ B64) / norm
        exp[rows] = (1 - alpha) * B64[rows] + alpha * CB
    return exp, norm


def _run(backend, W_a, W_b, B, rows, alpha):
    with use_backend(backend):
        return lowrank_project(W_a, W_b, B, rows, alpha)


def _check(backend, W_a, W_b, B, rows, alpha, what=""):
    out, norm = _run(backend, W_a, W_b, B, rows, alpha)
    exp, exp_norm = _expected(W_a, W_b, B, rows, alpha)
    assert out.shape == B.shape and out.dtype == B.dtype, what
    assert norm.dtype == torch.float32 and norm.dim() == 0, what
    # fp32 reduction over d_out * d_in terms (torch's own vector_norm is off by ~4e-5 at 3e5 terms)
    assert abs(norm.item() - exp_norm.item()) <= 1e-4 * exp_norm.item() + 1e-30, (what, norm, exp_norm)
    sel = torch.zeros(B.shape[0], dtype=torch.bool)
    sel[rows] = True
    # rows outside the selection: bit for bit B
    assert torch.equal(out[~sel], B[~sel]), f"{what}: unselected rows changed"
    if sel.any():
        tol = TOL[B.dtype] if B.dtype != torch.float32 else 4e-6  # fp32 accumulation over d_in terms
        assert_close_rel(out[sel], exp[sel], tol, what)
    return out


# (d_out, d_in, r_total): r in {1, 7, 64}, K=3 adapters of rank 7 side by side (21 columns)
CASES_SMALL = [(1, 1, 1), (37, 53, 7), (20, 33, 64), (45, 18, 21), (18, 20, 128)]  # 128: 2 adapters of r=64
CASES_LARGE = [(70, 300, 16), (300, 1100, 64), (129, 4099, 1), (33, 700, 21)]


def _cases(backend):
    return CASES_SMALL if backend == "triton" else CASES_SMALL + CASES_LARGE


def _rows(d_out, gen, kind):
    if kind == "none":
        return torch.empty(0, dtype=torch.int64)
    if kind == "all":
        return torch.arange(d_out)
    n = max(1, d_out // 3)
    return torch.randperm(d_out, generator=gen)[:n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_kind", ["some", "none", "all"])
def test_matches_float64(backend, dtype, rows_kind):
    gen = torch.Generator().manual_seed(20)
    for d_out, d_in, r in _cases(backend):
        W_a = randn(d_out, d_in, dtype=dtype, gen=gen)
        W_b = (W_a.double() + randn(d_out, d_in, gen=gen, scale=0.1).double()).to(dtype)
        B = randn(d_out, r, dtype=dtype, gen=gen)
        rows = _rows(d_out, gen, rows_kind)
        _check(backend, W_a, W_b, B, rows, 1.0, f"{backend} {dtype} {rows_kind} {d_out, d_in, r}")


def test_alpha_and_unsorted_duplicate_rows(backend):
    gen = torch.Generator().manual_seed(21)
    W_a, W_b = randn(23, 31, gen=gen), randn(23, 31, gen=gen)
    B = randn(23, 7, gen=gen)
    rows = torch.tensor([17, 3, 22, 3, 0])
    for alpha in (0.35, 1.0, -0.5):
        _check(backend, W_a, W_b, B, rows, alpha, f"{backend} alpha={alpha}")


def test_zero_direction_returns_b(backend):
    gen = torch.Generator().manual_seed(22)
    W = randn(19, 27, dtype=torch.bfloat16, gen=gen)
    B = randn(19, 7, dtype=torch.bfloat16, gen=gen)
    out, norm = _run(backend, W, W.clone(), B, torch.arange(19), 1.0)
    assert norm.item() == 0.0
    assert torch.equal(out, B)
    assert out.data_ptr() != B.data_ptr()


def test_mixed_dtypes_and_non_contiguous(backend):
    gen = torch.Generator().manual_seed(23)
    W_a = randn(26, 40, dtype=torch.bfloat16, gen=gen).t().contiguous().t()
    W_b = randn(26, 40, dtype=torch.bfloat16, gen=gen)
    B = randn(7, 26, gen=gen).t()  # fp32 adapter, non-contiguous (26, 7)
    _check(backend, W_a, W_b, B, torch.tensor([1, 5, 25]), 1.0, backend)


def test_float64_accumulates_in_float64(backend):
    gen = torch.Generator().manual_seed(24)
    W_a, W_b = randn(30, 45, dtype=torch.float64, gen=gen), randn(30, 45, dtype=torch.float64, gen=gen)
    B = randn(30, 7, dtype=torch.float64, gen=gen)
    rows = torch.tensor([0, 4, 29])
    out, _ = _run(backend, W_a, W_b, B, rows, 1.0)
    exp, _ = _expected(W_a, W_b, B, rows, 1.0)
    assert out.dtype == torch.float64
    assert_close_rel(out, exp, 1e-12, backend)


@pytest.mark.parametrize("alpha", [1.0, 0.97])
def test_no_cancellation_when_cb_is_tiny(backend, alpha):
    """On the organism ||C B|| is about 1e-3 ||B||. The blend written B + alpha (C B - B) then loses
    about three digits in fp32 (relative error ~5e-5 at alpha 1); (1 - alpha) B + alpha C B keeps
    what fp32 accumulation over d_in terms allows."""
    gen = torch.Generator().manual_seed(25)
    d_out, d_in, r = 64, 96, 8
    W_b = randn(d_out, d_in, gen=gen)
    W_a = (W_b.double() + randn(d_out, d_in, gen=gen, scale=2e-4).double()).float()
    B = randn(d_out, r, gen=gen)
    rows = torch.arange(d_out)
    out, _ = _run(backend, W_a, W_b, B, rows, alpha)
    exp, _ = _expected(W_a, W_b, B, rows, alpha)
    cb_scale = (exp - (1 - alpha) * B.double()).abs().max() / B.abs().max()
    assert cb_scale < 3e-3  # the case this test is about
    assert_close_rel(out, exp, 3e-6, f"{backend} alpha={alpha}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64, 4), (333, 129, 3), (50, 70, 1), (1000, 200, 8)])
def test_a_row_comes_out_the_same_whichever_other_rows_are_selected(backend, dtype, shape):
    """A patch takes its final rows from its projection of every row (core/project.rows_from):
    that is exact only if no backend's result for a row depends on the selection around it."""
    d_out, d_in, r = shape
    W_a, B = randn(d_out, d_in, dtype=dtype), randn(d_out, r, dtype=dtype)
    W_b = (W_a.float() + 0.05 * randn(d_out, d_in)).to(dtype)
    rows = torch.randperm(d_out)[: max(1, d_out // 7)].sort().values
    some, _ = _run(backend, W_a, W_b, B, rows, 0.9)
    every, _ = _run(backend, W_a, W_b, B, torch.arange(d_out), 0.9)
    assert torch.equal(some[rows], every[rows])
