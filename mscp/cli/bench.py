"""`mscp bench`: time and memory of a patch against the I/O floor (docs/scale.md)."""
from __future__ import annotations

from pathlib import Path

from mscp.core.config import parse_layer_range

HELP = "time and memory of a patch against the I/O floor"


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--aligned", required=True, help="aligned model folder")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder")
    p.add_argument("--k", type=int, default=8, help="adapters in the multi-adapter case (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the short cases (median)")
    p.add_argument("--no-separate", action="store_true", help="skip the K separate runs (slow on big trios)")
    p.add_argument("--prompts", type=int, help="use the first N prompts of each built-in set (default: all)")
    p.add_argument("--work", default=None, help="scratch folder for adapter variants (default: beside --adapter)")
    p.add_argument("--layers", metavar="A-B", type=parse_layer_range, help="fixed safety layers, as for patch")
    p.add_argument("--json", help="write the figures to this file")


def run(args) -> int:
    from mscp.harness.bench import print_figures, run_bench, write_json

    work = Path(args.work) if args.work else Path(args.adapter).resolve().parent / "bench-work"
    options = {"layers": args.layers} if args.layers else {}
    fig = run_bench(args.base, args.aligned, args.adapter, k=args.k, work=work, repeats=args.repeats,
                    full_separate=not args.no_separate, n_prompts=args.prompts, patch_options=options)
    print_figures(fig)
    if args.json:
        write_json(fig, Path(args.json))
    return 0
