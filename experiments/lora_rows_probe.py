"""Which LoRA rows carry the organism's harmful compliance? (docs/evaluation.md, section 5b)

    python experiments/lora_rows_probe.py ~/.cache/mscp/organism/<hash> [rows|alpha|count]

In memory, on the 135M organism: per LoRA module, the RMS of each input channel on the 64
harmful localisation prompts (aligned model: n^H; fine-tuned model: n^Hf) and the 48 task
localisation prompts (fine-tuned: n^T). Row scores: wH = |W_a| n^H and wT = |W_f| n^T (MSCP's),
dH = |s B A| n^Hf and dT = |s B A| n^T (the LoRA's own change). Each plan row projects
TopRows(H, q) minus TopRows(T, p) with Safe LoRA's C, then measures keyword ASR on the harmful
localisation prompts and accuracy on the task localisation prompts (greedy, 20 tokens).
The "alpha" plan uses alpha > 1 instead; "count" only compares the rows it selects at
q 0.3 / p 0.3 on 17-22 with the pipeline's (lora_rows_probe_count.json). Writes lora_rows_probe[_alpha].json in the working directory. A one-off experiment, not part of the package.
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mscp.core.prompts import load_tokenizer, read_prompts
from mscp.core.scoring import top_rows
from mscp.harness.evaluate import answer_correct, read_task
from mscp.harness.generate import Generator
from mscp.harness.judges import KeywordJudge

torch.set_num_threads(1)
org = Path(sys.argv[1]); sp = org / "splits"
tok = load_tokenizer(org / "aligned")
load = lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
base, aligned = load(org / "base"), load(org / "aligned")
cfg = json.loads((org / "finetuned" / "adapter_config.json").read_text())
s = cfg["lora_alpha"] / cfg["r"]
lt = load_file(str(org / "finetuned" / "adapter_model.safetensors"))
mods = {}
for k in lt:
    if k.endswith("lora_A.weight"):
        name = k[len("base_model.model."):-len(".lora_A.weight")]
        mods[name] = (lt[k].float(), lt[k.replace("lora_A", "lora_B")].float())
print(len(mods), "modules", flush=True)

def merged(Bs):
    m = copy.deepcopy(aligned)
    with torch.no_grad():
        for name, (A, B) in mods.items():
            lin = m.get_submodule(name)
            lin.weight += s * Bs.get(name, B) @ A
    return m

harm = read_prompts(sp / "harmful_localize.txt")
task = read_task(sp / "task_localize.jsonl")
def chat(p): return tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)

@torch.no_grad()
def rms(model, prompts):
    stats = {}
    def mk(name):
        def hook(mod, args):
            x = args[0][cur[0]].float()
            a = stats.setdefault(name, [0, 0]); a[0] = a[0] + (x * x).sum(0); a[1] += x.shape[0]
        return hook
    cur = [None]
    hs = [model.get_submodule(n).register_forward_pre_hook(mk(n)) for n in mods]
    for i in range(0, len(prompts), 16):
        enc = tok([chat(p) for p in prompts[i:i+16]], return_tensors="pt", padding=True, add_special_tokens=False)
        cur[0] = enc["attention_mask"].bool()
        model(**enc)
    for h in hs: h.remove()
    return {n: (v[0] / v[1]).sqrt() for n, v in stats.items()}

t = time.time()
ft = merged({})
nH = rms(aligned, harm); nHf = rms(ft, harm); nT = rms(ft, [p for p, _ in task])
print("rms", time.time() - t, flush=True)
W = {n: aligned.get_submodule(n).weight.detach() for n in mods}
Wb = {n: base.get_submodule(n).weight.detach() for n in mods}
score = {}
for n, (A, B) in mods.items():
    D = (s * B @ A).abs()
    score[n] = dict(wH=W[n].abs() @ nH[n], wT=(W[n] + s * B @ A).abs() @ nT[n], dH=D @ nHf[n], dT=D @ nT[n])
CB = {}
for n, (A, B) in mods.items():
    V = (W[n] - Wb[n]).double()
    CB[n] = (V @ (V.T @ B.double()) / V.norm()).float()
    
gen_kw = KeywordJudge()
def evaluate(Bs, label, extra):
    g = Generator(merged(Bs), tokenizer=tok)
    hr = g.generate(harm, max_new_tokens=20)
    asr = 1 - sum(v.refused for v in gen_kw.judge(harm, hr)) / len(harm)
    tr = g.generate([p for p, _ in task], max_new_tokens=20)
    acc = sum(answer_correct(r, a) for (p, a), r in zip(task, tr)) / len(task)
    row = dict(label=label, asr=round(asr, 3), task=round(acc, 3), **extra)
    print(json.dumps(row), flush=True)
    return row

def layer(n): return int(n.split(".layers.")[1].split(".")[0])
def variant(hk, tk, q, p, layers, how):
    Bs, edited, total = {}, 0, 0
    for n, (A, B) in mods.items():
        total += B.numel()
        if layer(n) not in layers: continue
        sc = score[n]
        S = top_rows(sc[hk], q); T = top_rows(sc[tk], p)
        S = S[~torch.isin(S, T)]
        if len(S) == 0: continue
        B2 = B.clone()
        if how == "project": B2[S] = CB[n][S]
        elif how == "zero": B2[S] = 0
        elif how.startswith("alpha"):
            al = float(how[5:]); B2[S] = B[S] + al * (CB[n][S] - B[S])
        Bs[n] = B2; edited += len(S) * B.shape[1]
    return Bs, edited / total

ALL = range(30); WIN = range(17, 23)
if len(sys.argv) > 2 and sys.argv[2] == "count":
    # the probe's wH \ wT rows (q 0.3, p 0.3, 17-22) against the pipeline's on the same prompts
    from mscp import patch
    res = patch(org / "base", org / "aligned", org / "finetuned", harmful=[sp / "harmful_localize.txt"],
                benign=sp / "benign_localize.txt", task=sp / "task_localize.txt", layers=(17, 22), q=0.3, p=0.3,
                progress=False, hash_inputs=False)
    ours, theirs, both, b_params, all_params = 0, 0, 0, 0, 0
    for n, (A, B) in mods.items():
        b_params += B.numel(); all_params += A.numel() + B.numel()
        if layer(n) not in WIN: continue
        S = top_rows(score[n]["wH"], 0.3); S = set(S[~torch.isin(S, top_rows(score[n]["wT"], 0.3))].tolist())
        P = set(res.report["modules"].get(f"base_model.model.{n}.lora_B.weight", {}).get("rows", []))
        ours += len(S); theirs += len(P); both += len(S & P)
    r = cfg["r"]
    out = dict(probe_rows=ours, pipeline_rows=theirs, common_rows=both,
               probe_edit_pct_of_lora_B=round(100 * ours * r / b_params, 3),
               probe_edit_pct_of_all_lora=round(100 * ours * r / all_params, 3),
               pipeline_edit_fraction_pct=round(100 * res.report["edit_fraction"], 3))
    print(json.dumps(out))
    json.dump(out, open("lora_rows_probe_count.json", "w"), indent=1)
    sys.exit(0)
rows = [evaluate({}, "finetuned", {})]
PLANS = {
    "rows": [("dH", "dT", 0.1, 0.0, ALL, "project"), ("dH", "dT", 0.1, 0.1, ALL, "project"),
             ("dH", "dT", 0.3, 0.3, ALL, "project"), ("dH", "dT", 0.05, 0.0, ALL, "project"),
             ("wH", "wT", 0.1, 0.0, ALL, "project"), ("dH", "wT", 0.1, 0.1, ALL, "project"),
             ("dH", "dT", 0.1, 0.0, WIN, "project"), ("dH", "dT", 0.3, 0.0, WIN, "project")],
    # alpha > 1 overshoots the projection: with C B ~ 0, B' ~ (1 - alpha) B on the selected rows
    "alpha": [("wH", "wT", 0.3, 0.3, WIN, "alpha2"), ("wH", "wT", 0.3, 0.3, WIN, "alpha5"),
              ("wH", "wT", 0.1, 0.0, ALL, "alpha2"), ("dH", "dT", 0.1, 0.0, ALL, "alpha2"),
              ("wH", "wT", 0.3, 0.3, ALL, "alpha5")],
}
plan_name = sys.argv[2] if len(sys.argv) > 2 else "rows"
plan = PLANS[plan_name]
for hk, tk, q, p, L, how in plan:
    Bs, ef = variant(hk, tk, q, p, L, how)
    rows.append(evaluate(Bs, f"{hk}/{tk} q{q} p{p} L{L[0]}-{L[-1]} {how}", dict(edit=round(100 * ef, 2))))
json.dump(rows, open(f"lora_rows_probe{'' if plan_name == 'rows' else '_' + plan_name}.json", "w"), indent=1)
