"""What a continual state holds, summarised: per-dimension mask sizes and edit fractions, the
clustered Jaccard overlap between dimensions, where the rows sit; its figures and text table."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mscp.continual.record import State


def analytics(state: State) -> dict:
    """Per-dimension sizes and edit fractions, the Jaccard overlap (clustered), where rows sit."""
    from mscp.continual.figures import cluster_order

    dims = state.dimensions
    names = [d.name for d in dims]
    sets = [{(k, r) for k, rows in d.rows.items() for r in rows} for d in dims]
    n = len(dims)
    inter = [[len(a & b) for b in sets] for a in sets]
    jaccard = [[(len(a & b) / len(a | b)) if (a | b) else 1.0 for b in sets] for a in sets]
    order, merges = cluster_order(jaccard)
    modules = state.modules
    layers = state.safety_layers
    per_layer = {name: [sum(1 for k, _ in s if modules[k].layer == l) for l in layers] for name, s in zip(names, sets)}
    types = sorted({m.name.rsplit(".", 1)[-1] for m in modules.values() if m.safety_layer})
    per_type = {name: {t: sum(1 for k, _ in s if modules[k].name.rsplit(".", 1)[-1] == t) for t in types}
                for name, s in zip(names, sets)}
    count: dict = {}
    for s in sets:
        for x in s:
            count[x] = count.get(x, 0) + 1
    core = {x for x, c in count.items() if c == n} if n >= 2 else set()
    specific = {name: {x for x in s if count[x] == 1} for name, s in zip(names, sets)} if n >= 2 else {}
    by_layer_kind = {"core (all dimensions)": [sum(1 for k, _ in core if modules[k].layer == l) for l in layers],
                     "shared (2+, not all)": [sum(1 for (k, _), c in count.items() if 1 < c < n and modules[k].layer == l)
                                              for l in layers],
                     "specific (one dimension)": [sum(1 for (k, _), c in count.items() if c == 1 and n >= 2
                                                      and modules[k].layer == l) for l in layers]}
    if n < 2:
        by_layer_kind = {"rows": [sum(1 for k, _ in count if modules[k].layer == l) for l in layers]}
    union_rows = sum(len(r) for r in state.union.values())
    return {
        "n_layers": state.n_layers,
        "safety_layers": layers,
        "lora_parameters": state.lora_parameters,
        "union_rows": union_rows,
        "edit_fraction": edit_fraction(state, state.union),
        "edited_parameters": edited_parameters(state, state.union),
        "config": {k: state.config[k] for k in ("q", "p", "alpha", "projector", "rho", "criterion", "layers")},
        "dimensions": [{k: getattr(d, k) for k in ("name", "step", "prompts", "prompts_sha256", "harmful_sha256", "q", "p",
                                          "mask_rows", "mask_edit_fraction", "new_rows", "new_parameters",
                                          "incremental_edit_fraction", "cumulative_edit_fraction")}
                       for d in dims],
        "overlap": {"names": names, "jaccard": jaccard, "intersection": inter, "cluster_order": [names[i] for i in order],
                    "merges": [{"a": a, "b": b, "distance": dist, "size": size} for a, b, dist, size in merges],
                    "clustering": "average linkage on 1 - Jaccard over (module, row) pairs"},
        "layers": {"layers": layers, "rows_by_dimension": per_layer, "rows_by_kind": by_layer_kind,
                   "core_rows": len(core), "specific_rows": {k: len(v) for k, v in specific.items()},
                   "multiplicity": _histogram(count.values(), n)},
        "module_types": per_type,
        "history": [{k: h.get(k) for k in ("step", "op", "name", "time", "mask_rows", "new_rows", "new_parameters",
                                           "incremental_edit_fraction", "cumulative_edit_fraction", "repeat_of")
                     if h.get(k) is not None} | {"seconds": h.get("timings_s", {}).get("total")}
                    for h in state.history],
    }


def write_figures(state: State, folder: Path) -> list[Path]:
    """PNGs of the state: layer curves, per-dimension sizes, clustered overlap, layer distribution."""
    from mscp.continual import figures as fg

    if not fg.plots_available():
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = analytics(state)
    curves = state.layer_curves
    layers = state.safety_layers
    out = [fg.line_curves(folder / "curves.png", [c["layer"] for c in curves],
                          {"sigma": [c["sigma"] for c in curves], "d li_gap": [c["d_li_gap"] for c in curves]},
                          title="Layer criteria (level 1)", xlabel="decoder layer", ylabel="value",
                          shade=(layers[0], layers[-1]), shade_label="safety layers")]
    dims = a["dimensions"]
    if not dims:
        return out
    names = [d["name"] for d in dims]
    out.append(fg.bar_panels(folder / "dimensions.png", names, [
        {"series": {"mask rows": [d["mask_rows"] for d in dims], "new rows": [d["new_rows"] for d in dims]},
         "ylabel": "rows"},
        {"series": {"incremental edit %": [100 * d["incremental_edit_fraction"] for d in dims]},
         "line": {"cumulative edit %": [100 * d["cumulative_edit_fraction"] for d in dims]}, "ylabel": "% of LoRA parameters"},
    ], title="Dimensions in the order added"))
    ov = a["overlap"]
    idx = [ov["names"].index(x) for x in ov["cluster_order"]]
    out.append(fg.heatmap(folder / "overlap.png", [[ov["jaccard"][i][j] for j in idx] for i in idx], ov["cluster_order"],
                          title="Jaccard overlap of dimension masks (clustered)", cbar_label="Jaccard", vmin=0, vmax=1))
    lay = a["layers"]
    out.append(fg.heatmap(folder / "layers.png", [lay["rows_by_dimension"][x] for x in ov["cluster_order"]],
                          ov["cluster_order"], [str(l) for l in layers], title="Mask rows per safety layer",
                          cbar_label="rows", fmt="{:.0f}", xlabel="decoder layer"))
    out.append(fg.stacked_bars(folder / "layers_core_specific.png", [str(l) for l in layers], lay["rows_by_kind"],
                               title="Union rows by how many dimensions share them", xlabel="decoder layer",
                               ylabel="rows"))
    return out


def format_status(s: dict) -> str:
    lines = [f"{s['state']}: {len(s['dimensions'])} dimension(s); safety layers {s['safety_layers'][0]}-"
             f"{s['safety_layers'][-1]} of {s['n_layers']}; union {s['union_rows']} rows; edit fraction "
             f"{100 * s['edit_fraction']:.3f} % ({s['edited_parameters']} of {s['lora_parameters']} LoRA parameters)"]
    if s["dimensions"]:
        width = max(9, *(len(d["name"]) for d in s["dimensions"]))
        lines.append(f"{'step':>4}  {'dimension':<{width}}  {'prompts':>7}  {'mask rows':>9}  {'new rows':>8}  "
                     f"{'+edit %':>8}  {'total %':>8}")
        for d in s["dimensions"]:
            lines.append(f"{d['step']:>4}  {d['name']:<{width}}  {d['prompts']:>7}  {d['mask_rows']:>9}  {d['new_rows']:>8}  "
                         f"{100 * d['incremental_edit_fraction']:>8.3f}  {100 * d['cumulative_edit_fraction']:>8.3f}")
        repeats = [h for h in s["history"] if h.get("repeat_of")]
        if repeats:
            lines.append(f"repeated adds (0 new rows): {', '.join(h['name'] + ' @ step ' + str(h['step']) for h in repeats)}")
        ov = s["overlap"]
        order = ov["cluster_order"]
        w = max(6, *(len(x) for x in order))
        lines.append("Jaccard overlap (clustered order):")
        lines.append(" " * (w + 2) + "".join(f"{x[:w]:>{w + 1}}" for x in order))
        for x in order:
            i = ov["names"].index(x)
            lines.append(f"{x:<{w + 2}}" + "".join(f"{ov['jaccard'][i][ov['names'].index(y)]:>{w + 1}.2f}" for y in order))
        lay = s["layers"]
        lines.append("union rows per safety layer: " + ", ".join(
            f"{l}: " + "/".join(str(v[i]) for v in lay["rows_by_kind"].values()) for i, l in enumerate(lay["layers"]))
            + f"  ({' / '.join(lay['rows_by_kind'])})")
    if s.get("figures"):
        lines.append("figures: " + ", ".join(Path(f).name for f in s["figures"]))
    return "\n".join(lines)


def edited_parameters(state: State, rows: dict[str, list[int]]) -> int:
    return sum(len(r) * state.modules[k].rank for k, r in rows.items() if not state.modules[k].skipped)


def edit_fraction(state: State, rows: dict[str, list[int]]) -> float:
    return edited_parameters(state, rows) / state.lora_parameters if state.lora_parameters else 0.0


def _histogram(values, n: int) -> dict[str, int]:
    out = {str(k): 0 for k in range(1, n + 1)}
    for v in values:
        out[str(v)] += 1
    return out
