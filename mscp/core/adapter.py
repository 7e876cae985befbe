"""peft LoRA adapters: reading, pairing with the model's weights by name, validating.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensors are paired
by their names (`<prefix>.<module>.lora_A.weight` / `.lora_B.weight`), never by list order, so a
regex `target_modules`, biases or any ordering of the file work alike.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mscp.core.checkpoint import Checkpoint, check_finite, resolve_model_path
from mscp.errors import MSCPError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


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
        self.modules = _pair_modules(config, tensors)

    @classmethod
    def load(cls, path: str | Path, *, allow_pickle: bool = False, revision: str | None = None) -> "Adapter":
        """A peft adapter folder, or a hub id ('org/name', 'org/name@rev', or with `revision`)."""
        from mscp.core.hub import ADAPTER_FILES

        path = resolve_model_path(path, "adapter", revision=revision, patterns=ADAPTER_FILES).absolute()
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            raise MSCPError(f"adapter folder {path} has no adapter_config.json")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            raise MSCPError(f"corrupt adapter config: {config_path}") from None
        check_lora_config(config, str(config_path))
        ckpt = Checkpoint(path, allow_pickle=allow_pickle, label="adapter", stem="adapter_model")
        tensors = {name: ckpt.get(name) for name in ckpt.keys()}
        return cls(config, tensors, [config_path, *ckpt.files], path)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict | None = None) -> "Adapter":
        config = dict(config or {"peft_type": "LORA"})
        check_lora_config(config, "adapter config")
        for name, t in tensors.items():
            check_finite(t, "adapter", name)
        return cls(config, dict(tensors))

    def n_parameters(self) -> int:
        return sum(self.tensors[m.key_a].numel() + self.tensors[m.key_b].numel() for m in self.modules.values())

    def by_b_key(self) -> dict[str, LoraModule]:
        return {m.key_b: m for m in self.modules.values()}


def check_lora_config(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MSCPError(f"unsupported adapter type {peft_type} in {where}: mscp projects LoRA adapters only")
    if config.get("use_dora"):
        raise MSCPError(f"DoRA adapters are not supported ({where} has use_dora=true)")
    if config.get("lora_bias"):
        raise MSCPError(f"LoRA adapters with a trained bias are not supported ({where} has lora_bias=true)")


def _pair_modules(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
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
        modules[module] = LoraModule(module, keys["A"], keys["B"], rank, _scale(config, module, rank))
    return modules


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha patterns: a key matches a module path ending in it (as a regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


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
