"""Passes over (base + aligned) that a patch reads, per stage: the paper's single-pass score, the
package default (with the layers reloaded per generated token as before, `resident_gb 0`, and kept
loaded), and K adapters of one pair in one call. Bytes, not seconds: the same figure on any machine.

    mscp synth --out /tmp/trio8 --hidden 1024 --intermediate 4096 --n-layers 8 --heads 16 --kv-heads 4 --vocab 32000
    python benchmarks/passes.py /tmp/trio8 --k 8 --json passes.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from mscp import patch, patch_many

CASES = {
    "single-pass (wanda, paper setting)": dict(score="wanda", q=0.3, p=0.3, rho=0.2),
    "default, layers reloaded per token (resident_gb 0)": dict(resident_gb=0),
    "default, fixed budget (q 2 %)": dict(budget="fixed"),
    "default": {},
}


def figures(reports: list[dict], seconds: float) -> dict:
    reads = reports[0]["weight_reads"]  # one count for the whole call
    return {"passes": reads["passes"], "stage_passes": reads["stage_passes"], "one_pass_bytes": reads["one_pass"],
            "adapters": len(reports), "wall_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trio", help="a folder with base/, aligned/ and adapter/ (mscp synth writes one)")
    ap.add_argument("--k", type=int, default=8, help="adapters in the many-adapter call (copies of the trio's)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    trio = {k: Path(args.trio) / k for k in ("base", "aligned", "adapter")}
    out = {}
    for name, options in CASES.items():
        clock = time.time()
        report = patch(trio["base"], trio["aligned"], trio["adapter"], hash_inputs=False, **options).report
        out[name] = figures([report], time.time() - clock)
        print(name, json.dumps(out[name]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        copies = [shutil.copytree(trio["adapter"], Path(tmp) / f"adapter{k}") for k in range(args.k)]
        clock = time.time()
        results = patch_many(trio["base"], trio["aligned"], copies, hash_inputs=False)
        name = f"default, {args.k} adapters in one call"
        out[name] = figures([r.report for r in results], time.time() - clock)
        out[name]["over_one_adapter"] = {"passes": round(out[name]["passes"] / out["default"]["passes"], 3),
                                         "wall": round(out[name]["wall_s"] / out["default"]["wall_s"], 2)}
        print(name, json.dumps(out[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
