"""`mscp demo`: MSCP end to end on the SmolLM2 safety model organism, against the baselines."""
from __future__ import annotations

from mscp.cli.organism import add_finetune_arg
from mscp.core.config import parse_layer_range
from mscp.errors import MSCPError
from mscp.harness.methods import grid_names

HELP = "MSCP end to end on the SmolLM2 safety model organism, against the baselines"
# the options each mode reads; any other option given is refused, never silently dropped
MODE_OPTIONS = {
    "demo": {"q", "p", "rho", "judge", "safe_lora_tau", "smoke"},
    "continual": {"q", "p", "rho", "layers"},
    "pareto": {"judge", "methods"},
}


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/pareto-FINETUNE or runs/continual)")
    p.add_argument("--cache", default=None, help="where the converted SmolLM2 model is cached (default: the cache root)")
    p.add_argument("--q", type=float, default=None, help="MSCP safety-row fraction (default: PatchConfig's)")
    p.add_argument("--p", type=float, default=None, help="MSCP task-row fraction (default: PatchConfig's)")
    p.add_argument("--rho", type=float, default=None, help="MSCP window fraction (default: PatchConfig's)")
    p.add_argument("--judge", default=None, help="judge for judge_refusal_rate (default embedding)")
    p.add_argument("--safe-lora-tau", type=float, default=None, help="Safe LoRA similarity threshold (default 0.5)")
    p.add_argument("--layers", default=None, metavar="A-B", type=parse_layer_range,
                   help="with --continual: explicit MSCP safety layers (default: the criterion's window)")
    p.add_argument("--methods", default=None, metavar="M,M",
                   help=f"with --pareto: only these methods of the grid, comma-separated ({', '.join(grid_names())}; "
                        "default all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--pareto", action="store_true",
                      help="instead: every method along its own knob (chosen on localisation prompts, reported "
                           "on the evaluation split): OUT/pareto.json and pareto.png (default --out runs/pareto-FINETUNE)")
    mode.add_argument("--continual", action="store_true",
                      help="instead: harm categories added one by one as continual dimensions, ASR per category "
                           "after each step (default --out runs/continual)")
    add_finetune_arg(p, many=False)
    p.add_argument("--smoke", action="store_true", default=None,
                   help="every stage on a tiny random model with a few prompts, in about a minute: checks an "
                        "install end to end (its figures mean nothing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def mode_of(args) -> str:
    return "continual" if args.continual else "pareto" if args.pareto else "demo"


def check_mode_options(args) -> str:
    mode = mode_of(args)
    for name in sorted(set().union(*MODE_OPTIONS.values()) - MODE_OPTIONS[mode]):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise MSCPError(f"{flag} has no effect with {'mscp demo' if mode == 'demo' else '--' + mode}")
    return mode


def patch_config(args):
    from mscp.core.config import PatchConfig

    options = {name: getattr(args, name) for name in ("q", "p", "rho", "layers") if getattr(args, name) is not None}
    return PatchConfig(progress=not args.quiet, **options)


def smoke_options(args) -> dict:
    """With --smoke: the tiny organism's recipe and base (run_demo's organism_cfg, base_dir)."""
    if not args.smoke:
        return {}
    from mscp.harness.organism import SMOKE_RECIPE, OrganismConfig, smoke_base

    return {"organism_cfg": OrganismConfig(**SMOKE_RECIPE), "base_dir": smoke_base(args.cache), "max_new_tokens": 3}


def run(args) -> int:
    from mscp.harness.organism import DEFAULT_FINETUNE

    mode = check_mode_options(args)
    finetune = args.finetune or DEFAULT_FINETUNE
    config = patch_config(args)
    progress = not args.quiet
    if mode == "continual":
        from mscp.harness.continual_eval import run_continual

        run_continual(args.out or "runs/continual", cache=args.cache, config=config, progress=progress,
                      finetune=finetune)
    elif mode == "pareto":
        from mscp.harness.pareto import run_pareto

        run_pareto(args.out or f"runs/pareto-{finetune}", cache=args.cache, finetune=finetune,
                   judge=args.judge or "embedding", progress=progress,
                   methods=args.methods.split(",") if args.methods else None)
    else:
        from mscp.harness.demo import run_demo

        run_demo(args.out or "runs/demo", cache=args.cache, config=config, judge=args.judge or "embedding",
                 safe_lora_tau=0.5 if args.safe_lora_tau is None else args.safe_lora_tau, progress=progress,
                 finetune=finetune, **smoke_options(args))
    return 0
