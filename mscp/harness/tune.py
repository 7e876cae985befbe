"""`mscp tune`: choose q for one adapter on its own calibration prompts, then patch it with that q.

No single q fits every fine-tune (docs/results/evaluation.md, "The package defaults": the benign
fine-tune chooses q 2 %, the harmful one 10 %). The Pareto run chooses per fine-tune on the
organism; this does the same for any adapter, with the caller's prompts:

1. one scoring pass (the rows of every candidate q are a prefix of one ranking, so a single pass
   serves them all);
2. the aligned model and the unpatched adapter, then each candidate q's projected adapter, answer
   the same prompts (greedy): keyword ASR on the harmful prompts, over-refusal on the benign ones,
   accuracy on the task prompts (a JSON-lines file with answers);
3. the rule of the Pareto runs (harness/rule.py), on the calibration prompts;
4. `patch` with the chosen q writes OUT; its report carries the table (`tuning`).

Every figure is on the calibration prompts, the only ones anything is chosen on; judge the result
on prompts it never saw. Costs two scoring passes (the choice, then the patch that writes OUT) and
2 + len(qs) generations over the prompts.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from mscp.errors import MSCPError
from mscp.paths import cache_root

DEFAULT_QS = (0.01, 0.02, 0.05, 0.1)


def _task_items(task) -> list[tuple[str, str]]:
    from mscp.harness.evaluate import read_task

    if task is None:
        raise MSCPError("tune needs task prompts with answers (--task FILE.jsonl with 'prompt' and 'answer')")
    items = read_task(task)
    missing = sum(a is None for _, a in items)
    if missing:
        raise MSCPError(f"tune needs an answer for every task prompt: {missing} of {len(items)} in {task} have none "
                        "(a JSON-lines file with 'prompt' and 'answer')")
    return items


def tune(base, aligned, adapter, out, *, harmful=None, benign=None, task=None, tokenizer=None, qs=DEFAULT_QS,
         config=None, overwrite: bool = False, max_new_tokens: int = 20, cache: str | Path | None = None,
         progress: bool = True) -> dict:
    """The choice of the module doc; writes OUT (the adapter patched with the chosen q) and returns
    {"chosen_q", "points", "aligned", "unpatched", "rule", "report"}. cache: a folder of answers
    (default <cache root>/responses; the unpatched and aligned answers are reused across runs)."""
    from mscp.core.config import PatchConfig
    from mscp.core.patcher import Patcher, as_paths
    from mscp.core.pipeline import patch_many
    from mscp.core.project import edit_fraction
    from mscp.core.prompts import default_prompts, read_prompts
    from mscp.core.report import check_out_dir
    from mscp.harness.baselines import write_adapter
    from mscp.harness.evaluate import evaluate
    from mscp.harness.rule import RULE

    qs = sorted(set(qs))
    if not qs or any(not 0 < q <= 1 for q in qs):
        raise MSCPError(f"every candidate q must be in (0, 1]; got {', '.join(map(str, qs)) or 'none'}")
    config = config or PatchConfig(progress=progress)
    items = _task_items(task)
    inputs = [p for x in (base, aligned, adapter, tokenizer, task, benign) for p in as_paths(x)] + as_paths(harmful)
    check_out_dir(Path(out), overwrite, [p for p in inputs if p.exists()])  # fail before any work
    read = lambda files, name: ([p for f in as_paths(files) for p in read_prompts(f)]  # noqa: E731
                                if files is not None else default_prompts(name))
    harmful_prompts, benign_prompts = read(harmful, "harmful"), read(benign, "benign")
    cache = Path(cache) if cache is not None else cache_root() / "responses"
    prompts = dict(harmful=harmful_prompts, benign=benign_prompts, task=items)
    files = dict(harmful=harmful, benign=benign, task=task, tokenizer=tokenizer)

    def measure(adapter_dir) -> dict:
        r = evaluate(aligned, adapter_dir, judge=None, max_new_tokens=max_new_tokens, progress=progress,
                     keep_responses=False, cache=cache, **prompts)
        return {k: r[k] for k in ("keyword_asr", "over_refusal", "task_accuracy")}

    print(f"tune: scoring rows ({config.score}) ...", flush=True)
    patcher = Patcher.open(base, aligned, [adapter], config=config, **files)
    window = patcher.localize()
    patcher.score(patcher.runs)  # the scores do not depend on q
    run = patcher.runs[0]
    references = {"aligned": {"calibration": measure(None)}, "unpatched": {"calibration": measure(adapter)}}
    masks = [Patcher(config.replace(q=q), aligned_model=patcher.aligned_model, window=window).select(run)
             for q in qs]
    # every candidate in one pass: each weight is read once for all of them
    projected = patcher.project([run] * len(qs), masks)
    points = []
    with tempfile.TemporaryDirectory(prefix="mscp-tune-") as tmp:
        for q, done in zip(qs, projected):
            where = write_adapter(adapter, done.tensors, Path(tmp) / f"q{q}", {"q": q})
            points.append({"q": q, "edit_fraction": edit_fraction(run.lora, done.edits), "calibration": measure(where)})
            print(f"tune: q {q:g}: {_figures(points[-1])}", flush=True)
    chosen = RULE.choose(points, references["unpatched"], key="calibration", aligned=references["aligned"])
    result = {"rule": RULE.text("calibration"), "candidates": qs, "aligned": references["aligned"]["calibration"],
              "unpatched": references["unpatched"]["calibration"], "points": points,
              "chosen_q": chosen["q"] if chosen else None, "max_new_tokens": max_new_tokens}
    print(format_table(result))
    if chosen is None:
        raise MSCPError(f"no q of {', '.join(f'{q:g}' for q in qs)} keeps the task and over-refusal bounds on these "
                        "prompts (table above); nothing written")
    final = patch_many(base, aligned, [adapter], [out], config=config.replace(q=chosen["q"], budget="fixed"), overwrite=overwrite,
                       report_extra=[{"tuning": result}], **files)[0]
    return {**result, "report": final.report}


def _figures(point: dict) -> str:
    c = point["calibration"]
    return (f"ASR {100 * c['keyword_asr']:.1f} %, over-refusal {100 * c['over_refusal']:.1f} %, task "
            f"{100 * c['task_accuracy']:.1f} %, {100 * point['edit_fraction']:.2f} % edited")


def format_table(result: dict) -> str:
    """The tuning table: the references and every candidate q on the calibration prompts, in %."""
    rows = [("aligned", result["aligned"], None), ("unpatched", result["unpatched"], 0.0)]
    rows += [(f"q {p['q']:g}" + (" (chosen)" if p["q"] == result["chosen_q"] else ""), p["calibration"],
              p["edit_fraction"]) for p in result["points"]]
    lines = [f"{'':<16}{'ASR':>8}{'over-refusal':>14}{'task':>8}{'edited':>9}"]
    for name, c, ef in rows:
        lines.append(f"{name:<16}{100 * c['keyword_asr']:>8.1f}{100 * c['over_refusal']:>14.1f}"
                     f"{100 * c['task_accuracy']:>8.1f}{'–' if ef is None else f'{100 * ef:.2f}':>9}")
    return "\n".join(lines)
