"""`mscp patch`: repair one or several LoRA adapters."""
from __future__ import annotations

from pathlib import Path

from mscp.cli.options import add_config_options, add_prompt_options, check_paths_given, config_from_args
from mscp.errors import MSCPError

HELP = "repair a LoRA adapter with MSCP"


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="pre-alignment model folder (or hub id)")
    p.add_argument("--aligned", required=True, help="aligned model folder (or hub id)")
    p.add_argument("--adapter", required=True, action="append",
                   help="peft LoRA adapter folder fine-tuned on the aligned model; repeat it to patch several in one pass")
    p.add_argument("--out", help="output folder for the patched adapter and its report (one adapter)")
    p.add_argument("--out-dir", help="parent folder of the outputs, one subfolder per adapter (named after it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_prompt_options(p)
    add_config_options(p)


def run(args) -> int:
    from mscp.core.pipeline import patch_many

    config = config_from_args(args)
    check_paths_given(args, ("base", "aligned", "adapter", "out", "out_dir", "harmful", "benign", "task", "tokenizer"))
    if (args.out is None) == (args.out_dir is None):
        raise MSCPError("give exactly one of --out (one adapter) or --out-dir")
    if args.out is not None and len(args.adapter) > 1:
        raise MSCPError("several adapters need --out-dir (one output folder each)")
    names = [Path(a).resolve().name for a in args.adapter]
    if args.out_dir is not None and len(set(names)) != len(names):
        names = [f"{k:02d}-{name}" for k, name in enumerate(names)]
    outs = [Path(args.out)] if args.out is not None else [Path(args.out_dir) / name for name in names]
    # --out-dir and its missing parents are created only when the first output is written
    results = patch_many(args.base, args.aligned, args.adapter, outs, harmful=args.harmful, benign=args.benign,
                         task=args.task, tokenizer=args.tokenizer, config=config, overwrite=args.overwrite,
                         parents=args.out_dir is not None)
    for result, out in zip(results, outs):
        if len(results) > 1:
            print(f"-- {result.report['paths']['adapter']}")
        print_summary(result.report, out)
    return 0


def print_summary(report: dict, out) -> None:
    layers = report["safety_layers"]
    n_mod = sum(1 for m in report["modules"].values() if m["n_rows"] and not m["skipped"])
    print(f"safety layers: {layers[0]}-{layers[-1]} of {report['n_layers']} (criterion {report['config']['criterion']}"
          f"{', explicit' if report['config']['layers'] else ''})")
    print(f"projected rows in {n_mod} modules; edit fraction {100 * report['edit_fraction']:.3f} % "
          f"({report['edited_parameters']} of {report['lora_parameters']} LoRA parameters)")
    if report["skipped_modules"]:
        print(f"skipped (V = 0): {len(report['skipped_modules'])} modules")
    print(f"wrote {out}/adapter_model.safetensors, adapter_config.json, mscp_report.json")
