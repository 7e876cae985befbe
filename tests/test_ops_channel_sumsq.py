"""mscp::channel_sumsq on every backend against a float64 formula."""
from __future__ import annotations

import pytest
import torch
from mscp.kernels import channel_sumsq, use_backend
from ops_helpers import BACKENDS, DTYPES, TOL, assert_close_rel, backend_param, randn

OP = "mscp::channel_sumsq"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return backend_param(request, monkeypatch, OP)


def _expected(x, mask, acc0, count0):
    d = x.shape[-1]
    rows = x.reshape(-1, d).double()[mask.reshape(-1)]
    return acc0.double() + (rows * rows).sum(0), count0 + int(mask.sum())


def _run(backend, x, mask, acc, count):
    with use_backend(backend):
        channel_sumsq(x, mask, acc, count)


# (leading dims, d): odd channel counts (not a multiple of any block), one token, several batches
SHAPES_SMALL = [((1,), 1), ((1,), 67), ((3, 5), 23), ((2, 9), 130), ((70,), 600)]  # 600: 2 channel blocks
SHAPES_LARGE = [((4, 75), 1100), ((300,), 2053)]


def _shapes(backend):
    return SHAPES_SMALL if backend == "triton" else SHAPES_SMALL + SHAPES_LARGE


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    for lead, d in _shapes(backend):
        x = randn(*lead, d, dtype=dtype, gen=gen)
        mask = torch.rand(*lead, generator=gen) > 0.3
        mask.view(-1)[0] = True
        acc = torch.rand(d, generator=gen) + 0.5  # accumulates into existing statistics
        count = torch.tensor([7], dtype=torch.int64)
        exp_acc, exp_count = _expected(x, mask, acc, 7)
        _run(backend, x, mask, acc, count)
        assert_close_rel(acc, exp_acc, TOL[torch.float32] * 10, f"{backend} {dtype} {lead}x{d}")
        assert count.item() == exp_count


def test_accumulates_over_calls(backend):
    gen = torch.Generator().manual_seed(2)
    acc = torch.zeros(45)
    count = torch.zeros(1, dtype=torch.int64)
    exp, n = torch.zeros(45, dtype=torch.float64), 0
    for _ in range(3):
        x = randn(2, 7, 45, dtype=torch.bfloat16, gen=gen)
        mask = torch.rand(2, 7, generator=gen) > 0.5
        exp, n = _expected(x, mask, exp, n)
        _run(backend, x, mask, acc, count)
    assert_close_rel(acc, exp, 1e-5, backend)
    assert count.item() == n


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_batch_changes_nothing(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    x = randn(3, 6, 37, dtype=dtype, gen=gen)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    acc = torch.rand(37, generator=gen)
    before = acc.clone()
    count = torch.tensor([5], dtype=torch.int64)
    _run(backend, x, mask, acc, count)
    assert torch.equal(acc, before)
    assert count.item() == 5


def test_masked_tokens_are_never_read(backend):
    """NaN/inf in masked-out tokens must not leak into the statistics."""
    gen = torch.Generator().manual_seed(4)
    x = randn(2, 8, 29, gen=gen)
    mask = torch.rand(2, 8, generator=gen) > 0.5
    mask[0, 0], mask[1, 7] = True, False
    poisoned = x.clone()
    poisoned[~mask] = float("nan")
    poisoned[1, 7, 3] = float("inf")
    acc = torch.rand(29, generator=gen)
    exp, n = _expected(x, mask, acc, 0)
    count = torch.zeros(1, dtype=torch.int64)
    _run(backend, poisoned, mask, acc, count)
    assert_close_rel(acc, exp, 1e-5, backend)
    assert count.item() == n


def test_non_contiguous_input(backend):
    gen = torch.Generator().manual_seed(5)
    base = randn(2, 31, 10, dtype=torch.bfloat16, gen=gen)
    x = base.transpose(1, 2)  # (2, 10, 31), non-contiguous
    mask = torch.rand(2, 10, generator=gen) > 0.4
    acc = torch.rand(31, generator=gen)
    exp, n = _expected(x, mask, acc, 0)
    count = torch.zeros(1, dtype=torch.int64)
    _run(backend, x, mask, acc, count)
    assert_close_rel(acc, exp, 1e-5, backend)
    assert count.item() == n
