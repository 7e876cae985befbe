"""Outputs people look at and keep: report.html (opened in a real headless Chromium), the model card
with its mscp section, one file mode for every file, absolute paths, modules passed through."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mscp.cli import main
from mscp.core.report_html import CARD_BEGIN, model_card_with_mscp_section, render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                             "(apt-get install chromium; .ci/run installs it)")
CARD = "---\nlibrary_name: peft\n---\n# Ledger adapter\n\nFine-tuned on ledger dates.\n"
CARD_BODY = CARD.split("---\n", 2)[2]


def split_card(text: str) -> tuple[dict, str]:
    """(the YAML front matter, the Markdown after it)."""
    import yaml

    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body
SAVED = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def patched(llama_trio, tmp_path_factory):
    """`mscp patch` run from the adapter's parent with relative paths, on an adapter with a model card
    and a modules_to_save tensor."""
    root = tmp_path_factory.mktemp("html")
    adapter = root / "adapter"
    shutil.copytree(llama_trio["adapter"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[SAVED] = torch.randn(512, 64, generator=torch.Generator().manual_seed(3))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    (adapter / "README.md").write_text(CARD)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
                   "--adapter", "adapter", "--out", "out", "--quiet", "--q", "0.5", "--p", "0.2"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    out = root / "out"
    return out, json.loads((out / "mscp_report.json").read_text()), tensors


def test_every_output_file_has_the_same_mode(patched):
    out, _, _ = patched
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_paths_in_the_report_are_absolute(patched):
    out, report, _ = patched
    assert report["paths"]["adapter"] == str(out.parent / "adapter")
    assert all(Path(p).is_absolute() for p in report["paths"].values())
    assert all(Path(f).is_absolute() for files in report["inputs_sha256"].values() for f in files)


def test_modules_passed_through_unchanged_are_named_in_the_report(patched):
    out, report, tensors = patched
    assert report["passed_through"] == {"modules_to_save": ["lm_head"], "tensors": [SAVED]}
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))[SAVED], tensors[SAVED])


def test_the_model_card_keeps_peft_card_and_adds_an_mscp_section(patched):
    out, report, _ = patched
    meta, card = split_card((out / "README.md").read_text())
    assert meta["library_name"] == "peft" and meta["tags"] == ["mscp", "safety"]  # the input's, and mscp's tags
    assert card.startswith(CARD_BODY.rstrip("\n"))
    section = card[card.index(CARD_BEGIN):]
    layers = report["safety_layers"]
    for text in (f"safety layers: {layers[0]}-{layers[-1]} of 5", "q 0.5, p 0.2", "alpha 1.0",
                 f"{len(report['projected_modules'])} modules", f"status: **{report['status']}**"):
        assert text in section, text


@pytest.mark.parametrize("card", [None, CARD, CARD + "\n<!-- mscp:begin -->\nold section\n<!-- mscp:end -->\n\nAfter.\n"],
                         ids=["no-card", "card", "card-patched-before"])
def test_the_mscp_section_is_added_once(patched, card):
    _, report, _ = patched
    text = model_card_with_mscp_section(card, report)
    assert text.count(CARD_BEGIN) == 1 and "old section" not in text
    meta, body = split_card(text)
    assert meta["tags"] == ["mscp", "safety"]
    assert model_card_with_mscp_section(text, report) == text  # a second repair keeps one section, one set of tags
    if card:
        assert body.startswith(CARD_BODY.rstrip("\n")) and body.rstrip().endswith("After.") == ("After." in card)


def test_the_card_fills_peft_templates_empty_base_model_and_keeps_other_tags(patched):
    _, report, _ = patched
    report = {**report, "adapter": {**report.get("adapter", {}), "base_model_name_or_path": "org/aligned-7b"}}
    card = "---\nbase_model: ''\nlibrary_name: peft\ntags:\n- lora\n---\n# Model Card\n"
    meta, _ = split_card(model_card_with_mscp_section(card, report))
    assert meta == {"base_model": "org/aligned-7b", "library_name": "peft", "tags": ["lora", "mscp", "safety"]}
    counts = ", ".join(f"{n} {name}" for name, n in report["prompts"].items())  # as text, not a dict
    assert f"calibration prompts: {counts}\n" in model_card_with_mscp_section(card, report)


def variants(report: dict) -> dict[str, dict]:
    """The report as written, and as a no-op (every module skipped) and an empty window would be."""
    noop = copy.deepcopy(report)
    for m in noop["modules"].values():
        m.update(selected_rows=m["rows"], rows=[], n_rows=0, skipped="V is zero")
    noop.update(status="noop", warnings=["every module ... was skipped"], projected_modules=[],
                skipped_modules={k: "V is zero" for k in noop["modules"]})
    empty = {**copy.deepcopy(report), "modules": {}, "projected_modules": [], "status": "noop"}
    return {"patched": report, "noop": noop, "no-modules": empty, "bare": {}}


@pytest.mark.parametrize("kind", ["patched", "noop", "no-modules", "bare"])
def test_the_page_needs_nothing_from_the_network(patched, kind):
    page = render_html(variants(patched[1])[kind])
    assert not re.search(r"https?:|<script|<link|<img|<iframe|src=|url\(|@import", page, re.I)


def test_text_from_the_inputs_is_escaped(patched):
    report = copy.deepcopy(patched[1])
    report["paths"]["adapter"] = "<script>alert(1)</script>"
    page = render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page


# -- in a real browser ----------------------------------------------------------------------------
def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a dead proxy: a page that needed the network would show it."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=http://127.0.0.1:9",
                           *args, url], capture_output=True, text=True, timeout=180)


class Elements(HTMLParser):
    """Every element's tag and attributes, and the text inside each element with an id."""

    def __init__(self):
        super().__init__()
        self.elements, self.text, self.open = [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in ("br", "meta", "rect", "line", "polyline", "path", "i", "input"):
            self.open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag not in ("br", "meta", "rect", "line", "polyline", "path", "i", "input") and self.open:
            self.open.pop()

    def handle_data(self, data):
        for element_id in filter(None, self.open):
            self.text[element_id] = self.text.get(element_id, "") + data

    def having(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def rendered(patched, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    out, report, _ = patched
    done = chromium((out / "report.html").as_uri(), tmp_path_factory.mktemp("chromium"), "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Elements()
    dom.feed(done.stdout)
    return dom, report


@needs_chromium
def test_chromium_renders_the_status_and_the_summary(rendered):
    dom, report = rendered
    assert dom.having("span", id="status")[0]["data-status"] == report["status"]
    assert dom.text["status"] == report["status"]
    assert "No warnings." in dom.text["warnings"] or report["warnings"]


@needs_chromium
def test_chromium_renders_the_three_curve_panels_with_the_window(rendered):
    dom, report = rendered
    curves = dom.having("polyline", **{"class": "curve"})
    assert sorted(c["data-series"] for c in curves) == ["c_benign", "c_harmful", "li_gap", "sigma"]
    assert all(len(c["points"].split()) == report["n_layers"] for c in curves)
    assert len(dom.having("rect", **{"class": "window"})) == 4  # three panels and the per-layer bars


@needs_chromium
def test_chromium_renders_where_the_rows_sit_per_layer_and_module(rendered):
    dom, report = rendered
    strips = dom.having("svg", **{"class": "positions"})
    assert [int(s["data-layer"]) for s in strips] == report["safety_layers"]
    ticks = dom.having("path", **{"class": "ticks"})
    assert sorted(int(t["data-rows"]) for t in ticks) == sorted(m["n_rows"] for m in report["modules"].values()
                                                                if m["n_rows"])
    bars = dom.having("rect", **{"class": "bar"})
    assert {int(b["data-layer"]) for b in bars} <= set(report["safety_layers"])


@needs_chromium
def test_chromium_renders_the_module_config_version_and_checksum_tables(rendered):
    dom, report = rendered
    assert [r["data-key"] for r in dom.having("tr") if "data-key" in r] == list(report["modules"])
    for field in ("q", "p", "alpha", "projector", "criterion"):
        assert field in dom.text["config"]
    assert report["versions"]["torch"] in dom.text["versions"]
    digests = [d for files in report["inputs_sha256"].values() for d in files.values()]
    assert digests and all(d in dom.text["checksums"] for d in digests)
    assert SAVED in dom.text["passed-through"]


@needs_chromium
def test_a_chromium_screenshot_of_the_report_is_not_blank(patched, tmp_path):
    from PIL import Image

    out, _, _ = patched
    shot = tmp_path / "report.png"
    done = chromium((out / "report.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,1600",
                    "--hide-scrollbars")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    pixels = list(getattr(image, "get_flattened_data", image.getdata)())
    non_white = sum(1 for p in pixels if min(p) < 235) / len(pixels)
    assert non_white > 0.03, f"only {non_white:.1%} of the page is drawn"
    colours = set(pixels)
    assert (0x00, 0x72, 0xB2) in colours, "the first curve's colour is on the page"
    assert len(colours) > 50
