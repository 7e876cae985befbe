"""The row scores beyond Wanda (docs/method.md, "Level 2"): wanda_weight and attribution, each
against an independent in-memory float64 reference, and their row selections."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import full_model_logliks, full_model_target_logits, make_trio
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mscp import PatchConfig, patch
from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks, attribution_scores, greedy_answers
from mscp.core.patcher import modules_by_layer
from mscp.core.pipeline import patch_many
from mscp.core.prompts import default_prompts, encode, load_tokenizer
from mscp.core.scoring import global_safety_rows, plus_lora, safety_rank, weight_safety_mass
from mscp.core.streaming import ModelShell
from mscp.errors import MSCPError

PROMPTS = {"harmful": default_prompts("harmful")[:6], "benign": default_prompts("benign")[:6],
           "task": default_prompts("benign")[6:12]}


# -- the LoRA added to a module's output -----------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 1, 9)])
def test_plus_lora_adds_the_scaled_low_rank_product_and_carries_its_gradient(dtype, tol, shape):
    g = torch.Generator().manual_seed(sum(shape))
    d_out, r = 13, 3
    out, u = torch.randn(*shape, d_out, generator=g), torch.randn(*shape, r, generator=g)
    B, s = torch.randn(d_out, r, generator=g), 0.37
    expected = out.double() + s * u.double() @ B.double().T
    got = plus_lora(out.to(dtype), u.to(dtype), B.to(dtype), s)
    assert got.shape == out.shape and got.dtype == dtype
    assert torch.allclose(got.double(), expected, rtol=tol, atol=tol)
    # gradients reach out and u as through out + s u B^T (the attribution pass backpropagates through it)
    o, v = out.double().requires_grad_(), u.double().requires_grad_()
    grad = torch.randn(*shape, d_out, generator=g, dtype=torch.float64)
    torch.autograd.backward(plus_lora(o, v, B.double(), s), grad)
    assert torch.allclose(o.grad, grad) and torch.allclose(v.grad, s * grad @ B.double(), atol=1e-12)


# -- wanda_weight --------------------------------------------------------------------------------
def weight_mass_reference(W, nh, nt, q, p, B, A, s):
    """Wei et al.'s per-weight set difference, spelled out: rank every weight, keep the top q by the
    harmful score that are not in the top p by the task score, sum the kept harmful scores per row."""
    Wa = W.double()
    sh = (Wa.abs() * nh.double()).flatten().tolist()
    st = ((Wa + s * B.double() @ A.double()).abs() * nt.double()).flatten().tolist()
    n = len(sh)
    top_h = set(sorted(range(n), key=lambda i: -sh[i])[: round(q * n)])
    top_t = set(sorted(range(n), key=lambda i: -st[i])[: round(p * n)])
    mass = torch.zeros(W.shape[0], dtype=torch.float64)
    for i in top_h - top_t:
        mass[i // W.shape[1]] += sh[i]
    return mass


@pytest.mark.parametrize("shape, r", [((7, 5), 2), ((16, 33), 4), ((1, 9), 1)])
@pytest.mark.parametrize("q, p", [(0.3, 0.3), (0.5, 0.0), (0.1, 0.9), (1.0, 0.2), (0.0, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_safety_mass_matches_the_reference(shape, r, q, p, dtype):
    gen = torch.Generator().manual_seed(hash((shape, r, q, p)) % 2**31)
    W = torch.randn(*shape, generator=gen).to(dtype)
    B, A = torch.randn(shape[0], r, generator=gen), torch.randn(r, shape[1], generator=gen)
    nh, nt = torch.rand(shape[1], generator=gen) + 0.1, torch.rand(shape[1], generator=gen) + 0.1
    got = weight_safety_mass(W, nh, nt, q, p, B, A, 0.5)
    exp = weight_mass_reference(W, nh, nt, q, p, B, A, 0.5)
    torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-9)


# -- the global selection of the attribution score ------------------------------------------------
@pytest.mark.parametrize("q, p", [(0.1, 0.0), (0.3, 0.1), (0.5, 0.5), (1.0, 0.0), (0.0, 0.3)])
def test_global_safety_rows_matches_brute_force(q, p):
    gen = torch.Generator().manual_seed(7)
    sizes = {"a.lora_B.weight": 9, "b.lora_B.weight": 4, "c.lora_B.weight": 13}
    harmful = {k: torch.randn(n, generator=gen) for k, n in sizes.items()}
    task = {k: torch.randn(n, generator=gen) for k, n in sizes.items()}
    got = global_safety_rows(harmful, task, q, p)
    flat = [(harmful[k][i].item(), -task[k][i].item(), k, i) for k in sorted(sizes) for i in range(sizes[k])]
    n = len(flat)
    top = sorted(flat, key=lambda x: -x[0])[: round(q * n)]
    damage = {(k, i) for _, d, k, i in sorted(flat, key=lambda x: -x[1])[: round(p * n)] if d > 0}
    expected = {k: sorted(i for h, _, kk, i in top if kk == k and h > 0 and (k, i) not in damage) for k in sizes}
    assert {k: v.tolist() for k, v in got.items()} == expected


# -- attribution against a full in-memory float64 model ---------------------------------------------
def reference_attribution(trio, prompts, targets, edits, scored_modules):
    """Whole aligned model in float64 with the LoRA added by hooks; one padded batch; the gradient
    of the targets' summed log-likelihood w.r.t. each scored module's output, dotted with its edit."""
    model = AutoModelForCausalLM.from_pretrained(str(trio["aligned"]), dtype=torch.float64).eval()
    ad = Adapter.load(trio["adapter"])
    outputs, effects = {}, {}

    def make(m, key_b):
        A, B = ad.tensors[m.key_a].double(), ad.tensors[m.key_b].double()

        def hook(_mod, args, out):
            u = args[0] @ A.T
            y = out + m.scale * (u @ B.T)
            if key_b in edits:
                y.retain_grad()
                outputs[key_b] = y
                effects[key_b] = (m.scale * (u @ edits[key_b].double().T)).detach()
            return y
        return hook

    handles = [model.get_submodule(m.module).register_forward_hook(make(m, m.key_b)) for m in ad.modules.values()]
    seqs = [p + t for p, t in zip(prompts, targets)]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    follow = labels[:, 1:]
    sel = follow != -100
    ll = torch.log_softmax(logits[sel], -1).gather(-1, follow[sel][:, None]).sum()
    ll.backward()
    for h in handles:
        h.remove()
    return {k: (outputs[k].grad * effects[k]).sum(dim=(0, 1)) for k in edits}, ll.item()


@pytest.fixture(scope="module")
def attribution_case(trio_root):
    trio = make_trio(trio_root, "llama")
    tok = load_tokenizer(trio["aligned"])
    prompts = encode(tok, PROMPTS["harmful"][:5], max_length=64)
    gen = torch.Generator().manual_seed(3)
    targets = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 1, 6, 3, 5)]
    ad = Adapter.load(trio["adapter"])
    shell = ModelShell(trio["aligned"], label="aligned")
    by_layer = modules_by_layer(ad, shell)
    scored = {2, 3}
    edits = {m.key_b: torch.randn(ad.tensors[m.key_b].shape, generator=gen)
             for i in scored for m in by_layer[i].values()}
    return trio, prompts, targets, ad, by_layer, scored, edits


# float64 streaming still takes the embedding and rotary tables in the checkpoint's fp32: ~1e-8 apart
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-6), ("float32", 2e-4)])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_attribution_matches_a_float64_full_model(attribution_case, dtype, rtol, batch_size):
    trio, prompts, targets, ad, by_layer, scored, edits = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype=dtype)
    scores, total = attribution_scores(shell, shell.head(), prompts, targets, (ad, by_layer), edits, scored,
                                       batch_size=batch_size, pad_id=0)
    expected, ll = reference_attribution(trio, prompts, targets, edits, set(edits))
    assert total == pytest.approx(ll, rel=rtol)
    assert sorted(scores) == sorted(scored)
    for index in scored:
        for rel, m in by_layer[index].items():
            got, exp = scores[index][rel].double(), expected[m.key_b]
            assert (got - exp).abs().max() <= rtol * exp.abs().max() + 1e-12, (index, rel)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_two_sets_in_one_pass_each_score_what_they_score_alone_in_float64(attribution_case, batch_size):
    """The benign refusal score rides the harmful pass (benign_penalty): each set's micro-batches add
    to its own sums, so each set's scores and log-likelihood are its float64 reference's."""
    from mscp.core.attribution import attribution_scores_sets

    trio, prompts, targets, ad, by_layer, scored, edits = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype="float64")
    sets = [(prompts[:3], targets[:3]), (prompts[3:], targets[3:])]
    (per_set, aligned) = attribution_scores_sets(shell, shell.head(), sets, [(ad, by_layer), None], [edits, {}],
                                                 scored, batch_size=batch_size, pad_id=0, opening=2)
    for (scores, total, opening, greedy), (p, t) in zip(per_set, sets):  # and each target's first 2 tokens
        first = target_logliks(shell, shell.head(), p, [x[:2] for x in t], [(ad, by_layer)], batch_size=1, pad_id=0)
        torch.testing.assert_close(opening, first[0].loglik, rtol=1e-9, atol=1e-9)
        assert torch.equal(greedy, first[0].greedy)
        expected, ll = reference_attribution(trio, p, t, edits, set(edits))
        assert total == pytest.approx(ll, rel=1e-6)
        for index in scored:
            for rel, m in by_layer[index].items():
                got, exp = scores[index][rel].double(), expected[m.key_b]
                assert (got - exp).abs().max() <= 1e-6 * exp.abs().max() + 1e-12, (index, rel)
    for (scores, total, *_), (p, t) in zip(aligned, sets):  # the model alone scores nothing; its own likelihood
        alone = target_logliks(shell, shell.head(), p, t, [None], batch_size=batch_size, pad_id=0)[0].loglik
        assert scores == {} and total == pytest.approx(float(alone.sum()), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_model_alone_runs_only_the_sets_it_is_given_and_measures_them_as_over_all(attribution_case, batch_size):
    """`alone`: the aligned model's stream runs only those sets (the adaptive budget's benign
    reference); what it measures there is what it measures running every set; the others are None."""
    from mscp.core.attribution import attribution_scores_sets

    trio, prompts, targets, ad, by_layer, scored, edits = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype="float64")
    sets = [(prompts[:3], targets[:3]), (prompts[3:], targets[3:])]
    run = dict(batch_size=batch_size, pad_id=0, opening=2)
    full = attribution_scores_sets(shell, shell.head(), sets, [(ad, by_layer), None], [edits, {}], scored, **run)
    apart = attribution_scores_sets(shell, shell.head(), sets, [(ad, by_layer), None], [edits, {}], scored,
                                    alone=frozenset({1}), **run)
    assert apart[1][0] is None
    with_empty = attribution_scores_sets(shell, shell.head(), sets + [([], [])], [(ad, by_layer), None],
                                         [edits, {}], scored, alone=frozenset({1}), **run)
    assert with_empty[0][2] is not None and with_empty[1][2] is None  # an empty set: the adapter's ran it
    assert apart[1][1].total == pytest.approx(full[1][1].total, rel=1e-12)
    torch.testing.assert_close(apart[1][1].opening, full[1][1].opening, rtol=1e-12, atol=1e-12)
    assert torch.equal(apart[1][1].greedy, full[1][1].greedy)
    for mine, theirs in zip(apart[0], full[0]):  # the adapter's stream still runs every set
        assert mine.total == pytest.approx(theirs.total, rel=1e-12)
        for index in scored:
            for rel in mine.scores[index]:
                torch.testing.assert_close(mine.scores[index][rel], theirs.scores[index][rel], rtol=1e-12, atol=1e-12)


# both take the softmax in float32 (attribution._token_logliks): ~1e-6 nats apart in a float64 model
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-7), ("float32", 1e-4)])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_the_log_likelihood_taken_while_answering_is_a_teacher_forced_pass(attribution_case, dtype, rtol, batch_size):
    """scored_greedy_answers: each answer token's log-likelihood, read off the logits that chose it
    (left-padded prompts, KV cache), is what a teacher-forced pass over prompt + answer gives."""
    from mscp.core.attribution import scored_greedy_answers

    trio, prompts, _, ad, by_layer, _, _ = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype=dtype)
    for lora in (None, (ad, by_layer)):
        answers, logliks = scored_greedy_answers(shell, shell.head(), prompts, 6, eos={2}, batch_size=batch_size,
                                                 pad_id=0, lora=lora)
        assert [len(a) for a in answers] == [len(ll) for ll in logliks]
        assert answers == greedy_answers(shell, shell.head(), prompts, 6, eos={2}, batch_size=batch_size, pad_id=0,
                                         lora=lora)
        forced = target_logliks(shell, shell.head(), prompts, answers, [lora], batch_size=batch_size, pad_id=0)[0]
        assert [sum(ll) for ll in logliks] == pytest.approx(forced.loglik.tolist(), rel=rtol)
        assert forced.greedy.all()  # each answer is what greedy decoding emits, so each reads as greedy
        assert all(x <= 0 for ll in logliks for x in ll)


def test_attribution_leaves_no_scratch_files(attribution_case, tmp_path):
    trio, prompts, targets, ad, by_layer, scored, edits = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned")
    attribution_scores(shell, shell.head(), prompts, targets, (ad, by_layer), edits, scored, batch_size=2, pad_id=0,
                       scratch=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_greedy_answers_equal_transformers_generate(attribution_case):
    trio, prompts, _, ad, by_layer, _, _ = attribution_case
    from peft import PeftModel

    shell = ModelShell(trio["aligned"], label="aligned")
    got = greedy_answers(shell, shell.head(), prompts, 6, eos={2}, batch_size=2, pad_id=0, lora=(ad, by_layer))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(trio["aligned"]), dtype=torch.float32),
                                      str(trio["adapter"])).eval()
    for p, answer in zip(prompts, got):
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(p):].tolist()
        assert answer == out[: len(answer)] and (len(answer) == 6 or answer[-1] == 2)


# -- the scores in the pipeline ------------------------------------------------------------------------
def patch_with(trio, score, **kw):
    return patch(trio["base"], trio["aligned"], trio["adapter"], prompts=PROMPTS, score=score, progress=False,
                 hash_inputs=False, batch_size=4, target_tokens=3, **kw)


@pytest.mark.parametrize("score", ["attribution", "wanda_weight"])
def test_a_patch_edits_exactly_the_selected_rows_of_the_window(llama_trio, score):
    res = patch_with(llama_trio, score, q=0.2, p=0.1)
    window = res.report["safety_layers"]
    before = load_file(str(Path(llama_trio["adapter"]) / "adapter_model.safetensors"))
    edited = 0
    for key, tensor in res.tensors.items():
        rows = res.report["modules"].get(key, {}).get("rows", [])
        changed = (tensor != before[key]).any(dim=1).nonzero().flatten().tolist() if tensor.dim() == 2 else []
        assert set(changed) <= set(rows), key
        if rows:
            assert int(key.split(".layers.")[1].split(".")[0]) in window
        edited += len(rows)
    assert edited > 0 and res.report["config"]["score"] == score


def test_attribution_patch_selects_what_the_global_rule_says(llama_trio):
    res = patch_with(llama_trio, "attribution", q=0.1, p=0.05)
    chosen = global_safety_rows(safety_rank(res.scores, PatchConfig().benign_penalty),  # the default ranking
                                {k: s["task"] for k, s in res.scores.items()}, 0.1, 0.05)
    assert {k: m["rows"] for k, m in res.report["modules"].items()} == {k: v.tolist() for k, v in chosen.items()}
    details = res.report["score_details"]
    assert details["target_tokens"]["harmful"] > 0 and details["targets_loglik"]["harmful"] < 0


def test_attribution_at_p_0_skips_the_task_side_and_selects_the_same_rows(llama_trio):
    with_task = patch_with(llama_trio, "attribution", q=0.1, p=0.05)
    without = patch_with(llama_trio, "attribution", q=0.1, p=0.0)
    assert all("task" not in s for s in without.scores.values())
    assert "targets_task" not in without.report["timings_s"] and "targets_task" in with_task.report["timings_s"]
    for key, s in without.scores.items():  # the harmful side does not depend on p
        assert torch.equal(s["harmful"], with_task.scores[key]["harmful"])
    at_p0 = global_safety_rows(safety_rank(with_task.scores, PatchConfig().benign_penalty),
                               {k: s["task"] for k, s in with_task.scores.items()}, 0.1, 0.0)
    assert {k: m["rows"] for k, m in without.report["modules"].items()} == {k: v.tolist() for k, v in at_p0.items()}


def test_removing_task_rows_from_scores_without_a_task_side_is_refused():
    harmful = {"m": torch.tensor([3.0, 2.0, 1.0, -1.0])}
    assert global_safety_rows(harmful, None, 0.5, 0.0)["m"].tolist() == [0, 1]
    with pytest.raises(MSCPError, match="needs the task scores"):
        global_safety_rows(harmful, None, 0.5, 0.25)


def test_attribution_for_several_adapters_equals_each_alone(trio_root):
    a = make_trio(trio_root, "llama")
    b = make_trio(trio_root, "llama", seed=5)  # same shapes, other weights: use its adapter on a's models
    kw = dict(prompts=PROMPTS, score="attribution", progress=False, hash_inputs=False, batch_size=4,
              target_tokens=3, q=0.2, p=0.0, layers=(1, 3))
    together = patch_many(a["base"], a["aligned"], [a["adapter"], b["adapter"]], **kw)
    alone = [patch_many(a["base"], a["aligned"], [x], **kw)[0] for x in (a["adapter"], b["adapter"])]
    for t, s in zip(together, alone):
        assert t.report["modules"] == s.report["modules"]
        assert all(torch.equal(t.tensors[k], s.tensors[k]) for k in s.tensors)


def test_no_scratch_folder_is_left_after_a_patch(llama_trio):
    before = set(Path(tempfile.gettempdir()).glob("mscp-attribution-*"))
    patch_with(llama_trio, "attribution", q=0.1, p=0.0)
    assert set(Path(tempfile.gettempdir()).glob("mscp-attribution-*")) == before


def reference_greedy_flags(trio, adapter, prompts, targets) -> list[bool]:
    """Whether greedy decoding from each prompt emits its target, by the whole aligned model in
    float64: each target token is its position's argmax."""
    return [bool((logits.argmax(-1) == torch.tensor(t)).all())
            for logits, t in zip(full_model_target_logits(trio, adapter, prompts, targets), targets)]


