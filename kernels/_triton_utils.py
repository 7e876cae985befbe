"""Shared helpers for the Triton backends (Liger-Kernel's `ops/utils.py` pattern).

Triton is imported lazily: `import mscp.kernels` must work where triton is absent, and Triton
decides between compiling (`JITFunction`) and the CPU interpreter (`InterpretedFunction`) when a
`@triton.jit` decorator runs, reading `TRITON_INTERPRET` at that moment. So each op module
defines its kernels inside a builder function and `lazy_kernels` builds them on first launch,
once per interpreter mode: setting `TRITON_INTERPRET=1` after `mscp.kernels` was imported works.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable

MAX_FUSED_SIZE = 65536


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton kernels run in its CPU interpreter (env TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device_type: str) -> bool:
    """Triton backends run on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and interpret_mode()


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
