"""How many processes should generate the demo's answers: one with every CPU's thread, or several
with the CPUs split between them.

    python benchmarks/answer_workers.py [--workers 1 2] [--repeats 2] [--json OUT]

Answers the organism's 220 evaluation prompts (20 new tokens, fp32) for each of its fine-tunes
that is built (distinct adapters, so no answer is shared), with `answer_in_parallel` and a fresh
answer cache per run, alternating the worker counts `--repeats` times. Prints the seconds of each
run and the median per worker count; `mscp demo` uses 2 workers on a machine with 2 CPUs or more.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from mscp.harness.evaluate import answer_in_parallel
    from mscp.harness.organism import FINETUNES, build

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    org = build(None, finetunes=(), progress=False)
    adapters = [org.finetuned(name) for name in FINETUNES if (org.finetuned(name) / "adapter_config.json").is_file()]
    if len(adapters) < 2:
        raise SystemExit("answer_workers: build two fine-tunes or more first (mscp organism build --finetune all)")
    sp = org.splits
    splits = dict(harmful=sp / "harmful_eval.txt", benign=sp / "benign_eval.txt", task=sp / "task_eval.jsonl")
    runs: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:
            with tempfile.TemporaryDirectory(prefix="mscp-answers-") as cache:
                clock = time.perf_counter()
                answer_in_parallel(org.aligned, adapters, **splits, max_new_tokens=20, cache=cache, workers=workers)
                runs[workers].append(time.perf_counter() - clock)
            print(f"{workers} worker(s), {len(adapters)} adapters: {runs[workers][-1]:.1f} s "
                  f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    medians = {w: statistics.median(t) for w, t in runs.items()}
    for w, m in medians.items():
        print(f"median, {w} worker(s): {m:.1f} s ({m / len(adapters):.1f} s an adapter)")
    if args.json:
        Path(args.json).write_text(json.dumps({"adapters": [a.name for a in adapters], "cpus": os.cpu_count(),
                                               "seconds": runs, "median_s": medians}, indent=1) + "\n")


if __name__ == "__main__":
    main()
