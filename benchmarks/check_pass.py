"""One check pass of the adaptive budget (attribution.target_logliks: the harmful and benign
prompts, each with a refusal opening, under `--probes` patched LoRAs), with the prompts' shared
opening run once per LoRA (the default) against whole prompts, alternated, in one run. Also the
tokens each way puts through a layer, a count that carries over to any machine.

    python benchmarks/check_pass.py ~/.cache/mscp/organism/<hash> --adapter finetunes/benign --json check.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mscp.core.attribution as attribution
from mscp.core.adapter import Adapter
from mscp.core.patcher import modules_by_layer
from mscp.core.prompts import encode, load_tokenizer, make_target_batches, read_prompts
from mscp.core.shared_prefix import shared_length
from mscp.core.streaming import ModelShell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("organism", type=Path, help="an organism folder (aligned/, finetunes/, splits/)")
    ap.add_argument("--adapter", default="finetunes/benign")
    ap.add_argument("--probes", type=int, default=3, help="patched LoRAs in the pass (budget_probes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per micro-batch (PatchConfig.batch_size)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tok = load_tokenizer(a.organism / "aligned")
    prompts = [p for name in ("harmful_localize", "benign_localize")
               for p in encode(tok, read_prompts(a.organism / "splits" / f"{name}.txt"), max_length=256)]
    opening = tok("I'm sorry, but", add_special_tokens=False).input_ids[:4]
    targets = [opening] * len(prompts)
    model = ModelShell(a.organism / "aligned", label="aligned")
    lora = Adapter.load(a.organism / a.adapter)
    by_layer = modules_by_layer(lora, model)
    loras = [(Adapter(lora.config, {k: (1 - i / a.probes) * t if "lora_B" in k else t
                                    for k, t in lora.tensors.items()}), by_layer) for i in range(a.probes)]
    head = model.head()
    shared = shared_length(prompts)
    padded = lambda cut: sum(b.input_ids.numel() for b in make_target_batches(  # noqa: E731
        [p[cut:] for p in prompts], targets, 0, a.batch_size, 0)) + cut
    real = attribution.shared_length
    seconds: dict[str, list[float]] = {"shared opening": [], "whole prompts": []}
    results = {}
    for _ in range(a.repeats):
        for way in seconds:
            attribution.shared_length = real if way == "shared opening" else (lambda _p: 0)
            t = time.perf_counter()
            results[way] = attribution.target_logliks(model, head, prompts, targets, loras, batch_size=a.batch_size,
                                                            pad_id=0)
            seconds[way].append(time.perf_counter() - t)
    attribution.shared_length = real
    gap = max(float((x.loglik - y.loglik).abs().max()) for x, y in zip(results["shared opening"], results["whole prompts"]))
    out = {"prompts": len(prompts), "probes": a.probes, "batch_size": a.batch_size, "shared_tokens": shared,
           "tokens_per_lora": {"shared opening": padded(shared), "whole prompts": padded(0)},
           "seconds": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
           "ratio_whole_over_shared": round(statistics.median(seconds["whole prompts"])
                                            / statistics.median(seconds["shared opening"]), 2),
           "max_loglik_gap": gap, "threads": torch.get_num_threads()}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
