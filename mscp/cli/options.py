"""Options shared by the commands that patch: prompt files, `--config FILE`, and one option per
PatchConfig field, generated from the field's metadata (mscp/core/config.py), so help texts and
defaults live in one place. Importing this module does not import torch."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from mscp.core.config import PatchConfig, config_from_mapping, read_config_file, with_overrides
from mscp.errors import MSCPError

_UNSET = None  # flags default to None: only the ones given override the config file


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--harmful", nargs="+", action="extend", metavar="FILE",
                   help="harmful prompt files (.txt/.jsonl/.csv; default: the built-in set)")
    p.add_argument("--benign", metavar="FILE", help="benign prompt file (default: the built-in set)")
    p.add_argument("--task", metavar="FILE", help="task prompt file (default: the benign prompts)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the aligned model's)")


def add_config_options(p: argparse.ArgumentParser, *, skip: tuple = ()) -> None:
    """--config FILE and one option per PatchConfig field (metadata 'cli' true, not in `skip`)."""
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of PatchConfig fields; options given on the command line override it")
    hints = typing.get_type_hints(PatchConfig)
    for f in dataclasses.fields(PatchConfig):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default
        if kind is bool:
            # a flag that flips the command line's default (e.g. --no-hash sets hash_inputs False)
            shown = default if meta.get("cli_default") is None else meta["cli_default"]
            p.add_argument(flag, dest=f.name, action="store_const", const=not shown, default=_UNSET,
                           help=meta.get("flag_help") or meta["help"])
            continue
        parse = meta.get("parse") or (kind if kind in (int, float) else str)
        extra = f" (default {default_text(f.name, default)})"
        p.add_argument(flag, dest=f.name, type=parse, default=_UNSET, choices=meta.get("choices"),
                       metavar=meta.get("metavar"), help=meta["help"] + extra)


def default_text(name: str, default) -> str:
    if name == "layers":
        return "the criterion's window"
    if name == "resident_gb":
        return "half the memory free on the device"
    return str(default)


def config_from_args(args, **fixed) -> PatchConfig:
    """PatchConfig defaults (the command line's where they differ), then the --config file, then the
    options given, then `fixed`."""
    defaults = {f.name: f.metadata["cli_default"] for f in dataclasses.fields(PatchConfig)
                if f.metadata.get("cli_default") is not None}
    values = dict(read_config_file(args.config)) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(PatchConfig)
                   if getattr(args, f.name, _UNSET) is not _UNSET})
    values.update(fixed)
    return with_overrides(PatchConfig(**defaults), config_from_mapping(values))


def check_paths_given(args, names) -> None:
    """An empty path ('') would mean the current folder: refuse it (`--out ''` must not replace it)."""
    for name in names:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not str(v).strip():
                raise MSCPError(f"--{name.replace('_', '-')} is empty: give a path")
