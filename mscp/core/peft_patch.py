"""The peft-native API: a `PeftModel` in, its repaired adapter back in (or out).

    from mscp import patch_peft_model
    result = patch_peft_model(peft_model, "base-model-folder-or-hub-id", harmful=["advbench.csv"])
    result.report["status"], result.report["edit_fraction"]     # lora_B of the adapter is now repaired
    result.save("repaired-adapter")   # weights, adapter_config.json, report and model card, as `mscp patch` writes

The aligned weights are the PeftModel's own base weights, read in place (no copy of the model, on
whatever device they are); only the base model is read from disk.
"""
from __future__ import annotations

from typing import Any

import torch

from mscp.core.config import PatchConfig, PathArg, PromptFiles, PromptLists, with_overrides
from mscp.core.peft_interop import (
    adapter_of_peft_model,
    aligned_of_peft_model,
    check_adapter_name,
    fresh,
    is_peft_model,
    set_lora_b,
    tokenizer_of_peft_model,
)
from mscp.core.pipeline import PatchResult, patch_many
from mscp.core.streaming import InMemoryModel
from mscp.errors import MSCPError, warn

MARK = "mscp_repaired"  # attribute of a PeftModel: adapter name -> report of its in-place repair


def patch_peft_model(model: torch.nn.Module, base: PathArg | InMemoryModel, *, adapter_name: str = "default",
                     harmful: PromptFiles | None = None, benign: PromptFiles | None = None,
                     task: PromptFiles | None = None, prompts: PromptLists | None = None,
                     tokenizer: PathArg | None = None, config: PatchConfig | None = None, inplace: bool = True,
                     **overrides: Any) -> PatchResult:
    """Repair the LoRA adapter `adapter_name` of a peft `PeftModel` with MSCP; returns a `PatchResult`.

    model: a PeftModel whose base model is the aligned model (its weights are read in place, on
    whatever device they are). base: the pre-alignment model, a folder or hub id. harmful, benign,
    task, prompts, config and keyword overrides as for `mscp.patch`. tokenizer: a folder or hub id
    (default: where the PeftModel's base model was loaded from). The compute device defaults to the
    device of the model's weights.

    inplace=True copies the repaired lora_B rows into the model; inplace=False leaves the model as it
    is. Either way `result.tensors` is the repaired adapter's state dict (peft's saved key names,
    on the CPU, sharing no memory with the model) and `result.report` the run's report, as `patch`
    writes it. The result equals `patch(base, aligned_folder, adapter_folder)` on the same weights.
    """
    if not is_peft_model(model):
        raise MSCPError(f"patch_peft_model needs a peft PeftModel, got {type(model).__name__}")
    check_adapter_name(model, adapter_name)
    earlier = repaired_adapters(model).get(adapter_name)
    if earlier is not None:
        warn(f"adapter {adapter_name!r} of this PeftModel was already repaired by mscp (status {earlier['status']}, "
             f"edit fraction {earlier['edit_fraction']:.4g}); projecting it again moves its rows further from the "
             "fine-tune")
    config = config or PatchConfig()
    if not isinstance(config, PatchConfig):
        raise MSCPError(f"config must be a PatchConfig, got {type(config).__name__}")
    if "device" not in overrides and config.device == "cpu":
        weight = next(model.parameters(), None)
        if weight is not None and weight.device.type == "cuda":
            overrides["device"] = str(weight.device)
    config = with_overrides(config, overrides)
    lora = adapter_of_peft_model(model, adapter_name)
    aligned = aligned_of_peft_model(model)
    result = patch_many(base, aligned, [lora], None, harmful=harmful, benign=benign, task=task, prompts=prompts,
                        tokenizer=tokenizer if tokenizer is not None else tokenizer_of_peft_model(model),
                        config=config)[0]
    result.report["paths"]["adapter"] = f"in memory: adapter {adapter_name!r} of the PeftModel"
    result.tensors = {k: v.to("cpu") for k, v in fresh(result.tensors, lora.tensors.values()).items()}
    if inplace:
        set_lora_b(model, adapter_name, lora, result.tensors, result.report["projected_modules"])
        repaired_adapters(model)[adapter_name] = result.report
    return result


def repaired_adapters(model) -> dict:
    """The reports of the adapters of `model` that mscp repaired in place: the record a live
    PeftModel carries (`PatchResult.save` writes it beside the weights)."""
    if not hasattr(model, MARK):
        object.__setattr__(model, MARK, {})  # a plain attribute, not a submodule or parameter
    return getattr(model, MARK)
