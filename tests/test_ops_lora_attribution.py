"""mscp::lora_attribution on every backend against a float64 formula: the explicit tokens x d_out
effect s (u E^T), times the output gradient, summed over the tokens (what the attribution hook
computed before the op existed)."""
from __future__ import annotations

import pytest
import torch
from mscp.kernels import lora_attribution, use_backend
from ops_helpers import BACKENDS, DTYPES, assert_close_rel, backend_param, randn

OP = "mscp::lora_attribution"
# torch and cpp accumulate in fp64; triton accumulates G^T u in fp32 (then fp64 over the ranks).
# The products of the inputs are exact in fp64 whatever their dtype, so the tolerances do not depend on it.
RTOL = {"torch": 1e-12, "cpp": 1e-12, "triton": 2e-5}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    return backend_param(request, monkeypatch, OP)


def _expected(grad, u, edit, scale):
    effect = scale * (u.double() @ edit.double().T)  # [..., d_out]
    return (grad.double() * effect).reshape(-1, grad.shape[-1]).sum(dim=0)


def _run(backend, grad, u, edit, scale):
    with use_backend(backend):
        return lora_attribution(grad, u, edit, scale)


def _check(backend, grad, u, edit, scale, what=""):
    out = _run(backend, grad, u, edit, scale)
    assert out.dtype == torch.float64 and out.shape == (grad.shape[-1],), what
    assert_close_rel(out, _expected(grad, u, edit, scale), RTOL[backend], f"{backend} {what}")
    return out


def _inputs(lead, d_out, r, dtype, gen):
    grad = randn(*lead, d_out, dtype=dtype, gen=gen)
    u = randn(*lead, r, dtype=dtype, gen=gen)
    edit = randn(d_out, r, dtype=dtype, gen=gen, scale=0.3)
    return grad, u, edit


# (leading dims, d_out, r): 1 token, 1 row, rank 1, sizes that are no multiple of any tile or
# vector (16 rows, 16 tokens, 8 ranks), rank > 64 (two Triton rank tiles), 3-D batches
CASES_SMALL = [((1,), 1, 1), ((1,), 37, 7), ((53,), 1, 5), ((37,), 53, 1), ((70,), 21, 9), ((33,), 17, 64),
               ((40,), 19, 70), ((3, 11), 29, 7), ((2, 1), 5, 3)]
# larger: several column vectors per thread, token ranges (d_out <= 16 and many tokens)
CASES_LARGE = [((600,), 131, 16), ((1100,), 9, 3), ((4, 129), 300, 8)]


def _cases(backend):
    return CASES_SMALL if backend == "triton" else CASES_SMALL + CASES_LARGE


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_float64_effect_product(backend, dtype):
    gen = torch.Generator().manual_seed(20)
    for lead, d_out, r in _cases(backend):
        grad, u, edit = _inputs(lead, d_out, r, dtype, gen)
        _check(backend, grad, u, edit, 1.7, f"{dtype} {lead} d_out={d_out} r={r}")


def test_float64_inputs(backend):
    gen = torch.Generator().manual_seed(21)
    for lead, d_out, r in CASES_SMALL:
        grad, u, edit = _inputs(lead, d_out, r, torch.float64, gen)
        _check(backend, grad, u, edit, 0.5, f"fp64 {lead} {d_out} {r}")


def test_scale_zero_gives_zeros_and_a_negative_scale_flips_the_sign(backend):
    gen = torch.Generator().manual_seed(22)
    grad, u, edit = _inputs((45,), 23, 5, torch.float32, gen)
    assert torch.equal(_run(backend, grad, u, edit, 0.0), torch.zeros(23, dtype=torch.float64))
    pos = _check(backend, grad, u, edit, 2.0, "scale 2")
    neg = _check(backend, grad, u, edit, -2.0, "scale -2")
    assert torch.equal(neg, -pos)


