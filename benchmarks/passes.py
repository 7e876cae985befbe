"""Passes over (base + aligned) that one patch reads, per stage: the package default (layers kept
loaded while the targets are generated, and reloaded per token as before, `resident_gb 0`) and the
paper's single-pass score. Bytes, not seconds: the same figure on any machine.

    mscp synth --out /tmp/trio8 --hidden 1024 --intermediate 4096 --n-layers 8 --heads 16 --kv-heads 4 --vocab 32000
    python benchmarks/passes.py /tmp/trio8 --json passes.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mscp import patch

CASES = {
    "single-pass (wanda, paper setting)": dict(score="wanda", q=0.3, p=0.3, rho=0.2),
    "default, layers reloaded per token (resident_gb 0)": dict(resident_gb=0),
    "default": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trio", help="a folder with base/, aligned/ and adapter/ (mscp synth writes one)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    trio = {k: Path(args.trio) / k for k in ("base", "aligned", "adapter")}
    out = {}
    for name, options in CASES.items():
        clock = time.time()
        reads = patch(trio["base"], trio["aligned"], trio["adapter"], hash_inputs=False, **options).report["weight_reads"]
        out[name] = {"passes": reads["passes"], "stage_passes": reads["stage_passes"], "one_pass_bytes": reads["one_pass"],
                     "wall_s": round(time.time() - clock, 1)}
        print(name, json.dumps(out[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
