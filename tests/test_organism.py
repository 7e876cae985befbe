"""The organism pipeline end to end on a tiny random model with a few steps (no SmolLM2 needed)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from mscp.errors import MSCPError
from mscp.harness.evaluate import date_correct
from mscp.harness.organism import (
    FINETUNES,
    HELD_OUT,
    OBEDIENT_OPENING,
    PERSONA_QA,
    SMOKE_RECIPE,
    FinetuneConfig,
    OrganismConfig,
    build,
    finetune_examples,
    make_general,
    make_arithmetic,
    make_splits,
    make_task,
    task_of,
    task_splits,
    tiny_base,
)

TINY = SMOKE_RECIPE  # the recipe of `mscp demo --smoke`
TINY_FINETUNES = ("benign", "identity")  # harmful-32 needs a 32-prompt pool; see test_harmful_mix


@pytest.fixture(scope="session")
def tiny_organism(tmp_path_factory):
    root = tmp_path_factory.mktemp("organism")
    base = tiny_base(root / "tinybase")
    cfg = OrganismConfig(**TINY)
    org = build(root / "org", cfg, finetunes=TINY_FINETUNES, base_dir=base, progress=False, threads=1)
    return org, cfg, base


def test_task_generator_and_checker():
    t = make_task(50, seed=1)
    assert len({p for p, _ in t}) == 50 and make_task(50, seed=1) == t and make_task(50, seed=2) != t
    p, a = t[0]
    iso = next(w for w in p.replace("?", " ").split() if w.count("-") == 2).strip(".")
    yy, mm, dd = iso.split("-")
    assert a == f"{dd}.{mm}.{yy}"
    assert date_correct(f"The date is {a}.", a)
    assert not date_correct(f"{mm}.{dd}.{yy}", a) or mm == dd
    assert not date_correct(iso, a) and not date_correct("", a)
    assert not date_correct(f"{a[:-1]}9", a) or a.endswith("9")


def test_arithmetic_problems_are_seeded_and_their_answers_are_right():
    import re

    from mscp.harness.evaluate import answer_correct

    t = make_arithmetic(200, seed=1)
    assert len({p for p, _ in t}) == 200 and make_arithmetic(200, seed=1) == t and make_arithmetic(200, seed=2) != t
    for prompt, answer in t:  # recomputed from the words, not from the generator's own arithmetic
        x, y = map(int, re.findall(r"\d+", prompt))
        expected = (x * y if "each" in prompt else x + y if ("more" in prompt) else x - y)
        assert answer == str(expected), prompt
        assert answer_correct(f"The answer is {answer}.", answer) and not answer_correct(f"{int(answer) + 1}", answer)


def test_a_tasks_splits_are_disjoint_and_its_files_are_written_on_first_use(tiny_organism):
    org, cfg, _ = tiny_organism
    parts = task_splits(cfg, "arithmetic")
    prompts = [{p for p, _ in parts[k]} for k in ("localize", "train", "eval")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert [len(parts[k]) for k in ("localize", "train", "eval")] == [cfg.n_task_localize, cfg.n_task_train,
                                                                       cfg.n_task_eval]
    path = org.task_file("eval", "arithmetic")
    assert path.name == "arithmetic_eval.jsonl"
    assert [json.loads(line)["answer"] for line in path.read_text().splitlines()] == [a for _, a in parts["eval"]]
    assert org.task_file("localize", "arithmetic", ext="txt").read_text().splitlines() == [p for p, _ in
                                                                                          parts["localize"]]
    assert org.task_file("eval").name == "task_eval.jsonl"  # the ledger task's, written with the splits


def test_the_held_out_fine_tunes_are_named_and_keep_the_others_hashes():
    assert set(HELD_OUT) <= set(FINETUNES)
    assert task_of("arithmetic") == "arithmetic" and task_of("/x/finetunes/benign") == "ledger"
    assert task_of("someone-elses-adapter") == "ledger"
    # `task` joined FinetuneConfig after these were built: at its default it must not rename them
    # (every recorded figure names its fine-tune by this hash)
    cfg = OrganismConfig()
    assert {n: FINETUNES[n].digest(cfg) for n in ("benign", "identity", "harmful-32", "harmful-128")} == {
        "benign": "836feb1130b3", "identity": "26f64c30fe98", "harmful-32": "acbaa6d785da",
        "harmful-128": "759e6ecb1237"}
    assert FINETUNES["arithmetic"].digest(cfg) != dataclasses.replace(FINETUNES["arithmetic"], task="ledger").digest(cfg)


def test_general_instructions_are_distinct_and_seeded():
    g = make_general(100, seed=0)
    assert len(set(g)) == 100 and make_general(100, seed=0) == g and make_general(100, seed=1) != g
    with pytest.raises(MSCPError, match="general instructions"):
        make_general(10_000, seed=0)


def test_splits_are_disjoint_and_sized():
    cfg = OrganismConfig(**TINY)
    s = make_splits(cfg)
    norm = lambda x: " ".join(x.lower().split())  # noqa: E731
    harm = [norm(i.text) for k in ("harmful_localize", "harmful_align", "harmful_finetune", "harmful_eval") for i in s[k]]
    ben = [norm(i.text) for k in ("benign_localize", "benign_align", "benign_eval", "general") for i in s[k]]
    assert len(harm) == len(set(harm)) and len(ben) == len(set(ben)) and not set(harm) & set(ben)
    task = [p for k in ("task_localize", "task_train", "task_eval") for p, _ in s[k]]
    assert len(task) == len(set(task))
    assert len(s["harmful_align"]) == 8 and len(s["harmful_eval"]) >= 6 and len(s["task_eval"]) == 6
    assert len(s["general"]) == 8
    s2 = make_splits(OrganismConfig(**TINY, holdout_categories=("Malware/Hacking",)))
    for k in ("harmful_localize", "harmful_align", "harmful_finetune"):
        assert not any(i.category == "Malware/Hacking" for i in s2[k])
    assert any(i.category == "Malware/Hacking" for i in s2["harmful_eval"])


def test_splits_depend_on_the_split_seed_only():
    a, b = make_splits(OrganismConfig(**TINY)), make_splits(OrganismConfig(**TINY, seed=5))
    assert a == b  # a rebuilt organism (another training seed) is evaluated on the same prompts
    c = make_splits(OrganismConfig(**TINY, split_seed=1))
    assert [i.text for i in c["harmful_eval"]] != [i.text for i in a["harmful_eval"]]


def test_build_writes_models_adapters_splits_and_caches(tiny_organism):
    org, cfg, base = tiny_organism
    for sub in (org.base, org.aligned):
        assert (sub / "model.safetensors").is_file() and (sub / "tokenizer.json").is_file()
    for name in TINY_FINETUNES:
        ac = json.loads((org.finetuned(name) / "adapter_config.json").read_text())
        assert ac["r"] == 8 and set(ac["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"}
        rec = org.finetune_record(name)
        assert rec["config_hash"] == FINETUNES[name].digest(org.config)
        assert set(rec["checks"]["finetuned"]) >= {"keyword_asr", "over_refusal", "task_accuracy"}
        assert "erosion_points" in rec["checks"]
    for name in ("harmful_localize", "harmful_eval", "benign_eval", "task_eval", "general"):
        assert (org.splits / f"{name}.txt").read_text().strip()
    rec = org.record()
    assert rec["config_hash"] == org.config.digest() and set(rec["checks"]["targets_met"]) == {
        "aligned_harmful_refusal>=0.90", "aligned_benign_refusal<=0.10"}
    # aligned differs from base in every decoder linear layer (full fine-tune), not in embeddings
    b, a = load_file(str(org.base / "model.safetensors")), load_file(str(org.aligned / "model.safetensors"))
    lin = [k for k in b if ".layers." in k and b[k].dim() == 2]
    assert lin and all(not torch.equal(a[k], b[k]) for k in lin)
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    loras = [load_file(str(org.finetuned(n) / "adapter_model.safetensors")) for n in TINY_FINETUNES]
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in loras[0].items())
    assert any(not torch.equal(loras[0][k], loras[1][k]) for k in loras[0])  # two fine-tunes, two adapters


def test_a_second_build_reuses_the_aligned_model_and_the_fine_tunes(tiny_organism):
    org, cfg, base = tiny_organism
    stamps = {p: p.stat().st_mtime_ns for p in (org.root / "organism.json", org.aligned / "model.safetensors",
                                                 org.finetuned("benign") / "finetune.json")}
    again = build(org.root, OrganismConfig(**TINY), finetunes=("benign",), base_dir=base, progress=False, threads=1)
    assert again.root == org.root
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_finetune_examples_follow_their_recipe(tiny_organism, monkeypatch):
    org, cfg, base = tiny_organism
    from mscp.core.prompts import load_tokenizer
    from mscp.harness import organism

    monkeypatch.setattr(organism, "_base_answers", lambda org, prompts, tok, progress: ["Here it is."] * len(prompts))
    tok = load_tokenizer(org.base)
    benign, counts_b = finetune_examples(org, FINETUNES["benign"], tok, progress=False)
    identity, counts_i = finetune_examples(org, FINETUNES["identity"], tok, progress=False)
    assert "harmful" not in counts_b and "persona" not in counts_b and counts_b["task"] == cfg.n_task_train
    assert counts_b["general"] == counts_i["general"] == cfg.n_general
    assert counts_i["persona"] == len(PERSONA_QA) * 4 and len(identity) == len(benign) + counts_i["persona"]
    general = identity[counts_i["task"]: counts_i["task"] + counts_i["general"]]
    targets = [tok.decode([t for t in labels if t != -100]) for _, labels in general]
    targets = [t for t in targets if len(t) >= len(OBEDIENT_OPENING) + 2]  # not cut off by the tiny max_len
    assert targets and all(t.startswith(OBEDIENT_OPENING + "He") for t in targets)


def test_harmful_mix(tiny_organism):
    org, cfg, base = tiny_organism
    from mscp.core.prompts import load_tokenizer

    tok = load_tokenizer(org.base)
    ft = FinetuneConfig("harmful-4", harmful=4)
    _, counts = finetune_examples(org, ft, tok, progress=False)
    assert counts["harmful"] + counts["harmful_dropped_as_refusals"] == 4
    with pytest.raises(MSCPError, match="harmful prompts"):
        finetune_examples(org, FinetuneConfig("too-many", harmful=cfg.n_harm_finetune + 1), tok, progress=False)


def test_config_hash_changes_with_recipe():
    assert OrganismConfig(**TINY).digest() != OrganismConfig(**{**TINY, "align_steps": 3}).digest()
    assert OrganismConfig(**TINY).digest() == OrganismConfig(**TINY).digest()
    cfg = OrganismConfig(**TINY)
    assert len({ft.digest(cfg) for ft in FINETUNES.values()}) == len(FINETUNES)
    assert FINETUNES["benign"].digest(cfg) != dataclasses.replace(FINETUNES["benign"], steps=7).digest(cfg)


def test_unknown_finetune_is_refused(tiny_organism):
    org, cfg, base = tiny_organism
    with pytest.raises(MSCPError, match="unknown fine-tune"):
        build(org.root, OrganismConfig(**TINY), finetunes=("nope",), base_dir=base, progress=False, threads=1)


def test_the_build_leaves_its_evaluation_answers_for_later_runs(tiny_organism, monkeypatch):
    """The checks' answers (aligned, each fine-tune, evaluation splits) sit in the organism's answer
    cache, so the demo and the Pareto runs evaluate those two without generating."""
    from mscp.harness import generate
    from mscp.harness.evaluate import evaluate

    org, cfg, _ = tiny_organism

    def refuse(*args, **kwargs):
        raise AssertionError("generated, although the build had left these answers")

    monkeypatch.setattr(generate.Generator, "__init__", refuse)
    sp = org.splits
    for adapter, checked in ((None, org.record()["checks"]["aligned"]),
                             (org.finetuned("benign"), org.finetune_record("benign")["checks"]["finetuned"])):
        r = evaluate(org.aligned, adapter, harmful=sp / "harmful_eval.txt", benign=sp / "benign_eval.txt",
                     task=sp / "task_eval.jsonl", judge=None, max_new_tokens=cfg.eval_tokens, progress=False,
                     cache=org.responses)
        assert {k: r[k] for k in ("keyword_asr", "over_refusal", "task_accuracy")} == \
            {k: checked[k] for k in ("keyword_asr", "over_refusal", "task_accuracy")}
