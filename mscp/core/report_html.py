"""The report as a page people open: `report.html`, beside `mscp_report.json`, and the model card's
mscp section.

The page is self-contained (inline CSS and SVG, no script, no font, no link to anything), so it
opens offline and reads the same in ten years. Every figure is drawn from the JSON report alone.
"""
from __future__ import annotations

import json
import math
from html import escape

from mscp.core.adapter import layer_index

# one colour per curve / module kind, readable on white and for the common colour-blindnesses
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#8c6d1f", "#666666")
WINDOW_FILL = "#f5c26b"
STATUS_COLOURS = {"ok": "#1a7f37", "warnings": "#9a6700", "noop": "#cf222e"}
CARD_BEGIN, CARD_END = "<!-- mscp:begin -->", "<!-- mscp:end -->"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:24px auto;max-width:1180px;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 12px;overflow-wrap:anywhere}
.badge{display:inline-block;color:#fff;border-radius:12px;padding:1px 10px;font-weight:600}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:8px;margin:12px 0}
.fact{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px}
.fact b{display:block;font-size:18px}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:6px 12px}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
svg text{font:11px system-ui,sans-serif;fill:#1f2328}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:18px;height:3px;
vertical-align:middle;margin-right:4px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def render_html(report: dict) -> str:
    """The whole page for one report."""
    title = f"mscp report: {report.get('paths', {}).get('adapter', 'adapter')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        _header(report),
        _section("Layer curves and the safety window", _curves(report), "curves"),
        _section("Projected rows per layer", _rows_per_layer(report), "per-layer"),
        _section("Where the projected rows sit", _row_positions(report), "positions"),
        _section("Modules", _module_table(report), "modules-section"),
        _section("Passed through unchanged", _passed_through(report), "passed"),
        _section("Configuration", _kv_table(report.get("config", {}), "config"), "config-section"),
        _section("Inputs", _inputs(report), "inputs"),
        _section("Versions, backends and timings", _run_facts(report), "run"),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# -- building blocks ------------------------------------------------------------------------------
def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return escape(str(x))
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _text(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f'<span class="mono">{escape(json.dumps(value, sort_keys=True))}</span>'
    return escape("–" if value is None else str(value))


def _kv_table(mapping: dict, table_id: str) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{_text(v)}</td></tr>" for k, v in mapping.items())
    return f'<table id="{table_id}"><tbody>{rows}</tbody></table>'


def _header(report: dict) -> str:
    status = report.get("status", "ok")
    layers = report.get("safety_layers") or []
    window = f"{layers[0]}-{layers[-1]}" if layers else "none"
    n_layers = report.get("n_layers")
    config = report.get("config", {})
    facts = [
        ("safety layers", f"{window} of {n_layers}", f"criterion {config.get('criterion')}"
         f"{', given' if config.get('layers') else ''}"),
        ("edit fraction", f"{100 * report.get('edit_fraction', 0.0):.4g} %",
         f"{_num(report.get('edited_parameters'))} of {_num(report.get('lora_parameters'))} LoRA parameters"),
        ("projected modules", str(len(report.get("projected_modules", []))),
         f"{len(report.get('modules', {}))} in the window"),
        ("skipped modules", str(len(report.get("skipped_modules", {}))), "not edited (reason in the table)"),
        ("score / q / p", f"{config.get('score')} / {config.get('q')} / {config.get('p')}",
         f"alpha {config.get('alpha')}, projector {config.get('projector')}"),
        ("prompts", " / ".join(str(report.get("prompts", {}).get(k, "–")) for k in ("harmful", "benign", "task")),
         "harmful / benign / task"),
    ]
    budget = (report.get("score_details") or {}).get("budget")
    if budget:  # the adaptive budget: how many rows, and why
        facts.insert(4, ("budget (adaptive)", f"{_num(budget.get('rows'))} rows",
                         f"{budget.get('why')}; lost {_num(budget.get('lost_loglik'))} nats of the refusals' "
                         f"log-likelihood, goal {_num(budget.get('goal_loglik'))}; "
                         f"{len(budget.get('checks') or [])} counts checked"))
    fact_html = "".join(f'<div class="fact">{escape(name)}<b>{escape(value)}</b>'
                        f'<span class="sub">{escape(note)}</span></div>' for name, value, note in facts)
    warnings = report.get("warnings") or []
    warn_html = ('<div class="warn" id="warnings"><b>Warnings</b><ul>' +
                 "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul></div>") if warnings else \
        '<p id="warnings">No warnings.</p>'
    colour = STATUS_COLOURS.get(status, "#57606a")
    adapter = report.get("paths", {}).get("adapter", "")
    return (f"<header><h1>mscp report <span class=\"badge\" id=\"status\" data-status=\"{escape(status)}\" "
            f"style=\"background:{colour}\">{escape(status)}</span></h1>"
            f'<p class="sub">adapter <code>{escape(str(adapter))}</code> · mscp '
            f'{escape(str(report.get("mscp_version")))}</p><div class="facts">{fact_html}</div>{warn_html}</header>')


# -- figures (inline SVG) ---------------------------------------------------------------------------
def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _panel(layers: list[int], series: list[tuple[str, list], ], window: list[int], title: str, width=370,
           height=230, zero_line: bool = False) -> str:
    """One line chart: x = decoder layer, one polyline per series, the window shaded."""
    left, right, top, bottom = 60, 10, 22, 34
    values = [v for _, ys in series for v in ys if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if zero_line:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = (hi - lo) * 0.06 or 0.05
    lo, hi = lo - pad, hi + pad
    x0, x1 = (min(layers), max(layers)) if layers else (0, 1)
    sx = _scale(x0 - 0.5, x1 + 0.5, left, width - right)
    sy = _scale(lo, hi, height - bottom, top)
    out = [f'<svg class="panel" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f"<title>{escape(title)}</title>",
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="#fff" stroke="#d0d7de"/>']
    if window:
        wx0, wx1 = sx(window[0] - 0.5), sx(window[-1] + 0.5)
        out.append(f'<rect class="window" x="{wx0:.1f}" y="{top}" width="{wx1 - wx0:.1f}" '
                   f'height="{height - top - bottom}" fill="{WINDOW_FILL}" fill-opacity="0.35"/>')
    if zero_line and lo < 0 < hi:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#8c959f" '
                   'stroke-dasharray="3 3"/>')
    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    step = max(1, math.ceil(len(layers) / 12))
    for layer in layers[::step]:
        out.append(f'<text x="{sx(layer):.1f}" y="{height - bottom + 14}" text-anchor="middle">{layer}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle">decoder layer</text>')
    out.append(f'<text x="{left}" y="14">{escape(title)}</text>')
    for k, (name, ys) in enumerate(series):
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(layers, ys)
                          if y is not None and math.isfinite(y))
        colour = PALETTE[k % len(PALETTE)]
        out.append(f'<polyline class="curve" data-series="{escape(name)}" points="{points}" fill="none" '
                   f'stroke="{colour}" stroke-width="1.8"/>')
    out.append("</svg>")
    return "".join(out)


def _legend(names: list[str]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{PALETTE[k % len(PALETTE)]}"></i>{escape(n)}</span>'
        for k, n in enumerate(names)) + "</div>"


def _curves(report: dict) -> str:
    curves = report.get("layer_curves") or []
    if not curves:
        return "<p>No layer curves in this report.</p>"
    layers = [c.get("layer", k) for k, c in enumerate(curves)]
    window = report.get("safety_layers") or []
    get = lambda key: [c.get(key) for c in curves]  # noqa: E731
    panels = [
        _panel(layers, [("c_harmful", get("c_harmful")), ("c_benign", get("c_benign"))], window,
               "cos(h_base, h_aligned), last token"),
        _panel(layers, [("sigma", get("sigma"))], window, "sigma = dc_benign - dc_harmful", zero_line=True),
        _panel(layers, [("li_gap", get("li_gap"))], window, "Li et al. gap (aligned model)", zero_line=True),
    ]
    return (f'<div id="layer-curves">{"".join(panels)}</div>' + _legend(["c_harmful", "c_benign"]) +
            f'<p class="sub">Shaded: the safety window ({escape(_window_text(window))}), chosen by '
            f'{escape(str(report.get("config", {}).get("criterion")))}'
            f'{" (given explicitly)" if report.get("config", {}).get("layers") else ""}.</p>')


def _window_text(window: list[int]) -> str:
    return f"layers {window[0]}-{window[-1]}" if window else "no layers"


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _rows_per_layer(report: dict) -> str:
    """Stacked bars: projected rows of each module kind, per decoder layer."""
    modules = report.get("modules", {})
    n_layers = report.get("n_layers") or 0
    counts: dict[str, dict[int, int]] = {}
    for m in modules.values():
        layer = layer_index(m.get("module", ""))
        if layer is not None:
            by_layer = counts.setdefault(_kind(m["module"]), {})
            by_layer[layer] = by_layer.get(layer, 0) + m.get("n_rows", 0)
    kinds = sorted(counts)
    width, height, left, right, top, bottom = 1100, 220, 56, 10, 12, 34
    totals = [sum(counts[k].get(i, 0) for k in kinds) for i in range(n_layers)]
    step = max(1, math.ceil((max(totals, default=0) or 1) / 4))  # whole rows on the axis
    ticks = list(range(0, step * 5, step))
    sx = _scale(-0.5, max(n_layers, 1) - 0.5, left, width - right)
    sy = _scale(0, ticks[-1] * 1.02, height - bottom, top)
    bar = max(1.0, (sx(1) - sx(0)) * 0.8)
    out = [f'<svg id="rows-per-layer" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           "<title>projected lora_B rows per decoder layer</title>",
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="#fff" '
           'stroke="#d0d7de"/>']
    window = report.get("safety_layers") or []
    if window:
        out.append(f'<rect class="window" x="{sx(window[0] - 0.5):.1f}" y="{top}" '
                   f'width="{sx(window[-1] + 0.5) - sx(window[0] - 0.5):.1f}" height="{height - top - bottom}" '
                   f'fill="{WINDOW_FILL}" fill-opacity="0.25"/>')
    for i in range(n_layers):
        y = height - bottom
        for k, kind in enumerate(kinds):
            v = counts[kind].get(i, 0)
            if not v:
                continue
            h = (height - bottom) - sy(v)
            y -= h
            out.append(f'<rect class="bar" data-layer="{i}" data-kind="{escape(kind)}" x="{sx(i) - bar / 2:.1f}" '
                       f'y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{PALETTE[k % len(PALETTE)]}">'
                       f"<title>layer {i}, {escape(kind)}: {v} rows</title></rect>")
    for v in ticks:
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>')
    step = max(1, math.ceil(n_layers / 40))
    for i in range(0, n_layers, step):
        out.append(f'<text x="{sx(i):.1f}" y="{height - bottom + 14}" text-anchor="middle">{i}</text>')
    out.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 4}" text-anchor="middle">decoder layer</text>')
    out.append("</svg>")
    note = "" if kinds else '<p class="sub">No module of the adapter lies in the safety window.</p>'
    return "".join(out) + _legend(kinds) + note


def _row_positions(report: dict) -> str:
    """Per layer of the window and module: a strip over the module's output rows, a tick per
    projected row (several rows in one pixel share a tick)."""
    modules = report.get("modules", {})
    by_layer: dict[int, list[tuple[str, dict]]] = {}
    for key, m in modules.items():
        layer = layer_index(m.get("module", ""))
        by_layer.setdefault(-1 if layer is None else layer, []).append((key, m))
    if not by_layer:
        return "<p>No module in the safety window.</p>"
    strip, label_w, row_h = 720, 170, 16
    blocks = []
    for layer in sorted(by_layer):
        items = sorted(by_layer[layer], key=lambda km: km[1].get("module", km[0]))
        height = row_h * len(items) + 6
        width = label_w + strip + 240
        out = [f'<svg class="positions" data-layer="{layer}" width="{width}" height="{height}" '
               f'viewBox="0 0 {width} {height}" role="img"><title>layer {layer}: projected rows</title>']
        for k, (key, m) in enumerate(items):
            y = 3 + k * row_h
            name = m.get("module", key).split(f".layers.{layer}.", 1)[-1]
            d_out = max(int(m.get("d_out") or 1), 1)
            rows = m.get("rows") or []
            skipped = m.get("skipped")
            out.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{escape(name)}</text>')
            out.append(f'<rect x="{label_w}" y="{y + 2}" width="{strip}" height="{row_h - 4}" '
                       f'fill="{"#f6f8fa" if not skipped else "#eeeeee"}" stroke="#d0d7de"/>')
            pixels = sorted({min(strip - 1, int(r * strip / d_out)) for r in rows})
            if pixels:
                path = "".join(f"M{label_w + p + 0.5:.1f} {y + 2}v{row_h - 4}" for p in pixels)
                out.append(f'<path class="ticks" data-rows="{len(rows)}" d="{path}" stroke="#d55e00" '
                           'stroke-width="1"/>')
            note = f"skipped: {skipped}" if skipped else f"{len(rows)} / {d_out}"
            out.append(f'<text x="{label_w + strip + 6}" y="{y + 11}">{escape(note)}</text>')
        out.append("</svg>")
        title = f"layer {layer}" if layer >= 0 else "outside the decoder layers"
        blocks.append(f"<div><b>{escape(title)}</b><br>{''.join(out)}</div>")
    return ('<p class="sub">Each strip spans a module\'s output rows (lora_B rows), 0 on the left; a tick marks '
            "a projected row.</p>" + "".join(blocks))


def _module_table(report: dict) -> str:
    head = ("<thead><tr><th>lora_B tensor</th><th>layer</th><th>rows projected</th><th>d_out</th><th>rank</th>"
            "<th>‖V‖<sub>F</sub></th><th>status</th></tr></thead>")
    body = []
    for key, m in report.get("modules", {}).items():
        skipped = m.get("skipped")
        status = (f"skipped: {skipped} ({len(m.get('selected_rows', []))} rows selected)" if skipped
                  else "projected" if m.get("n_rows") else "no row selected")
        layer = layer_index(m.get("module", ""))
        body.append(f'<tr data-key="{escape(key)}"><td class="mono">{escape(key)}</td><td class="n">'
                    f'{"–" if layer is None else layer}</td><td class="n">{_num(m.get("n_rows"))}</td>'
                    f'<td class="n">{_num(m.get("d_out"))}</td><td class="n">{_num(m.get("rank"))}</td>'
                    f'<td class="n">{_num(m.get("norm_v"))}</td><td>{escape(status)}</td></tr>')
    if not body:
        return '<table id="modules"><tbody></tbody></table><p>No module in the safety window.</p>'
    return f'<table id="modules">{head}<tbody>{"".join(body)}</tbody></table>'


def _passed_through(report: dict) -> str:
    passed = report.get("passed_through") or {}
    saved, tensors = passed.get("modules_to_save") or [], passed.get("tensors") or []
    if not saved and not tensors:
        return '<p id="passed-through">Every tensor of the adapter is a LoRA A or B; none is passed through.</p>'
    items = "".join(f"<li><code>{escape(t)}</code></li>" for t in tensors)
    return (f'<div id="passed-through"><p>modules_to_save: <code>{escape(", ".join(map(str, saved)) or "none")}'
            f"</code>. These tensors are copied to the output unchanged:</p><ul>{items}</ul></div>")


def _inputs(report: dict) -> str:
    paths = report.get("paths", {})
    out = ['<h3>Paths</h3>', _kv_table(paths, "paths"), "<h3>Prompts</h3>",
           _kv_table({k: report.get("prompt_sources", {}).get(k) for k in report.get("prompts", {})}, "prompts")]
    sums = report.get("inputs_sha256")
    out.append("<h3>Checksums (sha256)</h3>")
    if isinstance(sums, dict):
        rows = "".join(f"<tr><td>{escape(role)}</td><td class=\"mono\">{escape(path)}</td>"
                       f"<td class=\"mono\">{escape(digest)}</td></tr>"
                       for role, files in sums.items() for path, digest in files.items())
        out.append(f'<table id="checksums"><thead><tr><th>role</th><th>file</th><th>sha256</th></tr></thead>'
                   f"<tbody>{rows}</tbody></table>")
    else:
        out.append(f'<p id="checksums">{escape(str(sums))}</p>')
    return "".join(out)


def _run_facts(report: dict) -> str:
    timings = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in (report.get("timings_s") or {}).items()
               if not isinstance(v, (list, dict))}
    return (_kv_table(report.get("versions", {}), "versions") +
            f"<details><summary>backends</summary>{_kv_table(report.get('backends', {}), 'backends')}</details>"
            f"<details><summary>timings (s)</summary>{_kv_table(timings, 'timings')}</details>"
            f"<p class=\"sub\">compute dtype {escape(str(report.get('compute_dtype')))}; the full data is in "
            "mscp_report.json beside this page.</p>")


