"""`make bench-check`: catch a performance regression the day it happens.

Runs `mscp bench` on a small synthetic trio (written once under the cache root) and compares what
it measures against benchmarks/recorded.json:
- passes over (base + aligned) of the single-pass and the default score: counted bytes, the same
  on any machine, so any rise is a regression;
- the default's FLOPs over the single-pass score's: counted operations, the same wherever the patch
  makes the same choices (1 % allowed, for a torch whose counter counts an operator differently),
  so a stage that computes more is caught even where the time ratios' noise would hide it;
- ratios of two times taken side by side in the same run (projection only against its I/O floor,
  K adapters against one, the default against the single pass), the median of three bench runs:
  machine-independent enough to compare, with a tolerance for noise (50 %: the regressions this is
  for were 1.75x and 3x).
Exit 1 with one line per figure that got worse; `--record` writes the current figures as the new
reference (do that on a quiet machine, and say so in the commit).

    python benchmarks/bench_check.py [--record] [--tolerance 0.5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RECORDED = Path(__file__).with_name("recorded.json")
TRIO = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=8000, rank=8, layers_per_shard=2)
EXACT = ("passes_full", "passes_default")  # counted bytes: no tolerance
COUNTED = ("flops_default_over_single_pass",)  # counted FLOPs: 1 %
# the full pipeline against its I/O floor is left out: on this small trio the floor is a few ms and
# the ratio swung 11-21 over four runs of the same code
RATIOS = ("io_floor_ratio_projection", "multi_adapter_ratio", "default_over_single_pass")
RUNS = 3  # the median of each figure over this many bench runs


def trio() -> dict[str, Path]:
    from mscp.harness.synth import SynthSpec, write_trio
    from mscp.paths import cache_dir

    folder = cache_dir("bench-check")
    spec = SynthSpec(family="llama", **TRIO)
    if not (folder / "trio" / "adapter" / "adapter_config.json").is_file():
        write_trio(folder / "trio", spec)
    return {k: folder / "trio" / k for k in ("base", "aligned", "adapter")}


def measure() -> dict:
    import statistics

    from mscp.harness.bench import run_bench
    from mscp.paths import cache_dir

    t = trio()
    runs = [run_bench(t["base"], t["aligned"], t["adapter"], k=4, work=cache_dir("bench-check", "work"), repeats=3,
                      full_separate=False, n_prompts=8, log=lambda *_: None) for _ in range(RUNS)]
    return {k: statistics.median(run[k] for run in runs) for k in EXACT + COUNTED + RATIOS}


def compare(now: dict, recorded: dict, tolerance: float) -> list[str]:
    worse = [f"{key}: {now[key]:.3f}, not in {RECORDED.name} (record it)" for key in EXACT + COUNTED + RATIOS
             if key not in recorded]
    recorded = {**now, **recorded}  # a figure not recorded is flagged above, not again below
    for key in EXACT:
        if now[key] > recorded[key] + 1e-3:
            worse.append(f"{key}: {now[key]:.3f} passes, recorded {recorded[key]:.3f}")
    for key in COUNTED:
        if now[key] > recorded[key] * 1.01:
            worse.append(f"{key}: {now[key]:.3f}, recorded {recorded[key]:.3f} (more than 1 % more)")
    for key in RATIOS:
        if now[key] > recorded[key] * (1 + tolerance):
            worse.append(f"{key}: {now[key]:.2f}, recorded {recorded[key]:.2f} (more than {100 * tolerance:.0f} % worse)")
    return worse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="write the figures measured now as the reference")
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed rise of a time ratio (default 0.5)")
    args = ap.parse_args()
    now = measure()
    print(json.dumps(now, indent=1))
    if args.record:
        RECORDED.write_text(json.dumps(now, indent=1) + "\n")
        print(f"recorded in {RECORDED}")
        return 0
    worse = compare(now, json.loads(RECORDED.read_text()), args.tolerance)
    for line in worse:
        print(f"bench-check: worse: {line}", file=sys.stderr)
    print("bench-check: " + ("FAILED" if worse else "every figure within its recorded bound"))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
