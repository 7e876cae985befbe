"""Synthetic checkpoint trios: base, aligned and a LoRA adapter in real Hugging Face / peft formats.

For tests, benchmarks and memory measurements: any transformers architecture config, written one
tensor at a time (shard by shard) so a large model never sits in memory. The aligned model is the
base plus a full-rank delta; the adapter is random but trained-looking (B non-zero). Each model
folder also gets a small byte-level BPE tokenizer with a chat template. Seeded: the same arguments
give the same files.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mscp.core.config import LORA_TARGETS
from mscp.errors import MSCPError

if TYPE_CHECKING:
    import torch

FAMILIES = {
    "llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig",
    "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "qwen3": "Qwen3Config",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Real layer shapes of published models (hidden, MLP, heads, KV heads, vocabulary); the number of
# layers is chosen separately, so a slice of a 70B model fits a small disk.
PRESETS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                          vocab_size=128256),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064),
}


@dataclass
class SynthSpec:
    family: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    dtype: str = "float32"
    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = LORA_TARGETS
    delta_scale: float = 0.3  # aligned - base, relative to the base weights' std
    layers_per_shard: int = 2
    max_shard_bytes: int = 4 << 30  # published checkpoints use ~4-5 GB shards; bounds memory while writing
    seed: int = 0
    extra_config: dict = field(default_factory=dict)

    def config(self):
        import transformers

        if self.family not in FAMILIES:
            raise MSCPError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        cls = getattr(transformers, FAMILIES[self.family])
        head_dim = self.hidden_size // self.num_attention_heads
        cfg = cls(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                  num_key_value_heads=self.num_key_value_heads, head_dim=head_dim, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **self.extra_config)
        cfg.dtype = self.dtype
        return cfg


def _generator(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _base_tensor(name: str, shape, seed: int) -> torch.Tensor:
    import torch

    g = _generator(seed, name)
    if len(shape) == 1:  # norms: around 1 (Gemma's norms store w - 1: small values work too)
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.05


def _delta(name: str, shape, seed: int, scale: float) -> torch.Tensor:
    import torch

    if len(shape) != 2:
        return torch.zeros(shape)
    return torch.randn(shape, generator=_generator(seed + 7919, name)) * 0.05 * scale


def write_trio(out: str | Path, spec: SynthSpec = SynthSpec(), progress=None) -> dict[str, Path]:
    """Write OUT/base, OUT/aligned (model folders) and OUT/adapter (peft LoRA folder)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    config = spec.config()
    shapes = _shapes(config)
    dtype = getattr(torch, spec.dtype)
    paths = {"base": out / "base", "aligned": out / "aligned", "adapter": out / "adapter"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)

    # shards: non-layer tensors first, then `layers_per_shard` layers each
    def layer_of(name):
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1

    groups: dict[int, list[str]] = {}
    for name in shapes:
        groups.setdefault(layer_of(name) // spec.layers_per_shard if layer_of(name) >= 0 else -1, []).append(name)
    itemsize = torch.finfo(dtype).bits // 8
    shards: list[list[str]] = []  # each group, split where it would pass max_shard_bytes
    for gid in sorted(groups):
        shards.append([])
        size = 0
        for name in groups[gid]:
            nbytes = _numel(shapes[name]) * itemsize
            if shards[-1] and size + nbytes > spec.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
    items = list(enumerate(shards))
    for model, with_delta in (("base", False), ("aligned", True)):
        weight_map = {}
        for n, names in (progress(items, desc=f"synth {model}", unit="shard") if progress else items):
            fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                t = _base_tensor(name, shapes[name], spec.seed)
                if with_delta:
                    t += _delta(name, shapes[name], spec.seed, spec.delta_scale)
                tensors[name] = t.to(dtype)
                weight_map[name] = fname
            save_file(tensors, str(paths[model] / fname), metadata={"format": "pt"})
            del tensors
        total = sum(itemsize * _numel(s) for s in shapes.values())
        (paths[model] / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save_pretrained(paths[model])
        write_tokenizer(paths[model], spec.vocab_size)
    _write_adapter(paths["adapter"], spec, shapes, config)
    return paths


def write_adapters(out: str | Path, spec: SynthSpec, n: int, *, first_seed: int = 1) -> list[Path]:
    """n more adapters of the trio `spec` describes, OUT/adapter-000 ...: adapter k is the trio's
    adapter drawn with seed first_seed + k (same base and aligned, different A and B)."""
    from dataclasses import replace

    config = spec.config()
    shapes = _shapes(config)
    paths = []
    for k in range(n):
        path = Path(out) / f"adapter-{k:03d}"
        path.mkdir(parents=True, exist_ok=True)
        _write_adapter(path, replace(spec, seed=first_seed + k), shapes, config)
        paths.append(path)
    return paths


def _shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in meta.state_dict().items()}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_adapter(path: Path, spec: SynthSpec, shapes: dict, config) -> None:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2 or ".layers." not in name:
            continue
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in spec.target_modules:
            continue
        d_out, d_in = shape
        g = _generator(spec.seed + 104729, module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(spec.rank, d_in, generator=g) / d_in**0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, spec.rank, generator=g) * 0.02
    if not tensors:
        raise MSCPError(f"no module of the model matches target modules {spec.target_modules}")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules),
                      lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path="aligned")
    lora.save_pretrained(str(path))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on the built-in prompts, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mscp.core.prompts import default_prompts

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = default_prompts("harmful") + default_prompts("benign") + ["user", "assistant", "system"]
    tk.train_from_iterator(corpus, trainer)
    if tk.get_vocab_size() > vocab_size:
        raise MSCPError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer ({tk.get_vocab_size()})")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
