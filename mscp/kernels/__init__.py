"""mscp's ops: `torch.library` custom ops in the `mscp` namespace.

Each op lives in its own module with its pure-torch reference (the definition of correct) and
its fake implementation; fast backends register overrides that `_backend.select` picks at run
time. Call them as plain functions or as `torch.ops.mscp.<name>`.
"""
from mscp.kernels import _ext
from mscp.kernels._backend import BACKENDS, available_backends, forced_backend, record_backends, select, use_backend
from mscp.kernels.channel_sumsq import channel_sumsq
from mscp.kernels.lora_attribution import lora_attribution
from mscp.kernels.lowrank_project import lowrank_project
from mscp.kernels.row_importance import row_importance


def prepare(device_type: str = "cpu") -> float:
    """Build or load the compiled kernels now, when the backend in force may use them on
    `device_type`, so the one-time build is not counted in the first layer's time. Returns the
    seconds it took."""
    import time

    clock = time.perf_counter()
    if forced_backend() in ("auto", "cuda" if device_type == "cuda" else "cpp"):
        _ext.load()
    return time.perf_counter() - clock


__all__ = [
    "BACKENDS",
    "available_backends",
    "channel_sumsq",
    "lora_attribution",
    "lowrank_project",
    "prepare",
    "record_backends",
    "row_importance",
    "select",
    "use_backend",
]
