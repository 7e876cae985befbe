"""Backend selection, the extension loader, and torch.library integration (opcheck, compile)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mscp.kernels import (
    _ext,
    available_backends,
    channel_sumsq,
    lowrank_project,
    row_importance,
    select,
    use_backend,
)
from ops_helpers import randn

from mscp.errors import MSCPError

OPS = ("mscp::channel_sumsq", "mscp::row_importance", "mscp::lowrank_project")


def _small_args(gen):
    x = randn(2, 5, 12, dtype=torch.bfloat16, gen=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    cs = (x, mask, torch.rand(12, generator=gen), torch.tensor([3], dtype=torch.int64))
    W = randn(9, 12, gen=gen)
    ri = (W, randn(9, 3, gen=gen), randn(3, 12, gen=gen), 0.5, torch.rand(12, 2, generator=gen))
    lp = (W, randn(9, 12, gen=gen), randn(9, 3, gen=gen), torch.tensor([0, 4, 8]), 1.0)
    return {"channel_sumsq": cs, "row_importance": ri, "lowrank_project": lp}


@pytest.mark.parametrize("op", OPS)
def test_forcing_an_unavailable_backend_is_a_one_line_error(op, monkeypatch):
    # Only `select` runs while TRITON_INTERPRET is unset: calling a custom op would make torch
    # import triton, fixing its mode to compiled for the rest of the session.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("cuda", "triton"):  # no GPU here; triton on CPU needs TRITON_INTERPRET=1
        with use_backend(name), pytest.raises(MSCPError) as info:
            select(op, "cpu")
        assert "\n" not in str(info.value) and name in str(info.value)


def test_forced_unavailable_backend_through_the_op():
    gen = torch.Generator().manual_seed(0)
    args = _small_args(gen)
    with use_backend("cuda"):
        for fn, name in ((channel_sumsq, "channel_sumsq"), (row_importance, "row_importance"),
                         (lowrank_project, "lowrank_project")):
            with pytest.raises(MSCPError):
                fn(*args[name])


def test_unknown_backend_name():
    with pytest.raises(MSCPError):
        with use_backend("opencl"):
            pass


def test_extension_builds_and_is_preferred_on_cpu():
    assert _ext.load(), _ext.build_error()
    for op in OPS:
        assert "cpp" in available_backends(op, "cpu")
        assert select(op, "cpu")[0] == "cpp"
        assert "cuda" not in available_backends(op, "cpu")


def test_failed_build_keeps_reason_and_falls_back(monkeypatch, tmp_path, capsys):
    saved = dict(_ext._state)
    try:
        monkeypatch.setattr(_ext, "csrc_dir", lambda: tmp_path)  # no sources there
        monkeypatch.setenv("MSCP_EXT_DIR", str(tmp_path / "build"))
        _ext._state.update(tried=False, ok=False, cuda=False, error=None)
        assert not _ext.load()
        assert "missing sources" in _ext.build_error()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "could not be built" in err and "using the torch backend" in err
        for op in OPS:
            assert "cpp" not in available_backends(op, "cpu")
            assert select(op, "cpu")[0] == "torch"
            with use_backend("cpp"), pytest.raises(MSCPError):
                select(op, "cpu")
        W = randn(4, 6)
        out = row_importance(W, None, None, 1.0, torch.ones(6, 1))  # auto: falls back to torch
        torch.testing.assert_close(out, W.abs().sum(1, keepdim=True))
    finally:
        _ext._state.clear()
        _ext._state.update(saved)


def test_build_folder_is_keyed_by_sources_and_flags(monkeypatch, tmp_path):
    """Two checkouts with different sources on one machine keep two builds, not one rebuilt in turn."""
    monkeypatch.setenv("MSCP_EXT_DIR", str(tmp_path / "build"))
    src = tmp_path / "csrc"
    src.mkdir()
    for name in _ext.CPU_SOURCES:
        (src / name).write_text((_ext.csrc_dir() / name).read_text())
    here = _ext.build_dir(False)
    monkeypatch.setattr(_ext, "csrc_dir", lambda: src)
    assert _ext.build_dir(False) == here  # same sources, same flags: the same build
    (src / _ext.CPU_SOURCES[0]).write_text((src / _ext.CPU_SOURCES[0]).read_text() + "\n// changed\n")
    changed = _ext.build_dir(False)
    assert changed != here and changed.parent == here.parent
    monkeypatch.setattr(_ext, "cflags", lambda: ["-O2"])
    assert _ext.build_dir(False) not in (here, changed)


def test_import_and_reference_work_without_triton(tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from mscp.kernels import row_importance, use_backend, available_backends\n"
        "assert 'triton' not in available_backends('mscp::row_importance', 'cpu')\n"
        "assert 'triton' not in available_backends('mscp::row_importance', 'cuda')\n"
        "with use_backend('torch'):\n"
        "    out = row_importance(torch.ones(3, 4), None, None, 1.0, torch.ones(4, 2))\n"
        "assert out.eq(4).all()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "MSCP_EXT_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    if backend == "cpp" and not _ext.load():
        pytest.skip(f"C++ extension unavailable: {_ext.build_error()}")
    gen = torch.Generator().manual_seed(1)
    args = _small_args(gen)
    with use_backend(backend):
        for name, op in (("channel_sumsq", torch.ops.mscp.channel_sumsq), ("row_importance", torch.ops.mscp.row_importance),
                         ("lowrank_project", torch.ops.mscp.lowrank_project)):
            torch.library.opcheck(op, args[name])
        torch.library.opcheck(torch.ops.mscp.row_importance, (args["row_importance"][0], None, None, 1.0,
                                                             args["row_importance"][4]))


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        W = torch.empty(7, 5, dtype=torch.bfloat16)
        out = row_importance(W, None, None, 1.0, torch.empty(5, 3))
        assert out.shape == (7, 3) and out.dtype == torch.float32
        B_new, norm = lowrank_project(W, W, torch.empty(7, 4, dtype=torch.bfloat16), torch.tensor([1, 2]), 1.0)
        assert B_new.shape == (7, 4) and B_new.dtype == torch.bfloat16 and norm.shape == ()


def test_torch_compile_traces_the_ops():
    gen = torch.Generator().manual_seed(2)
    args = _small_args(gen)

    def f(W, B, A, N, Wb, rows, x, mask, acc, count):
        s = row_importance(W, B, A, 0.5, N)
        B_new, norm = lowrank_project(W, Wb, B, rows, 1.0)
        channel_sumsq(x, mask, acc, count)
        return s * 2, B_new, norm

    W, B, A, _, N = args["row_importance"]
    _, Wb, _, rows, _ = args["lowrank_project"]
    x, mask, acc, count = args["channel_sumsq"]
    acc_c, count_c = acc.clone(), count.clone()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(W, B, A, N, Wb, rows, x, mask, acc_c, count_c)
    want = f(W, B, A, N, Wb, rows, x, mask, acc.clone(), count.clone())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert count_c.item() == count.item() + int(mask.sum())


def test_a_failed_build_is_remembered_and_later_runs_fall_back_at_once(monkeypatch, tmp_path, capsys):
    """The whole reason is printed once; the next run (a new process: here a reset state) does not
    retry the 40 s build but names the file that keeps the reason."""
    from torch.utils import cpp_extension

    saved = dict(_ext._state)
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["build_directory"])
        raise RuntimeError("Error building extension 'mscp_ext': c++: not found " + "x" * 300 + " the cause at the end")

    try:
        monkeypatch.setenv("MSCP_EXT_DIR", str(tmp_path / "build"))
        monkeypatch.setattr(cpp_extension, "load", failing_load)
        _ext._state.update(tried=False, ok=False, cuda=False, error=None)
        assert not _ext.load()
        warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warning) == 1 and "c++: not found" in warning[0] and "the cause at the end" in warning[0]
        marker = _ext.build_dir(False) / _ext.FAILED
        assert "c++: not found" in marker.read_text()

        _ext._state.update(tried=False, ok=False, cuda=False, error=None)  # a later run
        assert not _ext.load() and len(calls) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(marker) in err and "torch backend" in err
        assert "c++: not found" in _ext.build_error()
    finally:
        _ext._state.clear()
        _ext._state.update(saved)


def test_ninja_beside_the_interpreter_is_found_without_an_activated_venv(monkeypatch, tmp_path):
    fake_bin = tmp_path / "venv" / "bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "ninja").write_text("#!/bin/sh\necho 1.11\n")
    (fake_bin / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_ext.sys, "executable", str(fake_bin / "python"))
    assert _ext.ninja_dir() == str(fake_bin)
    with _ext._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep)[0] == str(fake_bin)
    assert os.environ["PATH"] == "/nonexistent"
