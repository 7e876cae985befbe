"""mscp's ops: `torch.library` custom ops in the `mscp` namespace.

Each op lives in its own module with its pure-torch reference (the definition of correct) and
its fake implementation; fast backends register overrides that `_backend.select` picks at run
time. Call them as plain functions or as `torch.ops.mscp.<name>`.
"""
from mscp.kernels._backend import BACKENDS, available_backends, record_backends, select, use_backend
from mscp.kernels.channel_sumsq import channel_sumsq
from mscp.kernels.lowrank_project import lowrank_project
from mscp.kernels.row_importance import row_importance

__all__ = [
    "BACKENDS",
    "available_backends",
    "channel_sumsq",
    "lowrank_project",
    "record_backends",
    "row_importance",
    "select",
    "use_backend",
]
