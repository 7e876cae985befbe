"""What a patch computes, stage by stage: floating-point operations counted by torch's
FlopCounterMode (matrix products and attention, forward and backward), next to the bytes of
weights read (the report's `weight_reads`) and the wall time of an uncounted run of the same case.

Where a patch is bound by compute (this 2-core CPU: 260-300 GFLOP/s on these matrix shapes), the
ratio of two patches' FLOPs is the floor of the ratio of their times on any machine that computes
at the same rate for both; where it is bound by reading weights (a 70B model on a GPU), the bytes
are. Both are counts, not timings: the same on any machine where the patch makes the same choices.

    mscp synth --out /tmp/trio8 --hidden 1024 --intermediate 4096 --n-layers 8 --heads 16 --kv-heads 4 --vocab 32000
    python benchmarks/flops.py /tmp/trio8 --k 8 --json flops.json

FLOPs are counted by `mscp.core.reads.count_flops`, per stage of the report's `weight_reads`. The
counted run is slower than the timed one (every operator goes through the counter), so only the
uncounted run's time is reported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from mscp import patch, patch_many
from mscp.core.reads import count_flops

CASES = {
    "single-pass (wanda, paper setting)": dict(score="wanda", q=0.3, p=0.3, rho=0.2),
    "default": {},
}


def run(trio: dict[str, Path], options: dict, adapters: list[Path] | None) -> tuple[list[dict], float]:
    """The case's reports and its wall time: one patch call (patch_many with several adapters)."""
    clock = time.perf_counter()
    if adapters is None:
        reports = [patch(trio["base"], trio["aligned"], trio["adapter"], hash_inputs=False, **options).report]
    else:
        reports = [r.report for r in patch_many(trio["base"], trio["aligned"], adapters, hash_inputs=False, **options)]
    return reports, time.perf_counter() - clock


def measure(trio: dict[str, Path], options: dict, adapters: list[Path] | None = None) -> dict:
    """One uncounted run (wall time, bytes read), then one counted run (FLOPs per stage)."""
    reports, seconds = run(trio, options, adapters)
    with count_flops():
        counted, _ = run(trio, options, adapters)
    flops = counted[0]["weight_reads"]["flops"]
    rows = [sum(len(m["rows"]) for m in r["modules"].values()) for r in reports]
    assert rows == [sum(len(m["rows"]) for m in r["modules"].values()) for r in counted], "the counted run differs"
    return {"wall_s": round(seconds, 1), "gflop": round(flops["total"] / 1e9, 1),
            "stage_gflop": {k: round(v / 1e9, 1) for k, v in flops["stages"].items()},
            "passes": reports[0]["weight_reads"]["passes"], "rows": rows,
            "timings_s": {k: round(v, 1) for k, v in reports[0]["timings_s"].items() if isinstance(v, float)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trio", help="a folder with base/, aligned/ and adapter/ (mscp synth writes one)")
    ap.add_argument("--k", type=int, default=0, help="also the default with this many adapters in one call "
                                                     "(copies of the trio's); 0: not run")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    trio = {k: Path(args.trio) / k for k in ("base", "aligned", "adapter")}
    run(trio, CASES["single-pass (wanda, paper setting)"], None)  # warm-up: imports, kernel builds, page cache
    out = {}
    for name, options in CASES.items():
        out[name] = measure(trio, options)
        print(name, json.dumps(out[name]), flush=True)
    single, default = out["single-pass (wanda, paper setting)"], out["default"]
    out["default over single-pass"] = {"gflop": round(default["gflop"] / single["gflop"], 2),
                                       "wall": round(default["wall_s"] / single["wall_s"], 2),
                                       "passes": round(default["passes"] / single["passes"], 2)}
    print("default over single-pass", json.dumps(out["default over single-pass"]), flush=True)
    if args.k:
        with tempfile.TemporaryDirectory() as tmp:
            copies = [shutil.copytree(trio["adapter"], Path(tmp) / f"adapter{k}") for k in range(args.k)]
            name = f"default, {args.k} adapters in one call"
            out[name] = measure(trio, {}, copies)
            out[name]["over_one_adapter"] = {key: round(out[name][key] / default[key], 2)
                                             for key in ("gflop", "wall_s", "passes")}
            print(name, json.dumps(out[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