# bfloat16 moves the tiny random model's near-tied logits: its own answers are checked below instead
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_target_reads_as_greedy_exactly_when_greedy_decoding_emits_it(attribution_case, dtype, batch_size):
    """TargetFit.greedy (the adaptive budget's greedy benign guard): the model's own greedy answers
    read as greedy, and stay so to their last token; the same answers with one token changed do not."""
    trio, prompts, _, ad, by_layer, _, _ = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype="float64")
    answers = greedy_answers(shell, shell.head(), prompts, 4, eos=set(), batch_size=batch_size, pad_id=0,
                             lora=(ad, by_layer))
    changed = [a[:-1] + [(a[-1] + 7) % 500 + 3] if i % 2 else a for i, a in enumerate(answers)]  # odd ones: last token
    targets = answers + changed
    expected = reference_greedy_flags(trio, ad, prompts + prompts, targets)
    assert expected == [True] * len(answers) + [i % 2 == 0 for i in range(len(answers))]  # the case is what it says
    shell = ModelShell(trio["aligned"], label="aligned", dtype=dtype)
    fits = target_logliks(shell, shell.head(), prompts + prompts, targets, [(ad, by_layer)], batch_size=batch_size,
                          pad_id=0)
    assert fits[0].greedy.dtype == torch.bool and fits[0].greedy.tolist() == expected