# -- the model card ------------------------------------------------------------------------------------
def mscp_card_section(report: dict) -> str:
    """The model card's mscp section (Markdown): what was projected, with which settings."""
    config = report.get("config", {})
    layers = report.get("safety_layers") or []
    window = f"{layers[0]}-{layers[-1]}" if layers else "none"
    lines = [
        CARD_BEGIN,
        "## Safety repair with mscp",
        "",
        f"This adapter's `lora_B` rows were repaired with [mscp](https://arxiv.org/abs/2508.09190) "
        f"{report.get('mscp_version')} (Multi-Level Safety Continual Projection, training-free): "
        f"the selected rows were projected onto the safety direction `V = W_aligned - W_base`; every other tensor is "
        "the input's.",
        "",
        f"- status: **{report.get('status')}**" + (f" ({'; '.join(report.get('warnings', []))})"
                                                    if report.get("warnings") else ""),
        f"- safety layers: {window} of {report.get('n_layers')} (criterion `{config.get('criterion')}`"
        f"{', given explicitly' if config.get('layers') else ''})",
        f"- projected: {len(report.get('projected_modules', []))} modules, {report.get('edited_parameters')} of "
        f"{report.get('lora_parameters')} LoRA parameters (edit fraction {100 * report.get('edit_fraction', 0):.4g} %)",
        f"- skipped: {len(report.get('skipped_modules', {}))} modules",
        f"- settings: score `{config.get('score')}`, q {config.get('q')}, p {config.get('p')}, "
        f"alpha {config.get('alpha')}, projector `{config.get('projector')}`, rho {config.get('rho')}",
        f"- calibration prompts: {prompt_counts(report.get('prompts'))}",
        "- details: `mscp_report.json` (every setting, per-module rows, checksums of the inputs) and `report.html`",
        CARD_END,
    ]
    return "\n".join(lines) + "\n"


