"""Loader of mscp's C++/CUDA extension (`csrc/`), built with `torch.utils.cpp_extension.load`
(JIT, ninja) on first use and cached on disk.

* Cache: `$MSCP_EXT_DIR` or `<cache root>/ext` (mscp.paths), one folder per torch version, host CPU (the CPU
  code is compiled with `-march=native`), CUDA or not, and hash of the sources and compiler flags:
  two checkouts with different sources on one machine each keep their own build.
* The CPU sources are always compiled; the `.cu` sources only when `torch.cuda.is_available()`.
* The library registers its kernels as `torch.ops.mscp_ext.*` (CPU and CUDA dispatch keys).
* The first build says so on stderr ("building the C++ kernels (once, about 40 s)"). A failed build
  never breaks `import mscp.kernels`: the "cpp"/"cuda" backends become unavailable, one warning line
  gives the whole reason and the torch backend is used; `build_error()` keeps it. The failure is
  remembered in the build folder (`FAILED`), so later runs fall back at once with a short line
  instead of retrying a 40 s build; removing that file (or a change of sources, flags or torch)
  retries. `MSCP_EXT_DISABLE=1` skips the build altogether.
* ninja is looked for on PATH, then beside the interpreter (a venv's `bin/` that is not activated:
  pipx, `.venv/bin/mscp` called directly), then in the `ninja` package.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

from mscp.paths import cache_root

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "cuda": False, "error": None}

CPU_SOURCES = ("mscp_ops.cpp",)
CUDA_SOURCES = ("mscp_ops_cuda.cu",)


def csrc_dir() -> Path:
    """The C++ sources: `mscp/kernels/csrc` in an installed package, `<repo>/csrc` in a checkout."""
    for candidate in (_HERE / "csrc", _HERE.parents[1] / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    return _HERE.parents[1] / "csrc"


def _cpu_tag() -> str:
    """Identifies the host CPU's instruction set (the build uses -march=native)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


CUDA_CFLAGS = ["-O3", "--use_fast_math"]


def _source_tag(with_cuda: bool) -> str:
    """Hash of the sources and flags that go into the build."""
    h = hashlib.sha256()
    src = csrc_dir()
    for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ()):
        path = src / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    h.update(" ".join(cflags() + (CUDA_CFLAGS if with_cuda else [])).encode())
    return h.hexdigest()[:10]


def build_dir(with_cuda: bool) -> Path:
    root = Path(os.environ["MSCP_EXT_DIR"]) if os.environ.get("MSCP_EXT_DIR") else cache_root() / "ext"
    tag = f"torch{torch.__version__}-{_cpu_tag()}" + ("-cuda" if with_cuda else "-cpu") + f"-{_source_tag(with_cuda)}"
    return root / tag.replace("+", "_")


def cflags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    return flags


FAILED = "FAILED"  # in the build folder: why the last build there failed


def ninja_dir() -> str | None:
    """The folder of a ninja executable torch's builder can run, when ninja is not on PATH."""
    if shutil.which("ninja"):
        return None
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").is_file() and os.access(folder / "ninja", os.X_OK):
            return str(folder)
    return None


@contextlib.contextmanager
def _ninja_on_path():
    extra = ninja_dir()
    saved = os.environ.get("PATH")
    if extra:
        os.environ["PATH"] = extra + os.pathsep + (saved or "")
    try:
        yield
    finally:
        if extra:
            if saved is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = saved


class _RememberedFailure(RuntimeError):
    """A build that failed in an earlier run, with the same sources, flags and torch."""

    def __init__(self, marker: Path):
        super().__init__(f"{marker.read_text().strip()} (remembered from an earlier run: remove {marker} to retry)")
        self.marker = marker


def _build() -> None:
    if os.environ.get("MSCP_EXT_DISABLE", "0") not in ("", "0"):
        raise RuntimeError("disabled by MSCP_EXT_DISABLE")
    from torch.utils import cpp_extension

    src = csrc_dir()
    sources = [str(src / s) for s in CPU_SOURCES]
    with_cuda = bool(torch.cuda.is_available() and cpp_extension.CUDA_HOME)
    if with_cuda:
        sources += [str(src / s) for s in CUDA_SOURCES]
    missing = [s for s in sources if not Path(s).is_file()]
    if missing:
        raise RuntimeError(f"missing sources: {', '.join(missing)}")
    directory = build_dir(with_cuda)
    failed = directory / FAILED
    if failed.is_file():
        raise _RememberedFailure(failed)
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print(f"mscp: building the C++ kernels (once, about 40 s) in {directory}", file=sys.stderr, flush=True)
    try:
        with _ninja_on_path():
            cpp_extension.load(
                name="mscp_ext_cuda" if with_cuda else "mscp_ext",
                sources=sources,
                extra_cflags=cflags(),
                extra_cuda_cflags=CUDA_CFLAGS if with_cuda else None,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=os.environ.get("MSCP_EXT_VERBOSE", "0") not in ("", "0"),
            )
    except Exception as exc:
        try:  # remembered, so the next run falls back at once
            failed.write_text(_reason(exc) + "\n")
        except OSError:
            pass
        raise
    _state["cuda"] = with_cuda


def _reason(exc: BaseException) -> str:
    """The whole reason on one line (a compiler's output can span pages: its last lines name the cause)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 2000 else text[:600] + " ... " + text[-1400:]


def load() -> bool:
    """Build (first call) and load the extension; True when its ops are registered."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if not _state["tried"]:
            try:
                _build()
                _state["ok"] = hasattr(torch.ops.mscp_ext, "row_importance")
                if not _state["ok"]:
                    _state["error"] = "extension loaded but registered no ops"
            except _RememberedFailure as exc:
                _state["error"], _state["ok"] = str(exc), False
                print(f"mscp: warning: the C++ kernels failed to build earlier; using the torch backend "
                      f"(its reason is in {exc.marker}; remove that file to retry)", file=sys.stderr, flush=True)
            except Exception as exc:  # a compiler error, a missing toolchain: keep the reason
                _state["error"] = _reason(exc)
                _state["ok"] = False
                if "disabled by" not in _state["error"]:
                    print(f"mscp: warning: the C++ kernels could not be built ({_state['error']}); "
                          "using the torch backend", file=sys.stderr, flush=True)
            _state["tried"] = True
    return _state["ok"]


def build_error() -> str | None:
    """Why the extension is unavailable (None when it loaded, or was not tried yet)."""
    return _state["error"]


def cpu_available(device_type: str) -> bool:
    return device_type == "cpu" and load()


def cuda_available(device_type: str) -> bool:
    return device_type == "cuda" and load() and _state["cuda"]


def ops():
    """`torch.ops.mscp_ext`, building the extension if needed."""
    if not load():
        from mscp.errors import MSCPError

        raise MSCPError(f"the mscp C++ extension is unavailable: {build_error()}")
    return torch.ops.mscp_ext
