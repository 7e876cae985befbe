"""Shared fixtures: tiny real checkpoint trios (random weights, real configs, real file formats)."""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

# Every run starts from an empty cache root (mscp.paths), however it is started: nothing a previous
# run or the developer's own use left can hide a missing step, and the suite never writes into the
# user's caches. Set before mscp is imported; subprocesses inherit it.
_CACHE_ROOT = tempfile.mkdtemp(prefix="mscp-test-cache-")
os.environ["MSCP_CACHE"] = _CACHE_ROOT
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from mscp.harness.synth import SynthSpec, write_trio  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rank=4, layers_per_shard=2)
# what one patch writes to OUT, every file put in place by one atomic swap
OUTPUT_FILES = {"adapter_config.json", "adapter_model.safetensors", "mscp_report.json", "report.html", "README.md"}
FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma3_text"]

_cache: dict = {}


def make_trio(tmp_root: Path, family: str = "llama", **overrides) -> dict[str, Path]:
    """A base/aligned/adapter trio written by `mscp.harness.synth` (cached per arguments for the session)."""
    spec = SynthSpec(family=family, **{**TINY, **overrides})
    key = repr(spec)
    if key not in _cache:
        _cache[key] = write_trio(tmp_root / f"trio-{len(_cache)}-{family}", spec)
    return _cache[key]


@pytest.fixture(scope="session")
def trio_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trios")


@pytest.fixture(scope="session")
def llama_trio(trio_root):
    return make_trio(trio_root, "llama")


@pytest.fixture(scope="session")
def qwen2_trio(trio_root):
    return make_trio(trio_root, "qwen2")


def mapped_file(address: int) -> str | None:
    """The file whose mapping holds `address` in this process (Linux /proc/self/maps), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if low <= address < high:
            return parts[5] if len(parts) == 6 else None
    return None


def tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders: proof that inputs were not modified."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def full_model_target_logits(trio, adapter, prompts, targets) -> list[torch.Tensor]:
    """Per prompt, the logits at the positions that predict its target (len(target) x vocab), from the
    whole aligned model in float64 with the LoRA (None: none) added by forward hooks, one prompt at a
    time: the independent reference of the target-fit tests."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trio["aligned"]), dtype=torch.float64).eval()
    handles = [model.get_submodule(m.module).register_forward_hook(
        lambda _mod, args, out, A=adapter.tensors[m.key_a].double(), B=adapter.tensors[m.key_b].double(), s=m.scale:
        out + s * (args[0] @ A.T) @ B.T) for m in (adapter.modules.values() if adapter else [])]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1: -1] for p, t in zip(prompts, targets)]
    for h in handles:
        h.remove()
    return logits


def full_model_logliks(trio, adapter, prompts, targets) -> list[float]:
    """Each target's log-likelihood, summed over its tokens, from full_model_target_logits."""
    return [torch.log_softmax(logits, -1).gather(-1, torch.tensor(t)[:, None]).sum().item()
            for logits, t in zip(full_model_target_logits(trio, adapter, prompts, targets), targets)]
