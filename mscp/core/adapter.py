"""peft LoRA adapters: reading, pairing with the model's weights by name, validating.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensors are paired
by their names (`<prefix>.<module>.lora_A.weight` / `.lora_B.weight`), never by list order, so a
regex `target_modules`, biases or any ordering of the file work alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mscp.core.checkpoint import Checkpoint, check_finite, resolve_model_path
from mscp.core.textfiles import json_type, read_json_object
from mscp.errors import MSCPError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module or tensor name ('model.layers.3.mlp.up_proj' -> 3), or None."""
    m = _LAYER.search(name)
    return int(m[1]) if m else None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear module."""

    module: str  # module path in the model's checkpoint naming, e.g. model.layers.3.mlp.up_proj
    key_a: str  # adapter tensor names
    key_b: str
    rank: int
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"


class Adapter:
    """A LoRA adapter held in memory (adapters are small): its config, tensors and modules."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], files: list[Path] | None = None,
                 path: Path | None = None):
        self.config = config
        self.tensors = tensors
        self.files = files or []
        self.path = path
        where = str(path / "adapter_config.json") if path is not None else "the adapter config"
        self.modules = _pair_modules(config, tensors, where)

    @classmethod
    def load(cls, path: str | Path, *, allow_pickle: bool = False, revision: str | None = None) -> "Adapter":
        """A peft adapter folder, or a hub id ('org/name', 'org/name@rev', or with `revision`)."""
        from mscp.core.hub import ADAPTER_FILES

        path = resolve_model_path(path, "adapter", revision=revision, patterns=ADAPTER_FILES).absolute()
        config_path = path / "adapter_config.json"
        config = read_lora_config(path)
        ckpt = Checkpoint(path, allow_pickle=allow_pickle, label="adapter", stem="adapter_model")
        tensors = {name: ckpt.get(name) for name in ckpt.keys()}
        return cls(config, tensors, [config_path, *ckpt.files], path)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> "Adapter":
        if config is not None and not isinstance(config, dict):
            raise MSCPError(f"the adapter config must be a dict, got {type(config).__name__}")
        config = dict(config or {"peft_type": "LORA"})
        check_lora_config(config, "adapter config")
        for name, t in tensors.items():
            if t.is_meta:  # no data to check, project or write
                raise MSCPError(f"adapter tensor {name} is on the meta device, which has no data")
            check_finite(t, "adapter", name)
        return cls(config, dict(tensors))

    def n_parameters(self) -> int:
        return sum(self.tensors[m.key_a].numel() + self.tensors[m.key_b].numel() for m in self.modules.values())

    def by_b_key(self) -> dict[str, LoraModule]:
        return {m.key_b: m for m in self.modules.values()}


def read_lora_config(folder: Path) -> dict:
    """A local adapter folder's adapter_config.json, checked (a LoRA mscp can project); no tensor read."""
    config_path = Path(folder) / "adapter_config.json"
    if not config_path.is_file():
        raise MSCPError(f"adapter folder {folder} has no adapter_config.json")
    config = read_json_object(config_path, "adapter config")
    check_lora_config(config, str(config_path))
    return config


def check_lora_config(config: dict, where: str) -> None:
    """The fields mscp reads must have the types peft writes; a wrong one is one line, not a traceback."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise MSCPError(f"peft_type in {where} must be a string, got {json_type(peft_type)}")
    if peft_type.upper() != "LORA":
        raise MSCPError(f"unsupported adapter type {peft_type.upper()} in {where}: mscp projects LoRA adapters only")
    if config.get("use_dora"):
        raise MSCPError(f"DoRA adapters are not supported ({where} has use_dora=true)")
    if config.get("lora_bias"):
        raise MSCPError(f"LoRA adapters with a trained bias are not supported ({where} has lora_bias=true)")
    if "lora_alpha" in config:
        _check_number(config["lora_alpha"], f"lora_alpha in {where}")
    if "r" in config:  # peft builds lora_A with r rows: a rank it cannot build, OUT cannot load
        _check_rank(config["r"], f"r in {where}")
    _check_target_modules(config.get("target_modules"), where)
    if not isinstance(config.get("use_rslora", False), bool):
        raise MSCPError(f"use_rslora in {where} must be true or false, got {json_type(config['use_rslora'])}")
    for name, what in (("alpha_pattern", "lora_alpha"), ("rank_pattern", "rank")):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise MSCPError(f"{name} in {where} must be an object of regex -> {what}, got {json_type(patterns)}")
        for pattern, value in patterns.items():
            try:
                re.compile(_pattern_regex(pattern))
            except (re.error, RecursionError, OverflowError) as e:
                raise MSCPError(f"{name} in {where}: {pattern!r} is not a regular expression ({e})") from None
            (_check_rank if name == "rank_pattern" else _check_number)(value, f"{name}[{pattern!r}] in {where}")


def _check_target_modules(targets, where: str) -> None:
    """peft's target_modules: None, a list of module names (or name suffixes), or one regex that
    must match a module's whole name."""
    if targets is None:
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise MSCPError(f"target_modules in {where}: {targets!r:.80} is not a regular expression ({e})") from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        shown = f" {targets!r:.60}" if isinstance(targets, (int, float)) and not isinstance(targets, bool) else ""
        raise MSCPError(f"target_modules in {where} must be a list of module names or a regex string, "
                        f"got {json_type(targets)}{shown}")