def prompt_counts(prompts) -> str:
    """{"harmful": 32, "benign": 32} -> "32 harmful, 32 benign"."""
    if not isinstance(prompts, dict):
        return str(prompts)
    return ", ".join(f"{n} {name}" for name, n in prompts.items()) or "none"


CARD_TAGS = ("mscp", "safety")


def front_matter(card: str, report: dict) -> str:
    """The card's YAML front matter (the hub reads it) with mscp's tags and, where the card leaves it
    empty (peft's template writes `base_model: ''`), the base model the adapter was trained on."""
    import yaml

    meta, body = {}, card
    if card.startswith("---\n") and "\n---" in card[4:]:
        head, body = card[4:].split("\n---", 1)
        body = body.split("\n", 1)[1] if "\n" in body else ""
        try:
            loaded = yaml.safe_load(head)
        except yaml.YAMLError:
            return card  # a front matter we cannot read is left as it is
        if not isinstance(loaded, dict):
            return card
        meta = loaded
    base = (report.get("adapter") or {}).get("base_model_name_or_path")
    if base and not meta.get("base_model"):
        meta["base_model"] = base
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    meta["tags"] = tags + [t for t in CARD_TAGS if t not in tags]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body.lstrip("\n")


def model_card_with_mscp_section(card: str | None, report: dict) -> str:
    """The input's model card with the mscp section appended (or replacing an earlier one), and
    mscp's tags in its front matter."""
    section = mscp_card_section(report)
    if not card:
        card = f"# {report.get('paths', {}).get('adapter', 'LoRA adapter')} (repaired with mscp)\n\n{section}"
    elif CARD_BEGIN in card and CARD_END in card:
        before, rest = card.split(CARD_BEGIN, 1)
        after = rest.split(CARD_END, 1)[1].lstrip("\n")
        card = before + section + (("\n" + after) if after else "")
    else:
        card = card.rstrip("\n") + "\n\n" + section
    return front_matter(card, report)