@pytest.mark.parametrize("batch_size", [1, 3])
def test_in_bfloat16_a_models_own_greedy_answers_read_as_greedy(attribution_case, batch_size):
    trio, prompts, _, ad, by_layer, _, _ = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype="bfloat16")
    answers = greedy_answers(shell, shell.head(), prompts, 4, eos=set(), batch_size=batch_size, pad_id=0,
                             lora=(ad, by_layer))
    fits = target_logliks(shell, shell.head(), prompts, answers, [(ad, by_layer)], batch_size=batch_size, pad_id=0)
    assert fits[0].greedy.all()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_target_logliks_of_the_model_alone_and_with_its_lora_match_float64_full_models(attribution_case, batch_size):
    """One forward pass gives the targets' log-likelihood under the aligned model alone (None) and
    with the LoRA added: the adaptive budget's two measurements."""
    trio, prompts, targets, ad, by_layer, scored, _ = attribution_case
    shell = ModelShell(trio["aligned"], label="aligned", dtype="float64")
    alone_each, with_lora_each = (fit.loglik for fit in target_logliks(
        shell, shell.head(), prompts, targets, [None, (ad, by_layer)], batch_size=batch_size, pad_id=0))
    assert alone_each.shape == with_lora_each.shape == (len(prompts),)
    alone, with_lora = alone_each.sum().item(), with_lora_each.sum().item()
    _, ll_lora = reference_attribution(trio, prompts, targets, {}, set())
    each = full_model_logliks(trio, None, prompts, targets)
    assert alone_each.tolist() == pytest.approx(each, rel=1e-6)  # prompt by prompt
    assert alone == pytest.approx(sum(each), rel=1e-6)
    assert with_lora == pytest.approx(ll_lora, rel=1e-6)
    assert alone != pytest.approx(with_lora, rel=1e-6)  # the LoRA was added
