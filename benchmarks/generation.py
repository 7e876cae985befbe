"""The evaluation's generator against transformers' own `generate`, on the organism's evaluation prompts.

    python benchmarks/generation.py [--adapter benign] [--batch-size 64] [--json OUT]

Both decode greedily, 20 new tokens, fp32, in this process one after the other, the same model
object: `mscp.harness.generate.Generator` (shared prefix once, length batches, answered rows
dropped) and `model.generate` on length-sorted, left-padded batches of the whole prompts (what the
generator did before). Prints both times, their ratio and how many answers are identical. Needs the
organism (`mscp organism build`).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def transformers_generate(gen, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    from mscp.core.prompts import chat_ids

    seqs = [chat_ids(gen.tok, p, True)[-gen.max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [""] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), gen.pad_id)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
            mask[row, width - len(seqs[i]):] = 1
        with torch.no_grad():
            tokens = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=gen.pad_id, eos_token_id=gen.tok.eos_token_id)
        for row, i in enumerate(idx):
            out[i] = gen.tok.decode(tokens[row, width:], skip_special_tokens=True).strip()
    return out


def main() -> None:
    from mscp.harness.evaluate import prompt_sets
    from mscp.harness.generate import Generator
    from mscp.harness.organism import build

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=None, help="a fine-tune of the organism (default: the aligned model alone)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    org = build(None, finetunes=(args.adapter,) if args.adapter else (), progress=False)
    sp = org.splits
    hp, bp, items = prompt_sets(sp / "harmful_eval.txt", sp / "benign_eval.txt", sp / "task_eval.jsonl")
    prompts = hp + bp + [p for p, _ in items]
    gen = Generator(org.aligned, org.finetuned(args.adapter) if args.adapter else None, dtype="float32")
    clock = time.perf_counter()
    ours = gen.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    ours_s = time.perf_counter() - clock
    clock = time.perf_counter()
    theirs = transformers_generate(gen, prompts, args.max_new_tokens, args.batch_size)
    theirs_s = time.perf_counter() - clock
    same = sum(a == b for a, b in zip(ours, theirs))
    result = {"model": "aligned" + (f" + {args.adapter}" if args.adapter else ""), "prompts": len(prompts),
              "generator_s": ours_s, "transformers_generate_s": theirs_s, "speedup": theirs_s / ours_s,
              "identical_answers": same, "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    print(f"{result['model']}: Generator {ours_s:.1f} s, transformers generate {theirs_s:.1f} s "
          f"({result['speedup']:.2f}x); identical answers {same} of {len(prompts)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
