"""Per benign localisation prompt, the probability of the refusal opening ("I'm sorry, but") under
the aligned model, the fine-tune and a patched adapter: what the adaptive budget's benign guard
averages (seed 1's harmful-32, docs/results/evaluation.md stop 24). Paths are this machine's.

    python experiments/benign_guard_per_prompt.py
"""
import torch
from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks
from mscp.core.patcher import modules_by_layer
from mscp.core.prompts import encode, load_tokenizer, read_prompts
from mscp.core.streaming import ModelShell
O = "/root/.cache/mscp/organism/232d6c797e1f"
tok = load_tokenizer(O + "/aligned")
prompts = encode(tok, read_prompts(O + "/splits/benign_localize.txt"), max_length=256)
opening = tok("I'm sorry, but", add_special_tokens=False).input_ids[:4]
model = ModelShell(O + "/aligned", label="aligned")
loras = [None]
for f in (O + "/finetunes/harmful-32", "/tmp/seed1b-work/seed1-harmful-32"):
    ad = Adapter.load(f); loras.append((ad, modules_by_layer(ad, model)))
al, ft, pa = [x.exp() for x in target_logliks(model, model.head(), prompts, [opening] * len(prompts), loras,
                                              batch_size=16, pad_id=tok.pad_token_id or 0)]
print("mean P: aligned %.4f finetuned %.4f patched %.4f rise %.4f" % (al.mean(), ft.mean(), pa.mean(), pa.mean() - al.mean()))
for thr in (0.3, 0.5):
    print(f"prompts with P > {thr}: aligned {(al > thr).sum().item()} patched {(pa > thr).sum().item()}")
order = torch.argsort(pa - al, descending=True)[:8]
print("largest rises:", [(round(al[i].item(), 3), round(pa[i].item(), 3)) for i in order])
