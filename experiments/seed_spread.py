"""How much the organism's key figures move when it is rebuilt with another training seed.

    python experiments/seed_spread.py --seeds 0 1 [--finetune NAME ...] [--out runs/seed_spread.json]

For each seed: the organism (built or reused; the splits are the same for every seed), the
aligned model's and each fine-tune's figures on the evaluation split (from the build's checks),
and MSCP with the package defaults (`PatchConfig()`), scored on the localisation prompts and
evaluated on the evaluation split. Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KEYS = ("keyword_asr", "over_refusal", "task_accuracy")


def main() -> None:
    from mscp.core.config import PatchConfig
    from mscp.harness.methods import patch_on_localisation
    from mscp.harness.evaluate import evaluate
    from mscp.harness.organism import FINETUNES, OrganismConfig, build, task_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--finetune", nargs="+", default=list(FINETUNES))
    ap.add_argument("--out", default="runs/seed_spread.json")
    ap.add_argument("--work", default="runs/seed_spread")
    args = ap.parse_args()
    config = PatchConfig(progress=False)
    rows = []
    for seed in args.seeds:
        org = build(None, OrganismConfig(seed=seed), finetunes=args.finetune, progress=False)
        aligned = org.record()["checks"]["aligned"]
        rows.append({"seed": seed, "model": "aligned", **{k: aligned[k] for k in KEYS}})
        for name in args.finetune:
            ft = org.finetune_record(name)["checks"]["finetuned"]
            rows.append({"seed": seed, "model": name, **{k: ft[k] for k in KEYS}})
            clock = time.time()
            out = Path(args.work) / f"seed{seed}-{name}"
            res = patch_on_localisation(org, org.finetuned(name), config, out)
            sp = org.splits
            r = evaluate(org.aligned, out, harmful=sp / "harmful_eval.txt", benign=sp / "benign_eval.txt",
                         task=org.task_file("eval", task_of(name)), judge=None, max_new_tokens=org.config.eval_tokens,
                         progress=False, keep_responses=False, cache=org.responses)
            rows.append({"seed": seed, "model": f"{name} + mscp (defaults)", **{k: r[k] for k in KEYS},
                         "edit_fraction": res.report["edit_fraction"], "seconds": time.time() - clock})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": config.to_dict(), "rows": rows}, indent=2) + "\n")
    print("| seed | model | keyword ASR % | over-refusal % | task % | edit % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        edit = f"{100 * r['edit_fraction']:.2f}" if "edit_fraction" in r else "–"
        print(f"| {r['seed']} | {r['model']} | {100 * r['keyword_asr']:.1f} | {100 * r['over_refusal']:.1f} | "
              f"{100 * r['task_accuracy']:.1f} | {edit} |")


if __name__ == "__main__":
    main()
