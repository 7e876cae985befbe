"""`patch()` and `patch_many()`: the whole MSCP pipeline, streamed one decoder layer at a time.

    1. capture: embed the calibration prompts in the base and aligned models
    2. one pass over the layers (the next layer is read ahead in a thread), advancing the streams:
         base     (harmful + benign prompts)  -> curves
         aligned  (harmful + benign prompts)  -> curves, n^H on harmful tokens
         finetuned = aligned + LoRA (task prompts), one stream per adapter -> n^T
       and scoring each LoRA module's rows as soon as its layer is loaded. With several adapters
       the fine-tuned streams run instead in a second pass, after the window is known and only
       up to its last layer (config.finetuned_pass)
    3. safety layers from the curves; safety rows S = top_q(I^H) \\ top_p(I^T) in those layers
    4. the masked low-rank projection of lora_B (`project.project_adapters`: each weight read once)
    5. OUT/ written atomically: adapter_config.json, adapter_model.safetensors, mscp_report.json

The stages are the methods of `core.patcher.Patcher`; this module checks the arguments, runs them
and writes the outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mscp.core.adapter import Adapter
from mscp.core.config import PatchConfig, PathArg, PromptFiles, PromptLists, check_arguments, with_overrides
from mscp.core.patcher import Patcher, PatchResult, as_paths
from mscp.core.report import check_cache_dir, check_out_dir, write_adapter_atomically
from mscp.core.streaming import InMemoryModel
from mscp.errors import MSCPError

__all__ = ["PatchResult", "patch", "patch_many"]


def patch(base: PathArg | InMemoryModel, aligned: PathArg | InMemoryModel, adapter: PathArg | Adapter,
          out: PathArg | None = None, *, harmful: PromptFiles | None = None, benign: PromptFiles | None = None,
          task: PromptFiles | None = None, prompts: PromptLists | None = None, tokenizer: PathArg | None = None,
          config: PatchConfig | None = None, overwrite: bool = False, revision: str | None = None,
          cache: PathArg | None = None, **overrides: Any) -> PatchResult:
    """Repair a LoRA adapter with MSCP.

    base, aligned: model folders (safetensors, sharded or single) or hub ids; adapter: a peft LoRA
    folder or hub id ('org/name', 'org/name@rev'; `revision` pins an adapter id given without one).
    harmful (one or more files), benign, task: prompt files (.txt/.jsonl/.csv); the built-in sets
    are used when harmful/benign are absent, and benign stands in for task. `prompts` may give
    the sets as lists instead ({"harmful": [...], ...}). tokenizer: a folder (default: aligned).
    config: a PatchConfig; keyword overrides (q=..., layers=(10, 15), ...) replace its fields.
    out: where to write the patched adapter; None keeps it in memory only.
    cache: a folder that keeps what depends on base, aligned and the prompts alone (the layer
    curves, the aligned model's answers to the harmful prompts) for the next patch (core/cache.py).
    """
    check_arguments(adapter=(adapter, "path", Adapter), out=(out, "path?"))
    return patch_many(base, aligned, [adapter], None if out is None else [out], harmful=harmful, benign=benign,
                      task=task, prompts=prompts, tokenizer=tokenizer, config=config, overwrite=overwrite,
                      revision=revision, cache=cache, **overrides)[0]


def patch_many(base: PathArg | InMemoryModel, aligned: PathArg | InMemoryModel, adapters: Sequence[PathArg | Adapter],
               outs: Sequence[PathArg] | None = None, *, harmful: PromptFiles | None = None,
               benign: PromptFiles | None = None, task: PromptFiles | None = None, prompts: PromptLists | None = None,
               tokenizer: PathArg | None = None, config: PatchConfig | None = None, overwrite: bool = False,
               revision: str | None = None, report_extra: Sequence[dict[str, Any]] | None = None,
               parents: bool = False, cache: PathArg | None = None, **overrides: Any) -> list[PatchResult]:
    """`patch` for several adapters of the same aligned model, reading base and aligned once.

    The base and aligned streams, the curves and the harmful scores are shared; each adapter gets
    its own fine-tuned stream, task scores, masks and output. Each result equals patching that
    adapter alone. report_extra: per adapter, more keys for its report (the batch runner's). parents:
    create the outputs' missing parent folders (only when writing them). cache: as in `patch`.
    """
    check_arguments(base=(base, "path", InMemoryModel), aligned=(aligned, "path", InMemoryModel),
                    adapters=(adapters, "[path]", Adapter), outs=(outs, "[path]?"), harmful=(harmful, "files?"),
                    benign=(benign, "files?"), task=(task, "files?"), prompts=(prompts, "prompts?"),
                    tokenizer=(tokenizer, "path?"), config=(config, "config?"), overwrite=(overwrite, "bool"),
                    revision=(revision, "str?"), parents=(parents, "bool"), cache=(cache, "path?"))
    config = with_overrides(config or PatchConfig(), overrides)
    if not adapters:
        raise MSCPError("no adapter given")
    if outs is not None and len(outs) != len(adapters):
        raise MSCPError("one output folder per adapter is needed")
    inputs = [*as_paths([x for x in (base, aligned, *adapters, tokenizer) if isinstance(x, (str, Path))]),
              *as_paths(harmful), *as_paths(benign), *as_paths(task)]
    inputs = [p for p in inputs if p.exists()]
    if outs is not None:
        if len({Path(o).resolve() for o in outs}) != len(outs):
            raise MSCPError("two adapters would be written to the same output folder")
        for out in outs:
            check_out_dir(out, overwrite, inputs, parents=parents)
    if cache is not None:
        check_cache_dir(cache, inputs, outs or [])

    patcher = Patcher.open(base, aligned, adapters, harmful=harmful, benign=benign, task=task, prompts=prompts,
                           tokenizer=tokenizer, config=config, revision=revision, cache=cache)
    patcher.localize()
    patcher.score(patcher.runs)
    masks = [patcher.select(run) for run in patcher.runs]
    projected = patcher.project(patcher.runs, masks)
    results = []
    for k, (run, done) in enumerate(zip(patcher.runs, projected)):
        result = patcher.result(run, done, report_extra[k] if report_extra else None)
        if outs is not None:
            write_adapter_atomically(Path(outs[k]), result.adapter_config, result.tensors, result.report, overwrite,
                                     result.model_card, parents=parents)
        results.append(result)
    return results
