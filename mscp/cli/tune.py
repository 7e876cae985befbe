"""`mscp tune`: choose q for one adapter on its own calibration prompts, then patch it (harness/tune.py).

Exit codes: 0 written; 2 bad input, or no candidate q keeps the bounds (the table is printed;
nothing is written).
"""
from __future__ import annotations

from pathlib import Path

from mscp.cli.options import add_config_options, add_prompt_options, check_paths_given, config_from_args

HELP = "choose q for one adapter on its own prompts (task answers needed), then patch it with that q"


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="pre-alignment model folder (or hub id)")
    p.add_argument("--aligned", required=True, help="aligned model folder: it also answers the prompts")
    p.add_argument("--adapter", required=True, help="peft LoRA adapter folder fine-tuned on the aligned model")
    p.add_argument("--out", required=True, help="output folder for the adapter patched with the chosen q")
    p.add_argument("--q", dest="qs", type=float, nargs="+", default=None, metavar="Q",
                   help="candidate q values (default 0.01 0.02 0.05 0.1)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy answer length when judging (default 20)")
    p.add_argument("--responses-cache", metavar="DIR",
                   help="folder of cached answers (default <cache root>/responses)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_prompt_options(p)
    add_config_options(p, skip=("q",))


def run(args) -> int:
    from mscp.harness.tune import DEFAULT_QS, tune

    config = config_from_args(args)
    check_paths_given(args, ("base", "aligned", "adapter", "out", "harmful", "benign", "task", "tokenizer",
                             "responses_cache"))
    result = tune(args.base, args.aligned, args.adapter, Path(args.out), harmful=args.harmful, benign=args.benign,
                  task=args.task, tokenizer=args.tokenizer, qs=args.qs or DEFAULT_QS, config=config, overwrite=args.overwrite,
                  max_new_tokens=args.max_new_tokens, cache=args.responses_cache, progress=config.progress)
    report = result["report"]
    print(f"chosen q {result['chosen_q']:g}: edit fraction {100 * report['edit_fraction']:.3f} %; wrote {args.out}/ "
          "(its mscp_report.json holds the table under 'tuning')")
    return 0
