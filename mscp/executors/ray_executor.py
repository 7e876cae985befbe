"""The batch's groups as Ray tasks (`--executor ray`; `pip install 'mscp[ray]'`).

Each group of adapters is one task (`patch_group`), with `cpus_per_task` CPUs and as many torch
threads. The workers read the models and write the outputs themselves, so on a cluster of
several machines the models, adapters and --out-dir must be on a shared filesystem at the same
paths, and mscp installed on every node. A task that raises (a worker lost, memory, disk) is
retried by Ray `retries` times; then each adapter of its group is reported failed and the other
tasks go on. Bad input never raises out of a task: `patch_group` reports it per adapter.

Without --ray-address (and without RAY_ADDRESS in the environment) Ray starts a local cluster
for the run and stops it after; a cluster this process is already connected to is used as it is.
"""
from __future__ import annotations

import contextlib
import dataclasses

from mscp.errors import MSCPError
from mscp.executors.jobs import BatchSpec, Job, line, outcome


@contextlib.contextmanager
def ray_session(address: str | None, cpus_per_task: int):
    """Ray for the run: the cluster at `address` (or RAY_ADDRESS), a local one started for the run
    (and stopped after), or the one this process is connected to already. Yields its description."""
    try:
        import ray
    except ImportError:
        raise MSCPError("--executor ray needs Ray: pip install 'mscp[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR")
        except Exception as e:  # noqa: BLE001 - unreachable address, version mismatch...
            raise MSCPError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: "
                            f"{line(e)}") from None
    try:
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if cpus_per_task > cluster_cpus:
            raise MSCPError(f"--cpus-per-task {cpus_per_task} is more than the Ray cluster has ({cluster_cpus:g} CPUs)")
        yield {"kind": "ray", "address": (address or "local cluster") if started_here else "connected before the run",
               "cluster_cpus": cluster_cpus, "cpus_per_task": cpus_per_task}
    finally:
        if started_here:
            ray.shutdown()


def run_on_ray(groups: list[list[Job]], spec: BatchSpec, *, retries: int, cpus_per_task: int, on_done, task,
               window_note: str = "") -> dict:
    """Run `task(spec, group, window_note)` for every group as a Ray task (inside `ray_session`);
    `on_done(outcomes)` as each ends."""
    import ray

    remote = ray.remote(task).options(num_cpus=cpus_per_task, max_retries=retries, retry_exceptions=True)
    spec_ref = ray.put(dataclasses.replace(spec, threads=cpus_per_task))
    refs = {remote.remote(spec_ref, group, window_note): group for group in groups}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        group = refs[ready[0]]
        try:
            outcomes = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - the task failed after its retries
            cause = getattr(e, "cause", None) or e
            outcomes = [outcome(j, "failed", error=f"{line(cause)} (after {retries + 1} attempts)") for j in group]
        on_done(outcomes)
    return {"tasks": len(groups)}
