"""Can adapters share the attribution pass's gradients? (issue 22, item 3)

    python experiments/shared_gradients.py --finetunes benign harmful-32 --json shared.json
    python experiments/shared_gradients.py --finetunes benign harmful-32 --ways own mean \
        --mean-of benign identity harmful-32 harmful-128 mixed arithmetic --json mean.json

The attribution score of row i is s sum_tokens grad(y)_i (E_i A x): each adapter's own forward and
backward pass gives grad(y) and x. Shared, they would come from one pass of the aligned model
alone, and each adapter would add only its own A x and edits E: K adapters for about the cost of
one. This measures whether the repair survives that, on the organism: for each fine-tune, the
same number of rows (the package default's count for it, from its report) is selected both ways
with the fixed budget (q = rows / candidate rows, benign penalty as the default), patched on the
localisation prompts and judged on them (keyword judge). "own" is today's score; "shared" runs the
pass with the adapter's lora_B set to zero (the aligned model) and keeps its true edits; "mean"
runs it at the mean of the --mean-of adapters (their LoRAs side by side, each B divided by K: the
mean update s/K sum B_k A_k), each adapter's own edit in its own block (so the edit's effect,
s E_j A_j x, is its own), the pass K adapters of one pair could share.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import mscp.core.patcher as patcher
from mscp import PatchConfig, patch
from mscp.core.adapter import Adapter
from mscp.core.patcher import modules_by_layer
from mscp.harness.evaluate import evaluate
from mscp.harness.organism import OrganismConfig, build, task_of

REAL = patcher.attribution_scores_sets


def aligned_gradients(model, head, sets, loras, edits, scored, **kw):
    """attribution_scores_sets with every LoRA's B zeroed for the pass (the aligned model's
    gradients and activations), each adapter's edits kept."""
    zeroed = [None if lora is None else (Adapter(lora[0].config, {k: torch.zeros_like(t) if "lora_B" in k
                                                                  else t for k, t in lora[0].tensors.items()}),
                                         lora[1]) for lora in loras]
    return REAL(model, head, sets, zeroed, edits, scored, **kw)


MEAN: dict = {"adapters": [], "current": None}  # the --mean-of adapters; the index of the one being patched


def mean_gradients(model, head, sets, loras, edits, scored, **kw):
    """attribution_scores_sets at the mean of MEAN's adapters (rank K r, alpha K alpha: the same
    scale), each adapter's edit placed in its own block of the mean's lora_B columns."""
    adapters, j = MEAN["adapters"], MEAN["current"]
    k = len(adapters)
    config = dict(adapters[0].config, r=k * adapters[0].config["r"], lora_alpha=k * adapters[0].config["lora_alpha"])
    tensors = {key: torch.cat([a.tensors[key] / k for a in adapters], dim=1) if "lora_B" in key
               else torch.cat([a.tensors[key] for a in adapters], dim=0) for key in adapters[0].tensors}
    mean = Adapter(config, tensors)
    mean_lora = (mean, modules_by_layer(mean, model))
    padded = []
    for lora, e in zip(loras, edits):
        if lora is None:
            padded.append(e)
            continue
        blocks = {}
        for key, edit in e.items():
            r = edit.shape[1]
            wide = torch.zeros(edit.shape[0], k * r, dtype=edit.dtype)
            wide[:, j * r:(j + 1) * r] = edit
            blocks[key] = wide
        padded.append(blocks)
    return REAL(model, head, sets, [None if lora is None else mean_lora for lora in loras], padded, scored, **kw)


WAYS = {"own": REAL, "shared": aligned_gradients, "mean": mean_gradients}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetunes", nargs="+", default=["benign", "harmful-32"])
    ap.add_argument("--ways", nargs="+", default=["own", "shared"], choices=list(WAYS))
    ap.add_argument("--mean-of", nargs="+", default=["benign", "identity", "harmful-32", "harmful-128", "mixed",
                                                     "arithmetic"], help="the adapters whose mean the 'mean' way uses")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    org = build(None, OrganismConfig(), finetunes=tuple(dict.fromkeys(a.finetunes + a.mean_of)), progress=False)
    MEAN["adapters"] = [Adapter.load(org.finetuned(name)) for name in a.mean_of]
    sp = org.splits
    files = dict(harmful=sp / "harmful_localize.txt", benign=sp / "benign_localize.txt", task=sp / "task_localize.txt")
    judged = dict(files)  # and each fine-tune's own task, with the answers: task accuracy
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.finetunes:
            default = patch(org.base, org.aligned, org.finetuned(name), harmful=[files["harmful"]],
                            benign=files["benign"], task=files["task"], config=PatchConfig(hash_inputs=False),
                            cache=org.patch_cache)
            budget = default.report["score_details"]["budget"]
            q = budget["rows"] / budget["candidate_rows"]
            fixed = PatchConfig(hash_inputs=False, budget="fixed", q=q)
            row = {"rows": budget["rows"], "q": q}
            selected = {}
            MEAN["current"] = a.mean_of.index(name) if name in a.mean_of else None
            for way in a.ways:
                if way == "mean" and MEAN["current"] is None:
                    raise SystemExit(f"{name} is not among --mean-of")
                patcher.attribution_scores_sets = WAYS[way]
                try:
                    res = patch(org.base, org.aligned, org.finetuned(name), harmful=[files["harmful"]],
                                benign=files["benign"], task=files["task"], config=fixed)
                finally:
                    patcher.attribution_scores_sets = REAL
                folder = Path(tmp) / f"{name}-{way}"
                res.save(folder)
                selected[way] = {(k, r) for k, m in res.report["modules"].items() for r in m["rows"]}
                figures = evaluate(org.aligned, folder, **{**judged, "task": org.task_file("localize", task_of(name))},
                                   judge="keyword", max_new_tokens=org.config.eval_tokens,
                                   batch_size=org.config.gen_batch, progress=False, keep_responses=False,
                                   cache=org.responses)
                row[way] = {"edited_rows": len(selected[way]), "edit_fraction": res.report["edit_fraction"],
                            **{k: figures[k] for k in ("keyword_asr", "over_refusal", "task_accuracy")}}
            first, *others = a.ways
            for other in others:  # rows in common with the first way's selection
                both = selected[first] & selected[other]
                row[f"overlap_{first}_{other}"] = len(both) / max(1, len(selected[first] | selected[other]))
            out[name] = row
            print(name, json.dumps(row), flush=True)
            a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
