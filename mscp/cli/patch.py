"""`mscp patch`: repair one LoRA adapter (--out), or many (--adapter ... / --adapters, --out-dir).

Exit codes: 0 done; 1 some adapters of a batch failed (each named on stderr and in
DIR/mscp_run.json; the others are written); 2 bad input, nothing written; 3 with --fail-on-noop,
a patch edited nothing (status noop; its output is written, its report says why).
"""
from __future__ import annotations

import sys
from pathlib import Path

from mscp.cli.options import add_config_options, add_prompt_options, check_paths_given, config_from_args
from mscp.errors import MSCPError

HELP = "repair a LoRA adapter with MSCP (or many, locally or on a Ray cluster)"
EXECUTORS = ("local", "ray")  # as mscp.executors.batch.EXECUTORS, without importing it (no torch for --help)
FAILED_EXIT, NOOP_EXIT = 1, 3


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="pre-alignment model folder (or hub id, org/name[@REV])")
    p.add_argument("--aligned", required=True, help="aligned model folder (or hub id, org/name[@REV])")
    p.add_argument("--adapter", action="append",
                   help="peft LoRA adapter folder (or hub id) fine-tuned on the aligned model; repeat it to patch "
                        "several (with --out-dir)")
    p.add_argument("--adapters", metavar="FILE_OR_GLOB",
                   help="many adapters: a file listing adapter folders or hub ids (one a line, '#' comments) or a "
                        "glob of adapter folders (quote it); needs --out-dir")
    p.add_argument("--revision", metavar="REV",
                   help="branch, tag or commit of adapter hub ids given without @REV (through the Hugging Face cache)")
    p.add_argument("--out", help="output folder for the patched adapter and its report (one adapter)")
    p.add_argument("--out-dir", help="parent folder of the outputs, one subfolder per adapter (named after it); a "
                                     "rerun skips outputs that are complete for the same inputs and config; "
                                     "DIR/mscp_run.json summarises the run")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the adapters of --out-dir are patched: 'local' (this process) or 'ray' (Ray tasks; "
                        "pip install 'mscp[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to run on (default: RAY_ADDRESS, else a local cluster for the run)")
    p.add_argument("--adapters-per-task", type=int, metavar="K",
                   help="adapters patched together in one task, the weights read once for them (default: all of "
                        "them locally, 4 per Ray task)")
    p.add_argument("--cpus-per-task", type=int, default=1, metavar="N",
                   help="CPUs (and torch threads) of each Ray task (default 1)")
    p.add_argument("--task-retries", type=int, default=2, metavar="N",
                   help="retries of a task that fails other than on bad input (a worker lost, memory, disk; default 2)")
    p.add_argument("--fail-on-noop", action="store_true",
                   help=f"exit with code {NOOP_EXIT} when a patch edits nothing (report status 'noop'); the output "
                        "is still written")
    p.add_argument("--cache", metavar="DIR",
                   help="keep what depends only on base, aligned and the prompts (layer curves, the aligned model's "
                        "answers to the harmful prompts) in DIR, for the next patch of another adapter (one adapter, "
                        "--out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_prompt_options(p)
    add_config_options(p)


def run(args) -> int:
    config = config_from_args(args)
    check_paths_given(args, ("base", "aligned", "adapter", "adapters", "out", "out_dir", "harmful", "benign", "task",
                             "tokenizer", "cache"))
    if args.adapter and args.adapters:
        raise MSCPError("give --adapter (one or more) or --adapters FILE_OR_GLOB, not both")
    if not args.adapter and not args.adapters:
        raise MSCPError("give --adapter DIR (one or more) or --adapters FILE_OR_GLOB")
    if (args.out is None) == (args.out_dir is None):
        raise MSCPError("give exactly one of --out (one adapter) or --out-dir")
    if args.cache and args.out_dir is not None:
        raise MSCPError("--cache is for one adapter (--out); the adapters of --out-dir share these results in their pass")
    if args.out is not None:
        if args.adapters or len(args.adapter) > 1:
            raise MSCPError("several adapters need --out-dir (one output folder each)")
        batch_only = [flag for flag, given in (("--executor ray", args.executor != "local"),
                                               ("--ray-address", args.ray_address),
                                               ("--adapters-per-task", args.adapters_per_task)) if given]
        if batch_only:
            raise MSCPError(f"{batch_only[0]} needs --out-dir")
        return run_one(args, config)
    return run_many(args, config)


def run_one(args, config) -> int:
    from mscp.core.pipeline import patch_many

    result = patch_many(args.base, args.aligned, args.adapter, [Path(args.out)], harmful=args.harmful,
                        benign=args.benign, task=args.task, tokenizer=args.tokenizer, config=config,
                        overwrite=args.overwrite, revision=args.revision, cache=args.cache)[0]
    print_summary(result.report, Path(args.out))
    if args.fail_on_noop and result.report["status"] == "noop":
        print(f"mscp: error: the patch edited nothing (status noop: {noop_reason(result.report)}); "
              f"--fail-on-noop exits with {NOOP_EXIT}", file=sys.stderr)
        return NOOP_EXIT
    return 0


def run_many(args, config) -> int:
    from mscp.executors.batch import SUMMARY_NAME, BatchSpec, list_adapters, run_batch

    adapters = list_adapters(args.adapters) if args.adapters else list(args.adapter)
    spec = BatchSpec(base=args.base, aligned=args.aligned, config=config.to_dict(), harmful=args.harmful,
                     benign=args.benign, task=args.task, tokenizer=args.tokenizer, revision=args.revision,
                     overwrite=args.overwrite)
    summary = run_batch(spec, adapters, args.out_dir, executor=args.executor, ray_address=args.ray_address,
                        per_task=args.adapters_per_task, retries=args.task_retries, cpus_per_task=args.cpus_per_task,
                        progress=config.progress)
    counts = summary["counts"]
    where = Path(summary["out_dir"]) / SUMMARY_NAME
    rate = f", {summary['adapters_per_second']:.3g} adapters/s" if summary["adapters_per_second"] else ""
    print(f"adapters: {counts['done']} done, {counts['skipped']} skipped (complete), {counts['failed']} failed, "
          f"of {counts['total']}{rate}; safety layers {window_text(summary['safety_layers'])}")
    print(f"summary: {where}")
    for entry in summary["adapters"]:
        if entry["status"] == "failed":
            print(f"mscp: failed: {entry['adapter']}: {entry['error']}", file=sys.stderr)
    noop = [e["adapter"] for e in summary["adapters"] if e.get("report_status") == "noop"]
    if noop:
        print(f"mscp: warning: {len(noop)} adapter(s) edited nothing (status noop), e.g. {noop[0]}; see their "
              "report.html", file=sys.stderr)
    if counts["failed"]:
        print(f"mscp: error: {counts['failed']} of {counts['total']} adapters failed; the others are written "
              f"(see {where})", file=sys.stderr)
        return FAILED_EXIT
    if args.fail_on_noop and noop:
        print(f"mscp: error: {len(noop)} adapter(s) edited nothing (status noop); --fail-on-noop exits with "
              f"{NOOP_EXIT}", file=sys.stderr)
        return NOOP_EXIT
    return 0


def window_text(layers) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "(not computed)"


def noop_reason(report: dict) -> str:
    return report["warnings"][0] if report.get("warnings") else "no row was selected"


def print_summary(report: dict, out) -> None:
    from mscp.core.report import OUTPUT_FILES
    layers = report["safety_layers"]
    print(f"safety layers: {layers[0]}-{layers[-1]} of {report['n_layers']} (criterion {report['config']['criterion']}"
          f"{', explicit' if report['config']['layers'] else ''})")
    print(f"projected rows in {len(report['projected_modules'])} modules; edit fraction "
          f"{100 * report['edit_fraction']:.3f} % ({report['edited_parameters']} of {report['lora_parameters']} "
          "LoRA parameters)")
    if report["skipped_modules"]:
        reasons = sorted(set(report["skipped_modules"].values()))
        print(f"skipped: {len(report['skipped_modules'])} modules ({'; '.join(reasons)})")
    print(f"status: {report['status']}")
    for warning in report["warnings"]:
        print(f"mscp: warning: {warning}", file=sys.stderr)
    print(f"wrote {out}/: {', '.join(OUTPUT_FILES)}")
