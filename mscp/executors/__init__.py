"""Many adapters of one base: `mscp patch --adapters FILE_OR_GLOB --out-dir DIR [--executor ray]`.

    batch          the batch: adapter lists, output names, config fingerprints (resume), the run
                   summary, groups of adapters patched by `patch_group`, the local executor
    ray_executor   the same groups as Ray tasks on a cluster (optional: `pip install 'mscp[ray]'`)

Imports the patcher (mscp.core) only; nothing here is imported by `from mscp import patch`.
"""
from mscp.executors.batch import BatchSpec, list_adapters, run_batch

__all__ = ["BatchSpec", "list_adapters", "run_batch"]
