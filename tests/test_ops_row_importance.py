"""mscp::row_importance on every backend against a float64 formula."""
from __future__ import annotations

import pytest
import torch
from mscp.kernels import row_importance, use_backend
from ops_helpers import BACKENDS, DTYPES, assert_close_rel, backend_param, randn

OP = "mscp::row_importance"
# Output is fp32 for every input dtype and only accumulation rounds (the LoRA term's bf16/fp16
# products are exact in fp32), so the tolerances are tight for all dtypes.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return backend_param(request, monkeypatch, OP)


def _expected(W, B, A, scale, N):
    W64 = W.double()
    if B is not None:
        W64 = W64 + scale * (B.double() @ A.double())
    return W64.abs() @ N.double()


def _run(backend, W, B, A, scale, N):
    with use_backend(backend):
        return row_importance(W, B, A, scale, N)


# (d_out, d_in, r, K): odd sizes, r in {1, 7, 64}, K statistic columns (5 > one register block)
CASES_SMALL = [(1, 1, 1, 1), (37, 53, 7, 2), (19, 70, 1, 3), (33, 40, 64, 1), (20, 17, 7, 5)]
CASES_LARGE = [(70, 1100, 16, 2), (131, 2053, 64, 5), (9, 4099, 1, 1)]


def _cases(backend):
    return CASES_SMALL if backend == "triton" else CASES_SMALL + CASES_LARGE


@pytest.mark.parametrize("dtype", DTYPES)
def test_with_lora_matches_float64(backend, dtype):
    gen = torch.Generator().manual_seed(10)
    for d_out, d_in, r, K in _cases(backend):
        W = randn(d_out, d_in, dtype=dtype, gen=gen)
        B = randn(d_out, r, dtype=dtype, gen=gen, scale=0.3)
        A = randn(r, d_in, dtype=dtype, gen=gen, scale=0.3)
        N = torch.rand(d_in, K, generator=gen) + 0.1
        out = _run(backend, W, B, A, 1.7, N)
        assert out.dtype == torch.float32 and out.shape == (d_out, K)
        assert_close_rel(out, _expected(W, B, A, 1.7, N), RTOL[dtype], f"{backend} {dtype} {d_out, d_in, r, K}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_lora_matches_float64(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    for d_out, d_in, _r, K in _cases(backend):
        W = randn(d_out, d_in, dtype=dtype, gen=gen)
        N = torch.rand(d_in, K, generator=gen) + 0.1
        out = _run(backend, W, None, None, 0.5, N)
        assert_close_rel(out, _expected(W, None, None, 0.5, N), RTOL[dtype], f"{backend} {dtype}")


def test_lora_term_changes_scores(backend):
    """The LoRA update must be formed (|W + sBA| differs from |W| + ...): a B A that cancels W."""
    gen = torch.Generator().manual_seed(12)
    A = randn(3, 24, gen=gen)
    B = randn(10, 3, gen=gen)
    W = -(B @ A)  # W + 1.0 * B A == 0 exactly in fp32 up to rounding
    N = torch.rand(24, 2, generator=gen) + 0.1
    out = _run(backend, W, B, A, 1.0, N)
    assert out.abs().max().item() < 1e-4
    out2 = _run(backend, W, B, A, -1.0, N)
    assert_close_rel(out2, _expected(W, B, A, -1.0, N), 1e-5, backend)


def test_non_contiguous_and_mixed_dtypes(backend):
    gen = torch.Generator().manual_seed(13)
    W = randn(29, 41, dtype=torch.bfloat16, gen=gen).t().contiguous().t()  # column-major view
    B = randn(29, 5, gen=gen, scale=0.2)  # fp32 adapter on a bf16 base
    A = randn(5, 41, dtype=torch.bfloat16, gen=gen, scale=0.2)
    N = (torch.rand(2, 41, generator=gen) + 0.1).t()  # non-contiguous N
    out = _run(backend, W, B, A, 0.9, N)
    assert_close_rel(out, _expected(W, B, A, 0.9, N), 2e-5, backend)


def test_empty_rank(backend):
    gen = torch.Generator().manual_seed(14)
    W = randn(11, 19, gen=gen)
    B, A = torch.empty(11, 0), torch.empty(0, 19)
    N = torch.rand(19, 2, generator=gen)
    out = _run(backend, W, B, A, 2.0, N)
    assert_close_rel(out, _expected(W, None, None, 0.0, N), 1e-5, backend)
