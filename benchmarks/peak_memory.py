"""Peak memory of a streamed patch against the size of one checkpoint.

    python benchmarks/peak_memory.py --root /tmp/mscp-mem --layers 16

Writes (or reuses) a synthetic float32 trio with `mscp synth`, runs `mscp patch` on it in a child
process, and prints the child's peak RSS next to the size of one checkpoint. Run it for several
layer counts to see that the peak does not grow with depth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/mscp-mem")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    trio = Path(args.root) / f"h{args.hidden}-i{args.intermediate}-l{args.layers}"
    mscp = [sys.executable, "-m", "mscp"]
    if not (trio / "adapter" / "adapter_model.safetensors").exists():
        subprocess.run(mscp + ["synth", "--out", str(trio), "--hidden", str(args.hidden), "--intermediate",
                               str(args.intermediate), "--layers", str(args.layers), "--heads", str(args.heads),
                               "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab), "--layers-per-shard", "1"],
                       check=True)
    out = trio / "patched"
    start = time.perf_counter()
    child = subprocess.Popen(mscp + ["patch", "--base", str(trio / "base"), "--aligned", str(trio / "aligned"),
                                     "--adapter", str(trio / "adapter"), "--out", str(out), "--overwrite",
                                     "--quiet", "--no-hash"])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not synth's
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"mscp patch failed with exit code {child.returncode}")
    peak = usage.ru_maxrss * 1024
    size = checkpoint_bytes(trio / "base")
    figures = {"layers": args.layers, "checkpoint_bytes": size, "peak_rss_bytes": peak,
               "peak_over_checkpoint": peak / size, "wall_s": wall}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
