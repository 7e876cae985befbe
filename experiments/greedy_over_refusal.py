"""The localisation prompts answered greedily and judged by keyword, for the aligned model and any
adapters: what the adaptive budget's benign guard (a mean probability of one refusal opening) stands
in for.

    python experiments/greedy_over_refusal.py ~/.cache/mscp/organism/232d6c797e1f \\
        finetuned=finetunes/harmful-32 patched=/path/to/patched --json out.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from mscp.harness.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("organism", type=Path, help="an organism folder (aligned/, finetunes/, splits/)")
    ap.add_argument("adapters", nargs="*", help="NAME=FOLDER (relative to the organism or absolute)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    splits = a.organism / "splits"
    out = {}
    for name, folder in [("aligned", None)] + [tuple(each.split("=", 1)) for each in a.adapters]:
        figures = evaluate(a.organism / "aligned", folder and a.organism / folder, judge="keyword",
                           harmful=splits / "harmful_localize.txt", benign=splits / "benign_localize.txt",
                           max_new_tokens=32, batch_size=32, progress=False, keep_responses=False)
        out[name] = {k: figures[k] for k in ("keyword_asr", "over_refusal")}
        print(name, out[name], flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
