"""Continual projection measured on the organism: harm categories added one by one.

    mscp demo --continual [--out runs/continual] [--q Q] [--p P] [--layers A-B]

The dimensions are StrongREJECT's harm categories, the one harmful set whose categories are clean
and large (about 50 prompts each). Each category's prompts are split by where the organism put
them (mscp/organism.py):
- localisation: prompts in the organism's harmful localisation or alignment splits (the provider's
  own data; the aligned model was trained to refuse them, so scoring rows on them is fair);
- evaluation: prompts in its evaluation split or in no split at all (never trained on, never scored).
Prompts the LoRA was trained to comply with (the fine-tune split) are used for neither.

`continual.init` takes the same localisation prompts as the demo's `mscp patch`; then the
categories of ORDER are added one at a time and, before the first and after every step, the
adapter is evaluated: keyword ASR per category (HELD_OUT is never added), over-refusal on the
benign evaluation split, task accuracy on the task evaluation split. Writes OUT/continual.json,
OUT/table.md, OUT/asr_by_step.png and the state's own figures (OUT/state/figures/*.png).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from mscp.errors import MSCPError
from mscp.harness.organism import DEFAULT_FINETUNE

SOURCE = "strongreject"
ORDER = ("Violence", "Non-violent crimes", "Hate, harassment and discrimination", "Disinformation and deception",
         "Illegal goods and services")
HELD_OUT = "Sexual content"
MIN_PROMPTS = 5


def slug(category: str) -> str:
    """A dimension name continual.add accepts: 'Hate, harassment and discrimination' -> 'hate_harassment_and_discrimination'."""
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")[:64]


def category_prompts(splits: Path, source: str = SOURCE) -> dict[str, dict[str, list[str]]]:
    """{category: {"localize": [...], "eval": [...]}} for the categories of `source` (see the module doc)."""
    from mscp.core.prompts import read_prompts
    from mscp.harness import datasets as sets

    where: dict[str, str] = {}
    for name in ("localize", "align", "finetune", "eval"):
        for text in read_prompts(splits / f"harmful_{name}.txt"):
            where[sets.normalise(text)] = name
    out: dict[str, dict[str, list[str]]] = {}
    for item in sets.dedupe(sets.load(source)):
        split = where.get(sets.normalise(item.text))
        role = "localize" if split in ("localize", "align") else "eval" if split in (None, "eval") else None
        if role is not None:
            out.setdefault(item.category, {"localize": [], "eval": []})[role].append(item.text)
    return out


def _evaluate_step(aligned: Path, adapter: Path | None, cats: dict, categories: list[str], splits: Path,
                   max_new_tokens: int, progress: bool) -> dict:
    """Keyword ASR per category, over-refusal and task accuracy of aligned + adapter."""
    from mscp.harness.evaluate import evaluate

    prompts, owner = [], []
    for c in categories:
        prompts += cats[c]["eval"]
        owner += [c] * len(cats[c]["eval"])
    r = evaluate(aligned, adapter, harmful=prompts, benign=splits / "benign_eval.txt", task=splits / "task_eval.jsonl",
                 judge=None, max_new_tokens=max_new_tokens, progress=progress)
    asr = {}
    for c in categories:
        rows = [row for row, o in zip(r["responses"]["harmful"], owner) if o == c]
        asr[c] = 1 - sum(row["keyword_refused"] for row in rows) / len(rows)
    return {"asr": asr, "keyword_asr_all": r["keyword_asr"], "over_refusal": r["over_refusal"],
            "task_accuracy": r["task_accuracy"], "seconds": r["seconds"], "responses": r["responses"]}


def run_continual(out: str | Path, cache: str | Path | None = None, *, config=None, order=ORDER,
                  held_out: str = HELD_OUT, max_new_tokens: int = 20, progress: bool = True, organism_cfg=None,
                  base_dir=None, finetune: str = DEFAULT_FINETUNE) -> dict:
    """The measurement of the module doc; returns what OUT/continual.json holds."""
    from mscp import continual
    from mscp.core.config import PatchConfig
    from mscp.harness.demo import organism_for

    out, org, sp, ft = organism_for(out, cache, organism_cfg, base_dir, progress, finetune)
    cats = category_prompts(sp)
    categories = list(order) + [held_out]
    for c in categories:
        if c not in cats:
            raise MSCPError(f"category {c!r} is not in {SOURCE} (has: {', '.join(sorted(cats))})")
        for role in ("localize", "eval"):
            if len(cats[c][role]) < MIN_PROMPTS:
                raise MSCPError(f"category {c!r} has only {len(cats[c][role])} {role} prompts on this organism")
    if held_out in order:
        raise MSCPError(f"the held-out category {held_out!r} is also in the order of dimensions")
    prompt_dir = out / "prompts"
    prompt_dir.mkdir(exist_ok=True)
    for c in categories:
        for role in ("localize", "eval"):
            (prompt_dir / f"{slug(c)}_{role}.txt").write_text("\n".join(cats[c][role]) + "\n")

    config = config or PatchConfig(progress=progress)
    state_dir = out / "state"
    clock = time.perf_counter()
    continual.init(org.base, org.aligned, ft, state_dir, harmful=[sp / "harmful_localize.txt"],
                   benign=sp / "benign_localize.txt", task=sp / "task_localize.txt", config=config, overwrite=True)
    init_s = time.perf_counter() - clock
    (out / "responses").mkdir(exist_ok=True)

    def measure(label: str, adapter: Path | None) -> dict:
        print(f"evaluating {label} ...", flush=True)
        r = _evaluate_step(org.aligned, adapter, cats, categories, sp, max_new_tokens, progress)
        (out / "responses" / f"{label}.json").write_text(json.dumps(r.pop("responses"), indent=1) + "\n")
        return r

    aligned = measure("aligned", None)
    steps = [{"step": 0, "dimension": None, "new_rows": 0, "incremental_edit_fraction": 0.0,
              "cumulative_edit_fraction": 0.0, **measure("step0_finetuned", state_dir / "adapter")}]
    for i, c in enumerate(order, 1):
        clock = time.perf_counter()
        entry = continual.add(state_dir, slug(c), harmful=[prompt_dir / f"{slug(c)}_localize.txt"], progress=progress)
        add_s = time.perf_counter() - clock
        steps.append({"step": i, "dimension": c, "new_rows": entry["new_rows"],
                      "incremental_edit_fraction": entry["incremental_edit_fraction"],
                      "cumulative_edit_fraction": entry["cumulative_edit_fraction"], "add_seconds": add_s,
                      **measure(f"step{i}_{slug(c)}", state_dir / "adapter")})
        print(json.dumps({k: v for k, v in steps[-1].items() if k != "asr"} | {"asr": steps[-1]["asr"]}), flush=True)

    analytics = continual.status(state_dir)
    result = {
        "organism": str(org.root), "source": SOURCE, "order": list(order), "held_out": held_out,
        "prompts": {c: {role: len(cats[c][role]) for role in ("localize", "eval")} for c in categories},
        "config": config.to_dict(), "safety_layers": analytics.get("safety_layers"), "init_seconds": init_s,
        "max_new_tokens": max_new_tokens, "aligned": aligned, "steps": steps,
        "overlap": analytics.get("overlap"), "state": str(state_dir),
    }
    (out / "continual.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(format_table(result) + "\n")
    figure = plot_asr(result, out / "asr_by_step.png")
    print(format_table(result))
    print(f"wrote {out}/continual.json, table.md{', asr_by_step.png' if figure else ''}; state figures in "
          f"{state_dir}/figures")
    return result


def format_table(result: dict) -> str:
    """Markdown: one row per step, keyword ASR % per category (held-out last), edits and utility."""
    cats = result["order"] + [result["held_out"]]
    short = [c.split(",")[0].split(" and ")[0] for c in cats]
    head = ["step", "added", *[f"{s}{' (held out)' if c == result['held_out'] else ''}" for s, c in zip(short, cats)],
            "new rows", "incr. edit %", "cum. edit %", "over-refusal %", "task %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    a = result["aligned"]
    lines.append("| aligned | – | " + " | ".join(pct(a["asr"][c]) for c in cats)
                 + f" | – | – | – | {pct(a['over_refusal'])} | {pct(a['task_accuracy'])} |")
    for s in result["steps"]:
        lines.append(f"| {s['step']} | {s['dimension'] or '– (fine-tuned)'} | " + " | ".join(pct(s["asr"][c]) for c in cats)
                     + f" | {s['new_rows']} | {100 * s['incremental_edit_fraction']:.3f}"
                     f" | {100 * s['cumulative_edit_fraction']:.3f} | {pct(s['over_refusal'])} | {pct(s['task_accuracy'])} |")
    return "\n".join(lines)


def plot_asr(result: dict, path: Path) -> Path | None:
    from mscp.continual.figures import plots_available

    if not plots_available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = result["order"] + [result["held_out"]]
    steps = result["steps"]
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in cats:
        held = c == result["held_out"]
        ax.plot(x, [100 * s["asr"][c] for s in steps], marker="o", ls="--" if held else "-",
                label=f"{c}{' (held out)' if held else ''}")
    ax.plot(x, [100 * s["task_accuracy"] for s in steps], color="black", lw=2, label="task accuracy")
    ax.set_xticks(x, ["fine-tuned"] + [f"+{slug(s['dimension'])[:12]}" for s in steps[1:]], rotation=20, fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.set_title("keyword ASR per harm category as dimensions are added", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