def _check_rank(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = f" {value!r:.60}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        raise MSCPError(f"{what} must be a positive integer (a LoRA rank), got {json_type(value)}{shown}")


def _check_number(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        shown = f" {value!r:.60}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        raise MSCPError(f"{what} must be a finite number, got {json_type(value)}{shown}")


def _pair_modules(config: dict, tensors: dict[str, torch.Tensor], where: str = "the adapter config"
                  ) -> dict[str, LoraModule]:
    found: dict[str, dict[str, str]] = {}
    for name in tensors:
        if "lora_magnitude_vector" in name:
            raise MSCPError(f"DoRA adapters are not supported (tensor {name})")
        if "lora_embedding_" in name:
            raise MSCPError(f"LoRA on embeddings is not supported (tensor {name})")
        m = _LORA_KEY.match(name)
        if m is None:
            if ".lora_" in name:
                raise MSCPError(f"unsupported adapter tensor {name}")
            continue
        module = m["module"].removeprefix(PEFT_PREFIX)
        found.setdefault(module, {})[m["which"]] = name
    if not found:
        raise MSCPError("the adapter holds no lora_A/lora_B weights")
    modules = {}
    for module, keys in sorted(found.items()):
        if set(keys) != {"A", "B"}:
            raise MSCPError(f"adapter module {module} has lora_{'A' if 'A' not in keys else 'B'} missing")
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MSCPError(f"adapter module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a LoRA pair")
        rank = a.shape[0]
        if rank == 0:
            raise MSCPError(f"adapter module {module} has rank 0 (lora_A {tuple(a.shape)}): nothing to project")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise MSCPError(f"adapter module {module}: lora_A and lora_B must be floating point, got {a.dtype} and {b.dtype}")
        _check_against_config(config, module, rank, where)
        modules[module] = LoraModule(module, keys["A"], keys["B"], rank, _scale(config, module, rank))
    return modules


def _check_against_config(config: dict, module: str, rank: int, where: str) -> None:
    """The config must describe the tensors as peft reads them, or OUT (which keeps the config)
    cannot be loaded: the module's rank (rank_pattern, else r) and its place in target_modules."""
    pattern = next((k for k in config.get("rank_pattern") or {} if re.match(_pattern_regex(k), module)), None)
    said = config["rank_pattern"][pattern] if pattern is not None else config.get("r")
    if said is not None and said != rank:
        source = f"rank_pattern[{pattern!r}]" if pattern is not None else "r"
        raise MSCPError(f"adapter module {module} has rank {rank}, but {source} in {where} says {said}: "
                        "peft could not load the adapter")
    targets = config.get("target_modules")
    if config.get("target_parameters") or targets is None or targets == "all-linear":
        return  # peft's own defaults or parameter targets: not a module-name rule to check
    matched = (re.fullmatch(targets, module) if isinstance(targets, str)
               else module in targets or any(module.endswith(f".{t}") for t in targets))
    if not matched:
        raise MSCPError(f"adapter module {module} is not in target_modules of {where}: peft would not load its "
                        "tensors")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha patterns: a key matches a module path ending in it (as a regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(_pattern_regex(pattern), module):
            return value
    return default


def _pattern_regex(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_against_model(adapter: Adapter, shape_of) -> None:
    """Every LoRA module must exist in the model with matching shapes; `shape_of(key)` gives a weight's shape."""
    for m in adapter.modules.values():
        shape = shape_of(m.weight_key)
        if shape is None:
            raise MSCPError(f"adapter module {m.module} has no weight {m.weight_key} in the model")
        a, b = adapter.tensors[m.key_a], adapter.tensors[m.key_b]
        if len(shape) != 2 or b.shape[0] != shape[0] or a.shape[1] != shape[1]:
            raise MSCPError(f"adapter module {m.module}: lora_B {tuple(b.shape)} x lora_A {tuple(a.shape)} "
                            f"does not fit weight {tuple(shape)}")
