"""Shared helpers for the Triton backends (Liger-Kernel's `ops/utils.py` pattern).

Triton is imported lazily: `import mscp.kernels` must work where triton is absent, and Triton
decides between compiling (`JITFunction`) and the CPU interpreter (`InterpretedFunction`) when a
`@triton.jit` decorator runs, reading `TRITON_INTERPRET` at that moment. So each op module
defines its kernels inside a builder function and `lazy_kernels` builds them on first launch,
once per interpreter mode: setting `TRITON_INTERPRET=1` after `mscp.kernels` was imported works,
provided triton itself is first imported after that (triton defines `tl.zeros`, `tl.sum`, ... when
it is imported, in the mode of that moment); where the modes disagree the backend reports itself
unavailable instead of failing inside a kernel.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
from typing import Callable

MAX_FUSED_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_importable() -> bool:
    """Triton is installed (checked without importing it: importing fixes its mode)."""
    mod = sys.modules.get("triton", False)
    if mod is None:  # explicitly blocked (sys.modules["triton"] = None)
        return False
    return mod is not False or _triton_installed()


def _imported_mode_matches() -> bool:
    """Triton defines its own library functions (tl.zeros, tl.sum, ...) when first imported, as
    interpreted or compiled functions according to TRITON_INTERPRET at that moment; kernels of
    the other mode cannot call them. True when triton is not imported yet or its mode matches."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True
    interpreted = type(getattr(lang, "zeros", None)).__name__ == "InterpretedFunction"
    return interpreted == interpret_mode()


def interpret_mode() -> bool:
    """True when Triton kernels run in its CPU interpreter (env TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device_type: str) -> bool:
    """Triton backends run on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
    if device_type == "cuda":
        return not interpret_mode() and triton_importable() and _imported_mode_matches()
    return device_type == "cpu" and interpret_mode() and triton_importable() and _imported_mode_matches()


def lazy_kernels(builder: Callable[[], object]) -> Callable[[], object]:
    """Wrap `builder` (which imports triton and defines the @triton.jit kernels) so it runs on
    first use and once per interpreter mode."""
    cache: dict[bool, object] = {}
    lock = threading.Lock()

    @functools.wraps(builder)
    def get():
        mode = interpret_mode()
        if mode not in cache:
            with lock:
                if mode not in cache:
                    cache[mode] = builder()
        return cache[mode]

    return get


def next_power_of_2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def calculate_settings(n: int, max_block: int = MAX_FUSED_SIZE, min_block: int = 16) -> tuple[int, int]:
    """Block size (next power of 2 of n, clamped to [min_block, max_block]) and a warp count
    that grows with it (Liger's `calculate_settings`)."""
    block = min(max(next_power_of_2(n), min_block), max_block)
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def dot_block(n: int, cap: int) -> int:
    """A `tl.dot` operand dimension: a power of 2 covering n (at least 16, Triton's minimum),
    at most `cap` (larger n is tiled)."""
    return min(max(next_power_of_2(n), 16), cap)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
