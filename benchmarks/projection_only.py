"""Projection-only patch (masks known, as `fast_project` is used) on real layer shapes.

    python benchmarks/projection_only.py --preset llama-3.1-70b --layers 2 --root /tmp/mscp-70b

Writes (or reuses) a bf16 slice of the model with `mscp synth`, projects 15 % of the rows of every
LoRA module of every layer, and compares the time with the I/O floor: a raw read of the same
W_aligned and W_base bytes, back to back in the same page-cache state. Prints per-layer figures
and the estimate for a whole model's safety window (rho x n_layers layers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mscp.core.adapter import Adapter
from mscp.core.checkpoint import Checkpoint
from mscp.core.project import project_adapter
from mscp.harness.bench import read_floor, tensor_ranges

FULL_LAYERS = {"llama-3.1-70b": 80, "llama-3.1-8b": 32, "qwen2.5-7b": 28}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-70b", choices=sorted(FULL_LAYERS))
    ap.add_argument("--n-layers", dest="layers", type=int, default=2)
    ap.add_argument("--root", default="/tmp/mscp-proj")
    ap.add_argument("--fraction", type=float, default=0.15, help="rows projected per module")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--json")
    args = ap.parse_args()
    trio = Path(args.root) / f"{args.preset}-l{args.layers}"
    if not (trio / "adapter" / "adapter_model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "mscp", "synth", "--out", str(trio), "--preset", args.preset,
                        "--n-layers", str(args.layers), "--dtype", "bfloat16", "--rank", "16",
                        "--layers-per-shard", "1"], check=True)
    adapter = Adapter.load(trio / "adapter")
    g = torch.Generator().manual_seed(0)
    masks = {m.key_b: torch.randperm(adapter.tensors[m.key_b].shape[0], generator=g)[
        : round(args.fraction * adapter.tensors[m.key_b].shape[0])].sort().values for m in adapter.modules.values()}
    base, aligned = Checkpoint(trio / "base"), Checkpoint(trio / "aligned")
    weights = sorted(m.weight_key for m in adapter.modules.values())
    ranges = tensor_ranges(aligned, weights) + tensor_ranges(base, weights)
    floors, times = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        floors.append(read_floor(ranges))
        start = time.perf_counter()
        project_adapter(adapter, trio / "base", trio / "aligned", masks)
        times.append(time.perf_counter() - start)
    floor, took = statistics.median(floors), statistics.median(times)
    per_layer = took / args.layers
    window = round(args.rho * FULL_LAYERS[args.preset])
    fig = {"preset": args.preset, "layers": args.layers, "modules": len(weights),
           "bytes": sum(r[2] for r in ranges), "io_floor_s": floor, "projection_s": took,
           "ratio": took / floor, "per_layer_s": per_layer, "floor_per_layer_s": floor / args.layers,
           "estimate_window_layers": window, "estimate_window_s": per_layer * window,
           "all_floors_s": floors, "all_times_s": times, "threads": torch.get_num_threads()}
    print(json.dumps(fig, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
