"""The adaptive budget on the organism's fine-tunes: the rows it chooses and the repair they give.

    python experiments/adaptive_budget.py --recover 0.5 1 2 --split localisation --json loc.json
    python experiments/adaptive_budget.py --recover 1 --split eval --finetunes benign ... mixed arithmetic --json ev.json
    python experiments/adaptive_budget.py --penalty 0 1 3 --split localisation --json penalty.json  # benign_penalty
    python experiments/adaptive_budget.py --refine on off --split localisation --json refine.json  # budget_refine
    python experiments/adaptive_budget.py --guard probability greedy both --seed 1 --json guard.json  # benign_guard
    python experiments/adaptive_budget.py --choose loc*.json --json choice.json   # the defaults' rule (several
                                                                                  # builds: each its own fine-tunes)

Every fine-tune is patched on the localisation prompts (as the demo patches), all adapters of one
setting in one `patch_many` call (each gets what it gets alone: tests/test_budget.py). `fixed` is
today's fixed budget (q 2 %) for comparison. Figures come from `evaluate` on the split asked for:
`localisation` (harmful_localize, benign_localize, the task's localize split; keyword judge) is the
only split a knob is chosen on; `eval` (the held-out splits; keyword and embedding judges) reports.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mscp.core.config import BENIGN_GUARDS, PatchConfig
from mscp.core.pipeline import patch_many
from mscp.harness.evaluate import evaluate
from mscp.harness.organism import OrganismConfig, build, pick_threads, task_of
from mscp.harness.rule import RULE

FIGURES = ("keyword_asr", "judge_refusal_rate", "over_refusal", "task_accuracy", "robust_keyword_asr",
           "robust_judge_refusal_rate")
ROBUST: Path | None = None  # the robustness split's file (eval only, with --robust)


def split_files(org, split: str, finetune: str | None) -> dict:
    sp = org.splits
    part = "localize" if split == "localisation" else "eval"
    task = task_of(finetune) if finetune else "ledger"
    return dict(harmful=sp / f"harmful_{part}.txt", benign=sp / f"benign_{part}.txt", task=org.task_file(part, task))


def measure(org, adapter, split: str, finetune: str | None, judge) -> dict:
    r = evaluate(org.aligned, adapter, **split_files(org, split, finetune), judge=judge,
                 max_new_tokens=org.config.eval_tokens, batch_size=org.config.gen_batch, progress=False,
                 keep_responses=False, cache=org.responses, robust=ROBUST if split == "eval" else None)
    return {k: r.get(k) for k in FIGURES if k in r}


def choose(files: list[Path]) -> dict:
    """pareto.choose_defaults (docs/evaluation.md section 7, the rule that chose every default) over
    the settings of localisation runs: every setting measured on every fine-tune of the files. Runs
    of several organism builds (--seed) count each build's fine-tune as one more fine-tune
    ("identity@<organism>"): a setting must keep the bounds on each."""
    from mscp.harness.pareto import choose_defaults

    data = [json.loads(Path(f).read_text()) for f in files]
    builds = len({d["organism"] for d in data})
    runs: dict[str, dict] = {}
    for f, d in zip(files, data):
        if d["split"] != "localisation":
            raise SystemExit(f"{f}: a default is chosen on the localisation split only")
        for base_name, ft in d["finetunes"].items():
            name = base_name if builds == 1 else f"{base_name}@{d['organism']}"
            r = runs.setdefault(name, {"finetune": name, "finetuned": {"localisation": ft["finetuned"]},
                                       "aligned": {"localisation": d["aligned"][base_name]}, "points": []})
            r["points"] += [{"method": "mscp:attribution", "params": {"budget": label},
                             "localisation": p["localisation"], "edit_fraction": p["edit_fraction"]}
                            for label, p in ft["points"].items()]
    return choose_defaults(list(runs.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recover", type=float, nargs="+", default=[PatchConfig.recover])
    ap.add_argument("--fixed", action="store_true", help="also today's fixed budget (q 2 %%)")
    ap.add_argument("--finetunes", nargs="+", default=["benign", "identity", "harmful-32", "harmful-128"])
    ap.add_argument("--split", choices=("localisation", "eval"), default="localisation")
    ap.add_argument("--checks", type=int, default=PatchConfig.budget_checks)
    ap.add_argument("--probes", type=int, default=PatchConfig.budget_probes)
    ap.add_argument("--penalty", type=float, nargs="+", default=[PatchConfig.benign_penalty],
                    help="benign_penalty weights to try (each with every --recover)")
    ap.add_argument("--max-edit", type=float, default=PatchConfig.max_edit)
    ap.add_argument("--refine", nargs="+", choices=("on", "off"), default=["on" if PatchConfig.budget_refine else "off"],
                    help="budget_refine settings to try (each with every --recover and --penalty)")
    ap.add_argument("--guard", nargs="+", choices=BENIGN_GUARDS, default=[PatchConfig.benign_guard],
                    help="benign_guard settings to try (each with every other setting)")
    ap.add_argument("--seed", type=int, default=0, help="the organism's training seed (its build)")
    ap.add_argument("--robust", action="store_true", help="eval: also the robustness split")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--choose", type=Path, nargs="+", help="only apply the defaults' rule to these localisation runs")
    a = ap.parse_args()
    if a.choose:
        result = choose(a.choose)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "candidates"}, indent=1))
        return
    global ROBUST
    judge = None if a.split == "localisation" else "embedding"
    org = build(None, OrganismConfig(seed=a.seed), finetunes=tuple(a.finetunes), progress=False)
    pick_threads()
    sp = org.splits
    if a.robust:
        from mscp.harness import robustness

        ROBUST = robustness.write(sp)
    out = {"split": a.split, "organism": org.config.digest(), "rule": RULE.text(a.split), "finetunes": {}}
    out["aligned"] = {n: measure(org, None, a.split, n, judge) for n in a.finetunes}
    settings = [("fixed", PatchConfig(hash_inputs=False, budget="fixed"))] if a.fixed else []
    settings += [(f"adaptive_{r:g}" + (f"_penalty{penalty:g}" if len(a.penalty) > 1 or penalty else "")
                  + (f"_maxedit{a.max_edit:g}" if a.max_edit != PatchConfig.max_edit else "")
                  + (f"_refine{refine}" if len(a.refine) > 1 or (refine == "on") != PatchConfig.budget_refine else "")
                  + (f"_guard{guard}" if len(a.guard) > 1 or guard != PatchConfig.benign_guard else ""),
                  PatchConfig(hash_inputs=False, budget="adaptive", recover=r, budget_checks=a.checks,
                              budget_probes=a.probes, benign_penalty=penalty, max_edit=a.max_edit,
                              budget_refine=refine == "on", benign_guard=guard))
                 for r in a.recover for penalty in a.penalty for refine in a.refine for guard in a.guard]
    for name in a.finetunes:
        out["finetunes"][name] = {"finetuned": measure(org, org.finetuned(name), a.split, name, judge), "points": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in settings:
            outs = [Path(tmp) / label / n for n in a.finetunes]
            t = time.time()
            results = patch_many(org.base, org.aligned, [org.finetuned(n) for n in a.finetunes], outs,
                                 harmful=[sp / "harmful_localize.txt"], benign=sp / "benign_localize.txt",
                                 task=sp / "task_localize.txt", config=config, cache=org.patch_cache, parents=True)
            seconds = time.time() - t
            for name, res, folder in zip(a.finetunes, results, outs):
                point = {"edit_fraction": res.report["edit_fraction"], "patch_seconds_for_all": seconds,
                         "weight_passes": res.report["weight_reads"]["passes"],
                         "budget": res.report.get("score_details", {}).get("budget"),
                         a.split: measure(org, folder, a.split, name, judge)}
                out["finetunes"][name]["points"][label] = point
                f = point[a.split]
                print(f"{label:14s} {name:12s} rows {point['budget']['rows'] if point['budget'] else '-':>6} "
                      f"edit {100 * point['edit_fraction']:.2f}%  asr {f['keyword_asr']:.3f}  "
                      f"over {f['over_refusal']:.3f}  task {f['task_accuracy']:.3f}", flush=True)
            a.json.write_text(json.dumps(out, indent=1) + "\n")
    a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
