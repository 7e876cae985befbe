"""peft's in-memory objects as mscp's inputs: a `PeftModel` (its adapter, and its base weights as
the aligned model, read in place on whatever device they are), peft's state dicts in either key
style (`...lora_B.weight` as saved, `...lora_B.default.weight` as `PeftModel.state_dict()` holds
them), and the repaired lora_B copied back into the model. Used by `fast_project` and by
`patch_peft_model` (peft_patch.py).
"""
from __future__ import annotations

import enum
import json
import re

import torch

from mscp.core.adapter import PEFT_PREFIX, Adapter
from mscp.core.streaming import InMemoryModel
from mscp.errors import MSCPError

# a tensor of some adapter inside a live peft model: ...lora_A.<adapter>.weight, ...modules_to_save.<adapter>...
_LIVE_LORA = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\.(?P<name>(?!weight$)[^.]+)(?:\.|$)")
_LIVE_SAVED = re.compile(r"\.modules_to_save\.(?P<name>[^.]+)\.")


def is_peft_model(obj) -> bool:
    """A peft `PeftModel` (duck-typed, so peft is imported only by those who have one)."""
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "peft_config") and hasattr(obj, "get_base_model")


def check_adapter_name(model, adapter_name: str) -> None:
    names = sorted(getattr(model, "peft_config", {}) or {})
    if adapter_name not in names:
        raise MSCPError(f"the PeftModel has no adapter {adapter_name!r} (it has: {', '.join(names) or 'none'})")


def _plain(value):
    """A peft config dict as JSON values: sets sorted into lists, enums by value."""
    def default(x):
        if isinstance(x, (set, frozenset)):
            return sorted(x)
        if isinstance(x, enum.Enum):
            return x.value
        return str(x)

    return json.loads(json.dumps(value, default=default))


def adapter_of_peft_model(model, adapter_name: str = "default") -> Adapter:
    """The named adapter of a PeftModel as mscp's `Adapter` (keys as peft saves them; the tensors
    are the model's own, read only)."""
    from peft import get_peft_model_state_dict

    check_adapter_name(model, adapter_name)
    config = _plain(model.peft_config[adapter_name].to_dict())
    tensors = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name,
                                                                           save_embedding_layers=False).items()}
    return Adapter.from_state_dict(tensors, config)


def aligned_of_peft_model(model) -> InMemoryModel:
    """The PeftModel's base weights under checkpoint names, without the adapters: the aligned model."""
    base = model.get_base_model()
    merged = [name for name, m in base.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise MSCPError(f"the PeftModel has adapters merged into its weights (e.g. {merged[0]}): its base weights are "
                        "not the aligned model's; call model.unmerge_adapter() first")
    tensors = {}
    for key, t in base.state_dict().items():
        if _LIVE_LORA.search(key) or ".modules_to_save." in key:
            continue
        tensors[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = t
    name = getattr(base.config, "_name_or_path", "") or "?"
    return InMemoryModel(tensors, base.config, f"in memory: the PeftModel's base weights ({name})")


def tokenizer_of_peft_model(model) -> str:
    """Where the PeftModel's base model was loaded from: its tokenizer's folder or hub id."""
    name = getattr(model.get_base_model().config, "_name_or_path", "") or ""
    if not name:
        raise MSCPError("the PeftModel does not say where its base model came from: pass tokenizer=FOLDER_OR_HUB_ID")
    return name


def adapter_state_dict(tensors: dict, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter in a peft state dict: all of them for the saved style
    (`...lora_B.weight`); for a live `PeftModel.state_dict()` (`...lora_B.<adapter>.weight` beside
    the base weights), those of `adapter_name` (default: the only one, or 'default')."""
    bad = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise MSCPError(f"the adapter state dict must map names to tensors; entry {bad!r} does not")
    live = {m["name"] for k in tensors for m in [_LIVE_LORA.search(k)] if m}
    if not live:
        if adapter_name not in (None, "default"):
            raise MSCPError(f"the state dict holds one adapter in peft's saved key style; adapter_name "
                            f"{adapter_name!r} cannot select from it")
        return dict(tensors)
    if adapter_name is None:
        if len(live) > 1 and "default" not in live:
            raise MSCPError(f"the state dict holds several adapters ({', '.join(sorted(live))}): pass adapter_name")
        adapter_name = "default" if "default" in live else next(iter(live))
    if adapter_name not in live:
        raise MSCPError(f"the state dict has no adapter {adapter_name!r} (it has: {', '.join(sorted(live))})")

    def mine(key: str) -> bool:
        m = _LIVE_LORA.search(key) or _LIVE_SAVED.search(key)
        return m is not None and m["name"] == adapter_name

    return {k: v for k, v in tensors.items() if mine(k)}


def set_lora_b(model, adapter_name: str, adapter: Adapter, tensors: dict[str, torch.Tensor], keys) -> None:
    """Copy the new lora_B of `keys` into the PeftModel's adapter, in place (device and dtype kept)."""
    by_b = adapter.by_b_key()
    with torch.no_grad():
        for key in keys:
            layer = model.get_submodule(PEFT_PREFIX + by_b[key].module)
            layer.lora_B[adapter_name].weight.copy_(tensors[key])


def fresh(out: dict[str, torch.Tensor], inputs) -> dict[str, torch.Tensor]:
    """`out` with every tensor that shares memory with one of `inputs` replaced by a copy."""
    owned = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    return {k: (v.detach().clone() if v.numel() and v.untyped_storage().data_ptr() in owned else v)
            for k, v in out.items()}
