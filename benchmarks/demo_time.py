"""How long `mscp demo` takes, stage by stage, in the two cases issue 14 sets goals for.

    python benchmarks/demo_time.py [--finetune benign] [--first] [--json OUT]

Default: the organism cached, nothing else. The demo runs in a child process with a fresh cache
folder that links the cached organism, the converted SmolLM2 model and the judge from
~/.cache/mscp (or --cache) but has none of the methods' answers, so every method's evaluation
generates (a rerun of `make demo` would read them and take only the patches). What the organism
keeps of its own comes with it: its models' answers (the build's checks make them) and the patch
cache (curves and refusals, made by the first patch on it); the figures say how many entries of
each were there before the run. --first: nothing linked but the converted SmolLM2 model, so the
organism is built too (the first `make demo`). Prints and writes (--json) the wall time, each
stage's seconds (summary.json's `stage_seconds`), the threads and the load average before and
after. Goals: 5 min cached, 15 min first, on the idle 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetune", default=None, help="the demo's fine-tune (default: the demo's default)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "mscp"), help="the cache to link from")
    ap.add_argument("--first", action="store_true", help="build the organism too (link only the SmolLM2 model)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    source = Path(args.cache)
    linked = ["smollm2-135m-instruct"] + ([] if args.first else ["organism", "judges"])
    missing = [name for name in linked if not (source / name).exists()]
    if missing:
        sys.exit(f"demo_time: {', '.join(missing)} not in {source}: run `make demo` once first")
    with tempfile.TemporaryDirectory(prefix="mscp-demo-time-") as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for name in linked:
            (cache / name).symlink_to(source / name)
        cmd = [sys.executable, "-m", "mscp", "demo", "--cache", str(cache), "--out", str(Path(tmp) / "out"), "--quiet"]
        if args.finetune:
            cmd += ["--finetune", args.finetune]
        organism_kept = {o.name: {part: len(list((o / part).glob("*.json"))) if (o / part).is_dir() else 0
                                  for part in ("responses", "patch_cache")}
                         for o in sorted((cache / "organism").glob("*"))} if (cache / "organism").exists() else {}
        load_before = os.getloadavg()
        clock = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - clock
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    result = {"case": "first (organism built)" if args.first else "organism cached, answers not",
              "wall_s": wall, "stage_seconds": summary["stage_seconds"], "finetune": summary["finetune"],
              "goal_s": 900 if args.first else 300, "cpus": os.cpu_count(), "organism_kept_before": organism_kept,
              "load_before": load_before, "load_after": os.getloadavg()}
    for name, seconds in result["stage_seconds"].items():
        print(f"{name:<28}{seconds:>8.1f} s")
    print(f"{'wall':<28}{wall:>8.1f} s  (goal {result['goal_s']} s; load average {load_before[0]:.2f} before, "
          f"{result['load_after'][0]:.2f} after)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
