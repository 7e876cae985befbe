"""Peak memory of a streamed patch against the size of one checkpoint.

    python benchmarks/peak_memory.py --root /tmp/mscp-mem --n-layers 16

Writes (or reuses) a synthetic float32 trio with `mscp synth`, runs `mscp patch` on it in a child
process, and prints the child's peak RSS next to the size of one checkpoint. Run it for several
layer counts to see that the peak does not grow with depth. `--k 8` patches 8 adapters (the trio's
and seeded variants) in one call. The child's RSS is also sampled every 0.1 s, to show when the
peak happens.
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


def rss_bytes(pid: int) -> int | None:
    """The process's resident set size from /proc (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/mscp-mem")
    ap.add_argument("--n-layers", dest="layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=1, help="adapters patched in one call (default 1)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    trio = Path(args.root) / f"h{args.hidden}-i{args.intermediate}-l{args.layers}"
    mscp = [sys.executable, "-m", "mscp"]
    if not (trio / "adapter" / "adapter_model.safetensors").exists():
        subprocess.run(mscp + ["synth", "--out", str(trio), "--hidden", str(args.hidden), "--intermediate",
                               str(args.intermediate), "--n-layers", str(args.layers), "--heads", str(args.heads),
                               "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab), "--layers-per-shard", "1"],
                       check=True)
    adapters = [trio / "adapter"]
    if args.k > 1:
        from mscp.harness.bench import variant_adapters

        adapters = variant_adapters(trio / "adapter", trio / "variants", args.k)
    target = ["--out", str(trio / "patched")] if args.k == 1 else ["--out-dir", str(trio / "patched-many")]
    start = time.perf_counter()
    child = subprocess.Popen(mscp + ["patch", "--base", str(trio / "base"), "--aligned", str(trio / "aligned"),
                                     *[x for a in adapters for x in ("--adapter", str(a))], *target, "--overwrite",
                                     "--quiet", "--no-hash"])
    samples = []  # (seconds since start, RSS bytes)
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # this child's own rusage, not synth's
        if pid:
            break
        rss = rss_bytes(child.pid)
        if rss is not None:
            samples.append((time.perf_counter() - start, rss))
        time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"mscp patch failed with exit code {child.returncode}")
    peak = usage.ru_maxrss * 1024
    size = checkpoint_bytes(trio / "base")
    when = max(samples, key=lambda x: x[1]) if samples else (None, None)
    figures = {"layers": args.layers, "adapters": args.k, "checkpoint_bytes": size, "peak_rss_bytes": peak,
               "peak_over_checkpoint": peak / size, "wall_s": wall,
               "sampled_peak_at_s": when[0], "sampled_peak_rss_bytes": when[1], "rss_samples": samples[::5]}
    print(json.dumps({k: v for k, v in figures.items() if k != "rss_samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
