"""Per benign localisation prompt, the probability of the refusal opening ("I'm sorry, but") under
the aligned model, a fine-tune and its patched adapter: what the adaptive budget's benign guard
averages (seed 1's harmful-32, docs/results/evaluation.md stop 24).

    python experiments/benign_guard_per_prompt.py ~/.cache/mscp/organism/232d6c797e1f \\
        finetunes/harmful-32 /path/to/patched
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks
from mscp.core.patcher import modules_by_layer
from mscp.core.prompts import encode, load_tokenizer, read_prompts
from mscp.core.streaming import ModelShell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("organism", type=Path)
    ap.add_argument("finetuned", help="the fine-tune's folder, relative to the organism or absolute")
    ap.add_argument("patched", type=Path, help="its patched adapter")
    a = ap.parse_args()
    tok = load_tokenizer(a.organism / "aligned")
    prompts = encode(tok, read_prompts(a.organism / "splits" / "benign_localize.txt"), max_length=256)
    opening = tok("I'm sorry, but", add_special_tokens=False).input_ids[:4]
    model = ModelShell(a.organism / "aligned", label="aligned")
    loras = [None]
    for folder in (a.organism / a.finetuned, a.patched):
        adapter = Adapter.load(folder)
        loras.append((adapter, modules_by_layer(adapter, model)))
    aligned, finetuned, patched = [fit.loglik.exp() for fit in target_logliks(
        model, model.head(), prompts, [opening] * len(prompts), loras, batch_size=16, pad_id=tok.pad_token_id or 0)]
    print(f"mean P: aligned {aligned.mean():.4f} finetuned {finetuned.mean():.4f} patched {patched.mean():.4f} "
          f"rise {patched.mean() - aligned.mean():.4f}")
    for threshold in (0.3, 0.5):
        print(f"prompts with P > {threshold}: aligned {(aligned > threshold).sum().item()} "
              f"patched {(patched > threshold).sum().item()}")
    order = torch.argsort(patched - aligned, descending=True)[:8]
    print("largest rises (aligned, patched):", [(round(aligned[i].item(), 3), round(patched[i].item(), 3)) for i in order])


if __name__ == "__main__":
    main()
