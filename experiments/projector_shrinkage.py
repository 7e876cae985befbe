"""How much of a LoRA's B does Safe LoRA's C = V V^T / ||V||_F keep on the organism? (docs/evaluation.md, 5b)

    python experiments/projector_shrinkage.py ~/.cache/mscp/organism/<hash>

Per module: ||V||_F, the top singular value's share of it, and ||C B||_F / ||B||_F (fp64).
A one-off experiment, not part of the package.
"""
import sys

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
org = sys.argv[1]
aligned = load_file(f"{org}/aligned/model.safetensors")
base = load_file(f"{org}/base/model.safetensors")
lora = load_file(f"{org}/finetuned/adapter_model.safetensors")
for layer in (0, 10, 20, 29):
    for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        key = f"model.layers.{layer}.{kind}.weight"
        V = aligned[key].double() - base[key].double()
        B = lora[f"base_model.model.model.layers.{layer}.{kind}.lora_B.weight"].double()
        norm = V.norm()
        CB = V @ (V.T @ B) / norm
        s1 = torch.linalg.svdvals(V)[0]
        print(f"layer {layer:2d} {kind:17s} ||V||_F {norm:.3f}  s1/||V||_F {s1 / norm:.3f}  "
              f"||CB||/||B|| {CB.norm() / B.norm():.4f}  ||W_a||_F {aligned[key].norm():.1f}")
