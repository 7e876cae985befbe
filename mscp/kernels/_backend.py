"""Run-time backend selection for the mscp ops (the bitsandbytes pattern).

Each op is declared once as a `torch.library` custom op whose implementation looks up a backend
here. Backends register themselves with `register(op, name)`; the pure-torch reference ("torch")
is always there and defines what is correct. Without a forced backend, the first available name
in `PREFERENCE[device type]` wins.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable

from mscp.errors import MSCPError

# Fastest first. "torch" is always last, and always available.
PREFERENCE = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}
BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")


@dataclass
class _Impl:
    fn: Callable
    available: Callable[[str], bool]  # device type -> usable there?


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_forced = threading.local()


def register(op: str, backend: str, available: Callable[[str], bool] | None = None):
    """Decorator: `fn` implements `op` for `backend`; `available(device_type)` says where it runs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, available or (lambda _d: True))
        return fn

    return deco


def forced_backend() -> str:
    return getattr(_forced, "name", "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend for every op inside the block ("auto" restores the default choice)."""
    if name not in BACKENDS:
        raise MSCPError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    previous = forced_backend()
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


_recorders: list[dict] = []


@contextlib.contextmanager
def record_backends():
    """Collect {op: backend} of every op that runs inside the block (what a report states)."""
    used: dict[str, str] = {}
    _recorders.append(used)
    try:
        yield used
    finally:
        _recorders.remove(used)


def _note(op: str, name: str) -> None:
    for used in _recorders:
        used[op] = name


def available_backends(op: str, device_type: str) -> list[str]:
    return [name for name, impl in _REGISTRY.get(op, {}).items() if impl.available(device_type)]


def select(op: str, device_type: str) -> tuple[str, Callable]:
    """The implementation of `op` to run on `device_type`, honouring a forced backend."""
    impls = _REGISTRY[op]
    name = forced_backend()
    if name != "auto":
        impl = impls.get(name)
        if impl is None or not impl.available(device_type):
            have = ", ".join(available_backends(op, device_type))
            raise MSCPError(
                f"backend {name!r} is not available for {op} on {device_type} (available: {have})"
            )
        _note(op, name)
        return name, impl.fn
    for name in PREFERENCE.get(device_type, ("torch",)):
        impl = impls.get(name)
        if impl is not None and impl.available(device_type):
            _note(op, name)
            return name, impl.fn
    _note(op, "torch")
    return "torch", impls["torch"].fn
