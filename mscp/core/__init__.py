"""The patcher: everything `mscp patch` needs, and nothing of the evaluation harness.

    config     PatchConfig: every choice of the method, documented and validated
    checkpoint safetensors read a tensor (or some rows) at a time; strict header checks
    adapter    peft LoRA folders: lora_A/lora_B paired by name, scales
    prompts    prompt files, the chat-template encoder, micro-batches
    streaming  the model's own transformers classes, one decoder layer in memory at a time
    sequential the one loop over layers, with read-ahead, timing and progress, driving observers
    localize   level 1: layer curves and the safety window
    scoring    level 2: per-row scores (Wanda and the others) and the row selection
    project    the masked low-rank projection (fast_project)
    patcher    Patcher: what a patch opens once, and its stages (localize, score, select, project, result)
    pipeline   patch() / patch_many(): the arguments checked, the stages run, the outputs written
    cache      what depends on base, aligned and the prompts alone, kept between patches (cache=DIR)
    report     the report, checksums, versions, OUT checked against the inputs, atomic output folders
    atomic     the one atomic folder writer: temporary siblings, swaps, stale ones removed, signals held
    textfiles  strict UTF-8 and JSON reading of prompt files, configs, shard indexes and state.json
"""
