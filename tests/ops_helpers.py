"""Shared pieces of the op tests (tests/test_ops_*.py): the backend fixture and tolerances.

Every op test runs once per backend: the torch reference, Triton (on CPU through its interpreter,
TRITON_INTERPRET=1 set for the test by monkeypatch: Triton decides interpreted vs compiled when a
kernel is defined, and mscp defines its kernels on first launch, once per mode), and the C++
extension (built on first use). A backend that cannot run here is skipped with the reason.
Expected values come from float64 formulas written in the tests, never from the reference op.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton fixes interpreted-vs-compiled for its own library (tl.zeros, tl.sum, ...) when it is first
# imported, and torch imports it on the first call of any custom op. On a machine without a GPU the
# interpreter is the only way Triton runs, so ask for it before anything imports triton (this
# module is imported at collection, before any test runs). No effect on the CPU ops' automatic
# choice: the CPU preference never includes Triton.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mscp.kernels import _ext
from mscp.kernels._backend import available_backends
from mscp.kernels._triton_utils import triton_importable

BACKENDS = ("torch", "triton", "cpp")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative tolerance (against the largest expected magnitude) for results stored in the dtype.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def backend_param(request, monkeypatch, op: str) -> str:
    name = request.param
    if name == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton is imported: see _triton_utils
        if not triton_importable():
            pytest.skip("triton is not importable")
    if name == "cpp" and not _ext.load():
        pytest.skip(f"C++ extension unavailable: {_ext.build_error()}")
    if name not in available_backends(op, "cpu"):
        why = ""
        if name == "triton":
            why = " (triton was imported in compiled mode before TRITON_INTERPRET=1 was set)"
        pytest.skip(f"backend {name} unavailable on cpu{why}")
    return name


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Fresh random values (never zeros), rounded to `dtype`."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """Every element within rtol * max|expected| (plus rtol relative); NaN/inf fail."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a = actual.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite output"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (a - expected).abs()
    bound = rtol * scale + rtol * expected.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max err {err.max().item():.3g}, "
        f"scale {scale:.3g}, rtol {rtol}"
    )
