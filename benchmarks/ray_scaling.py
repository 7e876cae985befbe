"""Many adapters on a Ray cluster: one worker against two.

    python benchmarks/ray_scaling.py --adapters 32 --per-task 4 --json docs/figures/bench/ray_scaling.json

Writes (or reuses) a synthetic trio and N more adapters of the same base (`mscp.harness.synth`),
then patches all of them with `run_batch(executor="ray")` on a local Ray cluster of 1 CPU, and
again on one of 2 CPUs (a task takes 1 CPU and 1 torch thread, so that is one worker against
two), --repeats times, alternating. Each run starts from an empty --out-dir and computes the
window once. Prints adapters per second (done / time of the patching phase, the window excluded)
and the ratio of the medians, with the machine's load average next to each figure, and checks
that every run wrote bit-identical adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from mscp.core.config import PatchConfig
from mscp.executors.batch import BatchSpec, run_batch
from mscp.harness.synth import SynthSpec, write_adapters, write_trio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--per-task", type=int, default=4, help="adapters per Ray task (patched in one pass)")
    ap.add_argument("--workers", default="1,2", help="cluster CPUs of each run, in order")
    ap.add_argument("--root", default="/tmp/mscp-ray-bench")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    import ray

    spec = SynthSpec(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.n_layers,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=1024, rank=8)
    root = Path(args.root)
    trio = root / "trio"
    if not (trio / "adapter" / "adapter_model.safetensors").exists():
        write_trio(trio, spec)
    adapters = sorted((root / "adapters").glob("adapter-*"))
    if len(adapters) < args.adapters:
        adapters = write_adapters(root / "adapters", spec, args.adapters)
    adapters = [str(a) for a in adapters[: args.adapters]]
    batch = BatchSpec(str(trio / "base"), str(trio / "aligned"),
                      PatchConfig(progress=False, hash_inputs=False).to_dict())

    runs = []
    order = [int(w) for w in args.workers.split(",")] * args.repeats
    for n, workers in enumerate(order):
        out = root / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR")
        try:
            clock = time.perf_counter()
            summary = run_batch(batch, adapters, out, executor="ray", per_task=args.per_task, progress=False)
            wall = time.perf_counter() - clock
        finally:
            ray.shutdown()
        assert summary["counts"]["done"] == len(adapters), summary["counts"]
        runs.append({"run": n, "workers": workers, "adapters": len(adapters), "per_task": args.per_task,
                     "tasks": summary["executor"]["tasks"], "wall_s": round(wall, 2),
                     "patch_s": summary["patch_seconds"], "adapters_per_second": summary["adapters_per_second"],
                     "window": summary["window"], "load_before": round(load_before, 2),
                     "load_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(runs[-1]), flush=True)
    for name in (Path(a).name for a in adapters):  # the same bytes whatever the cluster
        first = (root / "out-0" / name / "adapter_model.safetensors").read_bytes()
        assert all((root / f"out-{r['run']}" / name / "adapter_model.safetensors").read_bytes() == first
                   for r in runs[1:]), name
    median = {w: statistics.median(r["adapters_per_second"] for r in runs if r["workers"] == w) for w in set(order)}
    first, last = order[0], order[len(set(order)) - 1]
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "model": {
        "hidden": args.hidden, "layers": args.n_layers, "rank": spec.rank}, "runs": runs,
        "median_adapters_per_second": {str(w): round(v, 4) for w, v in sorted(median.items())},
        "ratio": round(median[last] / median[first], 3) if last != first else None}
    rates = ", ".join(f"{w} worker(s) {v:.3f}" for w, v in sorted(median.items()))
    print(f"adapters/s (median of {args.repeats}): {rates}; ratio {result['ratio']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
