"""`mscp organism build`: the SmolLM2 safety model organism (docs/evaluation.md): one aligned model
and the fine-tunes that erode it."""
from __future__ import annotations

HELP = "build the SmolLM2 safety model organism (base, aligned model, fine-tuned LoRAs, splits)"
FINETUNE_NAMES = ("benign", "identity", "harmful-32", "harmful-128", "mixed", "arithmetic")  # organism.FINETUNES


def add_finetune_arg(p, *, many: bool) -> None:
    if many:
        p.add_argument("--finetune", action="append", choices=FINETUNE_NAMES + ("all",), metavar="NAME",
                       help=f"fine-tune to build, repeatable: {', '.join(FINETUNE_NAMES)} or all "
                            "(default: the demo's fine-tune)")
    else:
        p.add_argument("--finetune", choices=FINETUNE_NAMES, default=None, metavar="NAME",
                       help=f"the organism's fine-tune to repair: {', '.join(FINETUNE_NAMES)} (default: the "
                            "paper-setting fine-tune that erodes most, see docs/evaluation.md)")


def add_arguments(p) -> None:
    p.add_argument("action", choices=("build",), help="build (or reuse) the safety model organism")
    p.add_argument("--out", default=None, help="output folder (default <cache root>/organism/<config hash>)")
    p.add_argument("--cache", default=None, help="cache root (default: the cache root below)")
    p.add_argument("--seed", type=int, default=0, help="training seed; splits stay the same (default 0)")
    p.add_argument("--holdout-category", action="append", default=[], metavar="CAT",
                   help="harm category kept for evaluation only (repeatable)")
    add_finetune_arg(p, many=True)
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    p.add_argument("--no-check", action="store_true", help="skip the held-out checks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from mscp.harness.organism import DEFAULT_FINETUNE, FINETUNES, OrganismConfig, build

    names = args.finetune or [DEFAULT_FINETUNE]
    names = list(FINETUNES) if "all" in names else list(dict.fromkeys(names))
    cfg = OrganismConfig(seed=args.seed, holdout_categories=tuple(args.holdout_category))
    org = build(args.out, cfg, finetunes=names, cache=args.cache, progress=not args.quiet, check=not args.no_check,
                force=args.force)
    checks = org.record().get("checks")
    if checks:
        a = checks["aligned"]
        print(f"aligned: keyword ASR {100 * a['keyword_asr']:.1f} %, over-refusal {100 * a['over_refusal']:.1f} %")
        for name, ok in checks["targets_met"].items():
            print(f"  {'met ' if ok else 'MISS'} {name}")
    for name in names:
        rec = org.finetune_record(name).get("checks")
        if rec:
            f = rec["finetuned"]
            print(f"{name}: keyword ASR {100 * f['keyword_asr']:.1f} %, task {100 * f['task_accuracy']:.1f} %, "
                  f"over-refusal {100 * f['over_refusal']:.1f} %")
    print(f"organism: {org.root}")
    return 0
