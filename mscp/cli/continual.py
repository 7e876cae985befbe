"""`mscp continual init|add|status`: safety dimensions added to an adapter over time (docs/continual.md)."""
from __future__ import annotations

import json

from mscp.cli.options import add_config_options, add_prompt_options, check_paths_given, config_from_args
from mscp.core.config import BACKEND_CHOICES
from mscp.errors import MSCPError

HELP = "continual projection over safety dimensions: init, add, status"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="continual_command", required=True, parser_class=type(p), metavar="ACTION",
                           help="init, add or status")
    p_init = sub.add_parser("init", help="create a continual state: localisation shared by all dimensions",
                            description="Create STATE (--out): safety layers, task scores and the projection "
                                        "cache, shared by every dimension added later. Options as `mscp patch`.")
    _init_args(p_init)
    p_init.add_argument("--no-figures", action="store_true", help="do not write STATE/figures/*.png")
    p_add = sub.add_parser("add", help="add a safety dimension (its harmful prompts) to a state")
    p_add.add_argument("state", help="continual state folder (made by `mscp continual init`)")
    p_add.add_argument("--name", required=True, help="the dimension's name, e.g. a harm category")
    p_add.add_argument("--harmful", nargs="+", action="extend", metavar="FILE", required=True,
                       help="the dimension's harmful prompt files")
    p_add.add_argument("--q", type=float, help="safety-row fraction for this dimension (default: the state's)")
    p_add.add_argument("--p", type=float, help="task-row fraction for this dimension (default: the state's)")
    p_add.add_argument("--device", help="cpu or cuda[:N] (default: the state's)")
    p_add.add_argument("--backend", choices=BACKEND_CHOICES, help="kernel backend (default: the state's)")
    p_add.add_argument("--no-figures", action="store_true", help="do not rewrite STATE/figures/*.png")
    p_add.add_argument("--quiet", action="store_true", help="no progress bars")
    p_status = sub.add_parser("status", help="per-dimension mask sizes, edit fractions, overlap")
    p_status.add_argument("state", help="continual state folder")
    p_status.add_argument("--json", action="store_true", help="print the analytics as JSON")


def _init_args(p) -> None:
    """`mscp patch`'s model, prompt and config options (one adapter; --out is the state folder)."""
    p.add_argument("--base", required=True, help="pre-alignment model folder")
    p.add_argument("--aligned", required=True, help="aligned model folder")
    p.add_argument("--adapter", required=True, help="peft LoRA adapter folder (B0), fine-tuned on the aligned model")
    p.add_argument("--out", required=True, help="the continual state folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing state folder")
    add_prompt_options(p)  # --harmful only feeds the layer curves here
    add_config_options(p)  # its --q/--p are the dimensions' defaults


def run(args) -> int:
    from mscp.continual import add, format_status, init, status

    check_paths_given(args, ("base", "aligned", "adapter", "out", "harmful", "benign", "task", "tokenizer", "state"))
    if args.continual_command == "init":
        config = config_from_args(args)
        state = init(args.base, args.aligned, args.adapter, args.out, harmful=args.harmful, benign=args.benign,
                     task=args.task, tokenizer=args.tokenizer, config=config, overwrite=args.overwrite,
                     figures=not args.no_figures)
        layers = state.safety_layers
        print(f"safety layers: {layers[0]}-{layers[-1]} of {state.n_layers}; "
              f"{sum(m.safety_layer for m in state.modules.values())} LoRA modules can be projected; "
              f"init took {state.history[0]['timings_s']['total']:.2f} s")
        print(f"wrote {args.out} (STATE/adapter is the input adapter until a dimension is added)")
        return 0
    if args.continual_command == "add":
        for name in ("q", "p"):
            value = getattr(args, name)
            if value is not None and not 0 <= value <= 1:
                raise MSCPError(f"--{name} must be a fraction in [0, 1], got {value}")
        entry = add(args.state, args.name, harmful=args.harmful, q=args.q, p=args.p, device=args.device,
                    backend=args.backend, progress=False if args.quiet else None, figures=not args.no_figures)
        print(f"dimension {args.name}: mask {entry['mask_rows']} rows, {entry['new_rows']} new; incremental edit "
              f"fraction {100 * entry['incremental_edit_fraction']:.3f} %, total {100 * entry['cumulative_edit_fraction']:.3f} %"
              f"{' (repeat: nothing edited)' if entry.get('repeat_of') else ''}; {entry['timings_s']['total']:.2f} s")
        return 0
    s = status(args.state)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0