def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(23)
    T, d_out, r = 41, 27, 6
    grad = randn(d_out, T, gen=gen).t()  # column-major: a token's rows lie T apart
    u = randn(T, 2 * r, dtype=torch.bfloat16, gen=gen)[:, ::2]  # every other column
    edit = randn(r, d_out, dtype=torch.float16, gen=gen).t()  # mixed dtypes too
    assert not (grad.is_contiguous() or u.is_contiguous() or edit.is_contiguous())
    _check(backend, grad, u, edit, 0.9, "transposed grad, strided u, transposed edit")
    # rows of a larger buffer (row stride > d_out), and a 3-D batch whose leading dims do not merge
    grad = randn(T, d_out + 5, gen=gen)[:, 3:3 + d_out]
    _check(backend, grad, randn(T, r, gen=gen), randn(d_out, r, gen=gen), 1.1, "row stride > d_out")
    grad3 = randn(7, 3, d_out, gen=gen).transpose(0, 1)
    u3 = randn(7, 3, r, gen=gen).transpose(0, 1)
    _check(backend, grad3, u3, randn(d_out, r, gen=gen), -0.4, "3-D transposed leading dims")
    # the same gradient row for every token (stride 0)
    grad = randn(1, d_out, gen=gen).expand(T, d_out)
    _check(backend, grad, randn(T, r, gen=gen), randn(d_out, r, gen=gen), 1.0, "expanded grad")


def test_token_ranges_of_several_threads_add_up(backend):
    """With more threads than column vectors the C++ kernel splits the tokens: the same result."""
    gen = torch.Generator().manual_seed(24)
    grad, u, edit = _inputs((2000,), 5, 3, torch.float32, gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = _check(backend, grad, u, edit, 1.3, "4 threads")
        assert torch.equal(out, _run(backend, grad, u, edit, 1.3)), "not deterministic"
    finally:
        torch.set_num_threads(threads)


def test_empty_inputs_give_zeros(backend):
    assert torch.equal(_run(backend, torch.empty(0, 6), torch.empty(0, 3), torch.ones(6, 3), 1.0),
                       torch.zeros(6, dtype=torch.float64))
    assert torch.equal(_run(backend, torch.ones(4, 6), torch.empty(4, 0), torch.empty(6, 0), 1.0),
                       torch.zeros(6, dtype=torch.float64))
    assert _run(backend, torch.ones(4, 0), torch.ones(4, 3), torch.empty(0, 3), 1.0).shape == (0,)


def test_mismatched_shapes_are_refused():
    with pytest.raises(RuntimeError, match="leading dims"):
        lora_attribution(torch.ones(4, 6), torch.ones(5, 3), torch.ones(6, 3), 1.0)
    with pytest.raises(RuntimeError, match="edit must be"):
        lora_attribution(torch.ones(4, 6), torch.ones(4, 3), torch.ones(3, 6), 1.0)


def test_fake_and_meta_tensors_give_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = lora_attribution(torch.empty(2, 9, 7, dtype=torch.bfloat16), torch.empty(2, 9, 4, dtype=torch.bfloat16),
                               torch.empty(7, 4, dtype=torch.bfloat16), 2.0)
        assert out.shape == (7,) and out.dtype == torch.float64
    out = lora_attribution(torch.empty(5, 11, device="meta"), torch.empty(5, 3, device="meta"),
                           torch.empty(11, 3, device="meta"), 1.0)
    assert out.shape == (11,) and out.dtype == torch.float64 and out.device.type == "meta"


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(25)
    grad, u, edit = _inputs((3, 10), 13, 4, torch.float32, gen)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.mscp.lora_attribution, (grad, u, edit, 0.7))


def test_torch_compile_traces_the_op():
    gen = torch.Generator().manual_seed(26)
    grad, u, edit = _inputs((2, 8), 12, 3, torch.float32, gen)

    def f(grad, u, edit):
        return lora_attribution(grad, u, edit, 0.5) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(grad, u, edit)
    torch.testing.assert_close(got, f(grad, u, edit))
