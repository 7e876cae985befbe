"""A Pareto run over a grid given on the command line (MSCP attribution and Safe LoRA), for the
fine-tunes where the full `pareto.GRID` costs too much time or needs other points.

    python experiments/pareto_grid.py --finetune harmful-128 --q 0.0025 0.005 0.01 0.02 0.05 0.1 0.2 \\
        --sigma-q 0.01 0.05 --qp 0.02 --tau 0.35 0.5 0.6 --modules 0.1 --out runs/pareto-harmful-128

Writes what `mscp demo --pareto` writes (OUT/pareto.json, pareto.png). Rerun into the same OUT with
more points: the scores (OUT/scores) and the answers of points already measured are reused.
"""
from __future__ import annotations

import argparse


def main() -> None:
    from mscp.harness.pareto import format_table, run_pareto

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetune", required=True)
    ap.add_argument("--q", type=float, nargs="*", default=[], help="attribution q over all layers (p 0)")
    ap.add_argument("--sigma-q", type=float, nargs="*", default=[], help="attribution q in the σ window (p 0)")
    ap.add_argument("--qp", type=float, nargs="*", default=[], help="attribution q = p over all layers")
    ap.add_argument("--keep-benign", nargs="*", default=[], metavar="Q:P",
                    help="attribution q and p over all layers, p removing the rows that damage the task and the "
                         "benign prompts' answers (against over-refusal)")
    ap.add_argument("--tau", type=float, nargs="*", default=[], help="Safe LoRA thresholds")
    ap.add_argument("--modules", type=float, nargs="*", default=[], help="Safe LoRA fractions of the modules")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    attribution = ([dict(q=q, p=0.0, window="all") for q in args.q] + [dict(q=q, p=0.0, window="sigma") for q in args.sigma_q]
                   + [dict(q=q, p=q, window="all") for q in args.qp]
                   + [dict(q=float(q), p=float(p), window="all", keep="task+benign")
                      for q, p in (item.split(":") for item in args.keep_benign)])
    safe_lora = [dict(tau=t) for t in args.tau] + [dict(modules=m) for m in args.modules]
    grid = {k: v for k, v in (("mscp:attribution", attribution), ("safe_lora", safe_lora)) if v}
    print(format_table(run_pareto(args.out, finetune=args.finetune, grid=grid, progress=False)))


if __name__ == "__main__":
    main()
