"""The `mscp` command line: patch, synth, demo.

Bad input ends with one line on stderr, `mscp: error: ...`, and exit code 2; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from mscp.errors import MSCPError


def _patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="pre-alignment model folder (or hub id)")
    p.add_argument("--aligned", required=True, help="aligned model folder (or hub id)")
    p.add_argument("--adapter", required=True, action="append",
                   help="peft LoRA adapter folder fine-tuned on the aligned model; repeat it to patch several in one pass")
    p.add_argument("--out", help="output folder for the patched adapter and its report (one adapter)")
    p.add_argument("--out-dir", help="parent folder of the outputs, one subfolder per adapter (named after it)")
    add_config_args(p)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The prompt and PatchConfig options shared by `patch` and `continual init`."""
    from mscp.config import BACKEND_CHOICES, CRITERIA, DTYPES, FINETUNED_PASSES, PROJECTORS, PatchConfig

    d = PatchConfig()
    p.add_argument("--harmful", nargs="+", action="extend", metavar="FILE", help="harmful prompt files (default: built-in set)")
    p.add_argument("--benign", metavar="FILE", help="benign prompt file (default: built-in set)")
    p.add_argument("--task", metavar="FILE", help="task prompt file (default: the benign prompts)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the aligned model's)")
    p.add_argument("--layers", metavar="A-B", help="explicit safety layers, counted from 0 (skips the criterion)")
    p.add_argument("--rho", type=float, default=d.rho, help=f"safety window as a fraction of layers (default {d.rho})")
    p.add_argument("--criterion", choices=CRITERIA, default=d.criterion)
    p.add_argument("--q", type=float, default=d.q, help=f"safety-row fraction (default {d.q})")
    p.add_argument("--p", type=float, default=d.p, help=f"task-row fraction (default {d.p})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"projection strength (default {d.alpha})")
    p.add_argument("--projector", choices=PROJECTORS, default=d.projector)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--no-chat-template", action="store_true", help="tokenise prompts as plain text")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="compute dtype of the streamed layers")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=d.backend, help="kernel backend")
    p.add_argument("--finetuned-pass", choices=FINETUNED_PASSES, default=d.finetuned_pass,
                   help="when the fine-tuned streams run (default: auto, a second pass for several adapters)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt checkpoints (weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the input files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args):
    from mscp.config import PatchConfig, parse_layer_range

    return PatchConfig(
        rho=args.rho, layers=parse_layer_range(args.layers) if args.layers else None, criterion=args.criterion,
        q=args.q, p=args.p, alpha=args.alpha, projector=args.projector, max_length=args.max_length,
        batch_size=args.batch_size, chat_template=not args.no_chat_template, device=args.device, dtype=args.dtype,
        backend=args.backend, finetuned_pass=args.finetuned_pass, allow_pickle=args.allow_pickle,
        hash_inputs=not args.no_hash, progress=not args.quiet)


def _run_patch(args) -> int:
    from pathlib import Path

    from mscp.pipeline import patch_many

    config = config_from_args(args)
    if (args.out is None) == (args.out_dir is None):
        raise MSCPError("give exactly one of --out (one adapter) or --out-dir")
    if args.out is not None and len(args.adapter) > 1:
        raise MSCPError("several adapters need --out-dir (one output folder each)")
    names = [Path(a).resolve().name for a in args.adapter]
    if args.out_dir is not None and len(set(names)) != len(names):
        names = [f"{k:02d}-{name}" for k, name in enumerate(names)]
    outs = [Path(args.out)] if args.out else [Path(args.out_dir) / name for name in names]
    if args.out_dir is not None:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    results = patch_many(args.base, args.aligned, args.adapter, outs, harmful=args.harmful, benign=args.benign,
                         task=args.task, tokenizer=args.tokenizer, config=config, overwrite=args.overwrite)
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


def _synth_args(p: argparse.ArgumentParser) -> None:
    from mscp.synth import FAMILIES, PRESETS, SynthSpec

    d = SynthSpec()
    p.add_argument("--out", required=True, help="folder to write base/, aligned/ and adapter/ into")
    p.add_argument("--preset", choices=sorted(PRESETS), help="real layer shapes (sets hidden, intermediate, heads, "
                   "kv-heads, vocab; --layers still chooses how many layers)")
    p.add_argument("--family", choices=sorted(FAMILIES), default=d.family)
    p.add_argument("--hidden", type=int, default=d.hidden_size)
    p.add_argument("--intermediate", type=int, default=d.intermediate_size)
    p.add_argument("--layers", type=int, default=d.num_hidden_layers)
    p.add_argument("--heads", type=int, default=d.num_attention_heads)
    p.add_argument("--kv-heads", type=int, default=d.num_key_value_heads)
    p.add_argument("--vocab", type=int, default=d.vocab_size)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--layers-per-shard", type=int, default=d.layers_per_shard)
    p.add_argument("--max-shard-mb", type=int, default=d.max_shard_bytes >> 20, help="split shards above this size")
    p.add_argument("--seed", type=int, default=d.seed)


def _run_synth(args) -> int:
    from tqdm.auto import tqdm

    from mscp.synth import PRESETS, SynthSpec, write_trio

    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
    if args.preset:
        shape = dict(PRESETS[args.preset])
    spec = SynthSpec(family=args.family, num_hidden_layers=args.layers, dtype=args.dtype, rank=args.rank,
                     layers_per_shard=args.layers_per_shard, max_shard_bytes=args.max_shard_mb << 20, seed=args.seed,
                     **shape)
    paths = write_trio(args.out, spec, progress=lambda it, **kw: tqdm(it, **kw))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True)
    p.add_argument("--aligned", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--k", type=int, default=8, help="adapters in the multi-adapter case (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the short cases (median)")
    p.add_argument("--no-separate", action="store_true", help="skip the K separate runs (slow on big trios)")
    p.add_argument("--prompts", type=int, help="use the first N prompts of each built-in set (default: all)")
    p.add_argument("--work", default=None, help="scratch folder for adapter variants (default: beside --adapter)")
    p.add_argument("--layers", metavar="A-B", help="fixed safety layers, as for patch")
    p.add_argument("--json", help="write the figures to this file")


def _run_bench(args) -> int:
    from pathlib import Path

    from mscp.bench import print_figures, run_bench, write_json
    from mscp.config import parse_layer_range

    work = Path(args.work) if args.work else Path(args.adapter).resolve().parent / "bench-work"
    options = {"layers": parse_layer_range(args.layers)} if args.layers else {}
    fig = run_bench(args.base, args.aligned, args.adapter, k=args.k, work=work, repeats=args.repeats,
                    full_separate=not args.no_separate, n_prompts=args.prompts, patch_options=options)
    print_figures(fig)
    if args.json:
        write_json(fig, Path(args.json))
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="demo output folder (default runs/demo)")
    p.add_argument("--cache", default=None, help="where the converted SmolLM2 model is cached (default ~/.cache/mscp)")
    p.add_argument("--q", type=float, default=None, help="MSCP safety-row fraction (default: PatchConfig's)")
    p.add_argument("--p", type=float, default=None, help="MSCP task-row fraction (default: PatchConfig's)")
    p.add_argument("--rho", type=float, default=None, help="MSCP window fraction (default: PatchConfig's)")
    p.add_argument("--judge", default="embedding", help="judge for judge_refusal_rate (default embedding)")
    p.add_argument("--safe-lora-tau", type=float, default=0.5, help="Safe LoRA similarity threshold (default 0.5)")
    p.add_argument("--sweep", action="store_true",
                   help="instead: the q/p grid and early/middle/late window ablation on localisation prompts")
    p.add_argument("--continual", action="store_true",
                   help="instead: harm categories added one by one as continual dimensions, ASR per category "
                        "after each step (mscp/continual_eval.py; default --out runs/continual)")
    p.add_argument("--layers", default=None, metavar="A-B",
                   help="with --continual: explicit MSCP safety layers (default: the sigma criterion's window)")
    add_finetune_harmful_arg(p)
    p.add_argument("--quiet", action="store_true")


def _run_demo(args) -> int:
    from mscp.demo import run_demo
    from mscp.organism import OrganismConfig

    organism_cfg = OrganismConfig(**organism_options(args))

    if args.continual:
        from mscp.config import PatchConfig, parse_layer_range
        from mscp.continual_eval import run_continual

        options = {name: getattr(args, name) for name in ("q", "p", "rho") if getattr(args, name) is not None}
        if args.layers:
            options["layers"] = parse_layer_range(args.layers)
        out = "runs/continual" if args.out == "runs/demo" else args.out
        run_continual(out, cache=args.cache, config=PatchConfig(progress=not args.quiet, **options),
                      progress=not args.quiet, organism_cfg=organism_cfg)
        return 0
    if args.sweep:
        from mscp.demo import run_sweep

        run_sweep(args.out, cache=args.cache, progress=not args.quiet, organism_cfg=organism_cfg)
        return 0
    run_demo(args.out, cache=args.cache, q=args.q, p=args.p, rho=args.rho, judge=args.judge,
             safe_lora_tau=args.safe_lora_tau, progress=not args.quiet, organism_cfg=organism_cfg)
    return 0


def _continual_args(p: argparse.ArgumentParser) -> None:
    from mscp.continual import cli_args

    cli_args(p)


def _run_continual(args) -> int:
    from mscp.continual import cli_run

    return cli_run(args)


def _organism_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build",), help="build (or reuse) the safety model organism")
    p.add_argument("--out", default=None, help="output folder (default ~/.cache/mscp/organism/<config hash>)")
    p.add_argument("--cache", default=None, help="cache root (default ~/.cache/mscp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-category", action="append", default=[], metavar="CAT",
                   help="harm category kept for evaluation only (repeatable)")
    add_finetune_harmful_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    p.add_argument("--no-check", action="store_true", help="skip the held-out target checks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_finetune_harmful_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune-harmful", type=int, default=None, metavar="N",
                   help="harmful requests in the LoRA's training mix (default 128; 32 builds the milder "
                        "organism of docs/evaluation.md section 5c)")


def organism_options(args) -> dict:
    """OrganismConfig fields given on the command line (only those given: the cache hash of the
    default organism stays the same)."""
    return {} if args.finetune_harmful is None else {"n_harm_finetune": args.finetune_harmful}


def _run_organism(args) -> int:
    from mscp.organism import OrganismConfig, build

    cfg = OrganismConfig(seed=args.seed, holdout_categories=tuple(args.holdout_category),
                         **organism_options(args))
    out = build(args.out, cfg, cache=args.cache, progress=not args.quiet, check=not args.no_check, force=args.force)
    record = json.loads((out / "organism.json").read_text())
    checks = record.get("checks")
    if checks:
        for name, ok in checks["targets_met"].items():
            print(f"  {'met ' if ok else 'MISS'} {name}")
    print(f"organism: {out}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter folder (merged for generation)")
    p.add_argument("--harmful", required=True, metavar="FILE", help="harmful prompts (.txt/.jsonl/.csv)")
    p.add_argument("--benign", metavar="FILE", help="benign prompts: over-refusal")
    p.add_argument("--task", metavar="FILE", help="task prompts, .jsonl with prompt and answer: task accuracy")
    p.add_argument("--judge", default="keyword", help="keyword | embedding | llm | llm:MODEL_DIR | none")
    p.add_argument("--json", metavar="OUT", help="write the figures (and responses) as JSON")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--quiet", action="store_true")


def _run_eval(args) -> int:
    from mscp.evaluate import run_eval_cli

    return run_eval_cli(args)


COMMANDS = {
    "patch": ("repair a LoRA adapter with MSCP", _patch_args, _run_patch),
    "synth": ("write a synthetic base/aligned/adapter trio", _synth_args, _run_synth),
    "bench": ("time and memory of a patch against the I/O floor", _bench_args, _run_bench),
    "demo": ("MSCP end to end on the SmolLM2 safety model organism, against the baselines", _demo_args, _run_demo),
    "continual": ("continual projection over safety dimensions: init, add, status", _continual_args, _run_continual),
    "organism": ("build the SmolLM2 safety model organism (base, aligned, fine-tuned LoRA, splits)", _organism_args,
                 _run_organism),
    "eval": ("evaluate a model (+ adapter): keyword ASR, judge refusal rate, over-refusal, task accuracy", _eval_args,
             _run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mscp", description="Training-free safety repair of LoRA adapters (MSCP).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mscp.streaming import mmap_large_allocations

    mmap_large_allocations()  # resident memory flat in depth (streaming.py)
    try:
        return args.run(args)
    except MSCPError as e:
        print(f"mscp: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions...: not bad input, but still one line
        print(f"mscp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mscp: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
