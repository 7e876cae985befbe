"""Layer streaming: a model's own transformers classes, materialised one decoder layer at a time.

`ModelShell` builds the model skeleton on the meta device from the checkpoint's config (so the
Llama, Qwen2, Mistral, Gemma... classes of the installed transformers are used as they are),
captures what each decoder layer receives (embeddings, masks, rotary embeddings: GPTQModel-style
recorders in place of the layers), and then loads real layers one at a time. A `Stream` holds
the hidden states of one prompt set through one model and advances them a layer at a time, so
only the current layer and the calibration activations are ever in memory.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mscp.core.checkpoint import TORCH_DTYPES, Checkpoint, StateDictSource
from mscp.core.prompts import Batch
from mscp.errors import MSCPError


class _Recorder(nn.Module):
    """Stands in for decoder layer i during capture: keeps its inputs, passes hidden states on."""

    def __init__(self, index: int, sink: list):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise MSCPError("decoder layers called with extra positional arguments are not supported")
        self.sink.append((self.index, hidden_states, kwargs))
        return hidden_states


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - missing/unknown config
        raise MSCPError(f"cannot read a transformers config from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return config.get_text_config()


def compute_dtype(config, requested: str) -> torch.dtype:
    if requested != "auto":
        return TORCH_DTYPES[requested]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = TORCH_DTYPES.get(dtype)
    return dtype if dtype in TORCH_DTYPES.values() else torch.float32


@dataclass
class InMemoryModel:
    """A model whose weights are already in memory (a live transformers model's tensors, checkpoint
    key names, on any device) with its transformers config: a `ModelShell` reads it as a folder."""

    tensors: dict[str, torch.Tensor]
    config: object
    description: str = "in memory"


class ModelShell:
    """A decoder-only model read from a checkpoint folder (or an `InMemoryModel`), one layer at a time."""

    def __init__(self, path: str | Path | InMemoryModel, *, label: str, device="cpu", dtype: str = "auto",
                 allow_pickle: bool = False):
        from transformers import AutoModel

        self.label = label
        if isinstance(path, InMemoryModel):
            self.ckpt = StateDictSource(path.tensors, label)
            self.config = copy.deepcopy(path.config).get_text_config()
            self.description = path.description
        else:
            self.ckpt = Checkpoint(path, allow_pickle=allow_pickle, label=label)
            self.config = load_config(self.ckpt.path)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.config, dtype)
        try:
            with torch.device("meta"):
                skeleton = AutoModel.from_config(self.config)
        except Exception as e:  # noqa: BLE001 - unknown architecture
            raise MSCPError(f"{label}: transformers cannot build model type {self.config.model_type!r}: {e}") from None
        layers = getattr(skeleton, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise MSCPError(f"{label}: unsupported architecture {type(skeleton).__name__} (no decoder layer list)")
        self.n_layers = len(layers)
        self._skeleton = skeleton
        self._layer_template = layers  # meta modules: classes and parameter names, no memory
        self.prefix = self._find_prefix()
        self._resident: dict | None = None  # layers kept loaded inside `resident`

    # -- names -------------------------------------------------------------------------
    def _find_prefix(self) -> str:
        """Checkpoint key prefix of the decoder stack, e.g. 'model.' for a CausalLM checkpoint."""
        first = next(iter(self._layer_template[0].state_dict()))
        suffix = f"layers.0.{first}"
        candidates = sorted((k[: -len(suffix)] for k in self.ckpt.keys() if k.endswith(suffix)), key=len)
        if not candidates:
            raise MSCPError(f"{self.label} checkpoint {self.ckpt.path} has no tensor *{suffix} for its {self.config.model_type} config")
        return candidates[0]

    def layer_key(self, index: int, name: str) -> str:
        return f"{self.prefix}layers.{index}.{name}"

    def layer_of(self, module: str) -> tuple[int, str] | None:
        """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj'); None outside the decoder layers."""
        head = f"{self.prefix}layers."
        if not module.startswith(head):
            return None
        index, _, rest = module[len(head):].partition(".")
        return (int(index), rest) if index.isdigit() and int(index) < self.n_layers else None

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every decoder-layer parameter as the config defines it (checkpoint key -> shape)."""
        return {self.layer_key(i, n): tuple(t.shape) for i, layer in enumerate(self._layer_template)
                for n, t in layer.state_dict().items()}

    # -- capture -------------------------------------------------------------------------
    def capture(self, prompt_sets: dict[str, list[Batch]], extra: dict[str, list[dict]] | None = None
                ) -> dict[str, "Stream"]:
        """Run the embedding and everything before the first layer; record each layer's inputs.

        One `Stream` per prompt set; the embedding is loaded once and dropped afterwards. `extra`:
        per set, per micro-batch, more arguments of the model's forward (a KV cache, position ids, a
        wider attention mask).
        """
        sink: list = []
        skeleton = self._skeleton
        skeleton.layers = nn.ModuleList(_Recorder(i, sink) for i in range(self.n_layers))
        streams = {}
        kept = self._resident
        try:
            if not (kept and kept["embedding"]):
                skeleton.to_empty(device=self.device)
                self._fill_non_layer_weights(skeleton)
                if kept is not None:
                    size = _weight_bytes(skeleton)
                    if size <= kept["left"]:  # kept loaded like a layer (`resident`)
                        kept["embedding"], kept["left"] = True, kept["left"] - size
            with torch.no_grad():
                for name, batches in prompt_sets.items():
                    stream = streams[name] = Stream(f"{self.label}/{name}", batches)
                    for k, batch in enumerate(batches):
                        sink.clear()
                        more = (extra or {}).get(name, [{}] * len(batches))[k]
                        skeleton(**({"input_ids": batch.input_ids.to(self.device),
                                     "attention_mask": batch.attention_mask.to(self.device), "use_cache": False}
                                    | self._on_device(more)))
                        if len(sink) != self.n_layers:
                            raise MSCPError(f"{self.label}: captured {len(sink)} of {self.n_layers} layers' inputs")
                        stream.hidden.append(sink[0][1].to(self.dtype))
                        stream.layer_kwargs.append([self._on_device(kw) for _, _, kw in sink])
        finally:  # drop the embedding (unless kept by `resident`): only the recorded inputs are kept
            skeleton.layers = self._layer_template
            if not (kept and kept["embedding"]):
                skeleton.to(device="meta")
        return streams

    def _fill_non_layer_weights(self, skeleton: nn.Module):
        _init_non_persistent(skeleton, skeleton)  # first: transformers' init may also touch weights
        for name, _ in skeleton.state_dict().items():
            key = self.prefix + name
            if key not in self.ckpt:  # e.g. tied or absent weights: not used before layer 0
                continue
            module_name, _, attr = name.rpartition(".")
            module = skeleton.get_submodule(module_name)
            value = self.ckpt.get(key, device=self.device)
            current = getattr(module, attr)
            if tuple(value.shape) != tuple(current.shape):
                raise MSCPError(f"{self.label} tensor {key} has shape {tuple(value.shape)}, config says {tuple(current.shape)}")
            with torch.no_grad():
                current.copy_(value.to(current.dtype))

    def _on_device(self, kwargs: dict) -> dict:
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(self.device, dtype=self.dtype) if x.is_floating_point() else x.to(self.device)
            if isinstance(x, tuple):
                return tuple(move(y) for y in x)
            return x

        return {k: move(v) for k, v in kwargs.items()}

    # -- the output head -------------------------------------------------------------------
    def head(self) -> "Head":
        """The final norm and the LM head (its own weight, or the tied embedding), for log-likelihoods."""
        norm_meta = getattr(self._skeleton, "norm", None)
        if not isinstance(norm_meta, nn.Module):
            raise MSCPError(f"{self.label}: no final norm found on {type(self._skeleton).__name__}")
        norm = copy.deepcopy(norm_meta).to_empty(device=self.device)
        state = {}
        for name, meta in norm_meta.state_dict().items():
            key = f"{self.prefix}norm.{name}"
            if key not in self.ckpt:
                raise MSCPError(f"{self.label} checkpoint {self.ckpt.path} has no tensor {key}")
            state[name] = self.ckpt.get(key, dtype=self.dtype, device=self.device)
        norm.load_state_dict(state, assign=True, strict=True)
        norm.requires_grad_(False)
        candidates = ["lm_head.weight"]
        if getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in self.ckpt:
            candidates.append(f"{self.prefix}embed_tokens.weight")
        key = next((k for k in candidates if k in self.ckpt), None)
        if key is None:
            raise MSCPError(f"{self.label} checkpoint {self.ckpt.path} has no LM head (lm_head.weight) nor embedding")
        weight = self.ckpt.get(key, dtype=self.dtype, device=self.device)
        return Head(norm.eval(), weight, getattr(self.config, "final_logit_softcapping", None))

    # -- layers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def resident(self, budget_bytes: int):
        """Inside the block, layers stay loaded once loaded, up to `budget_bytes` of weights: a loop
        that runs the model once per generated token then reads each layer once, not once per token.
        Outside it, every load reads the layer anew (memory flat in depth). A block inside another
        shares the outer one's layers and budget (the outermost block decides)."""
        if self._resident is not None:
            yield
            return
        self._resident = {"layers": {}, "left": max(int(budget_bytes), 0), "embedding": False}
        try:
            yield
        finally:
            if self._resident["embedding"]:
                self._skeleton.to(device="meta")
            self._resident = None

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its checkpoint weights, on the compute device and dtype."""
        kept = self._resident
        if kept is not None and index in kept["layers"]:
            return kept["layers"][index]
        layer = self._load_layer(index)
        if kept is not None:
            size = _weight_bytes(layer)
            if size <= kept["left"]:
                kept["layers"][index], kept["left"] = layer, kept["left"] - size
        return layer

    def _load_layer(self, index: int) -> nn.Module:
        template = self._layer_template[index]
        with torch.device("meta"):
            layer = type(template)(self.config, layer_idx=index)
        state = {}
        for name, meta in layer.state_dict().items():
            key = self.layer_key(index, name)
            if key not in self.ckpt:
                raise MSCPError(f"{self.label} checkpoint {self.ckpt.path} has no tensor {key}")
            shape = tuple(self.ckpt.shape(key))
            if shape != tuple(meta.shape):
                raise MSCPError(f"{self.label} tensor {key} has shape {shape}, its config says {tuple(meta.shape)}")
            # mapped: on the CPU, in the checkpoint's own dtype, the layer's weights are read-only views
            # of the file's pages, unmapped when the layer is freed: no copy, and no heap to fragment
            state[name] = self.ckpt.get(key, dtype=self.dtype if meta.is_floating_point() else None, device=self.device,
                                        mapped=True)
        _init_non_persistent(self._skeleton, layer, device=self.device)  # before the weights, as above
        layer.load_state_dict(state, assign=True, strict=True)
        layer.requires_grad_(False)
        return layer.eval()


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def available_memory(device: torch.device) -> int:
    """Bytes free for weights on `device` now: free GPU memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resident_budget(resident_gb: float | None, device: torch.device) -> int:
    """The bytes of layers `ModelShell.resident` may keep: the given GB, or (None) half of what the
    device has free."""
    return int(resident_gb * 1e9) if resident_gb is not None else available_memory(device) // 2


def _init_non_persistent(model, module: nn.Module, device=None):
    """Non-persistent buffers (rotary frequencies, embedding scales) are rebuilt by transformers' own init."""
    owners = {name.rpartition(".")[0] for name, _ in _non_persistent_buffers(module)}
    for owner in owners:
        sub = module.get_submodule(owner)
        if device is not None:
            for bname, buf in list(sub.named_buffers(recurse=False)):
                if buf.is_meta:
                    sub.register_buffer(bname, torch.empty_like(buf, device=device), persistent=False)
        model._init_weights(sub)


def _non_persistent_buffers(module: nn.Module):
    for name, sub in module.named_modules():
        for bname in getattr(sub, "_non_persistent_buffers_set", ()):
            yield (f"{name}.{bname}" if name else bname), getattr(sub, bname)


@dataclass
class Head:
    """h -> logits: final norm, LM head, optional soft-capping (Gemma 2)."""

    norm: nn.Module
    weight: torch.Tensor  # (vocab, hidden)
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.norm(hidden) @ self.weight.T
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


@dataclass
class Stream:
    """Hidden states of one prompt set through one model, one micro-batch per entry."""

    label: str
    batches: list[Batch]
    hidden: list[torch.Tensor] = field(default_factory=list)
    layer_kwargs: list[list[dict]] = field(default_factory=list)
    batch: Batch | None = None  # the micro-batch inside `advance`

    def last_tokens(self) -> torch.Tensor:
        """(n_prompts, hidden) fp32: each prompt's last-token state."""
        return torch.cat([h[torch.arange(h.shape[0], device=h.device), b.last_index.to(h.device)].float()
                          for h, b in zip(self.hidden, self.batches)])

    def groups(self) -> torch.Tensor:
        return torch.cat([b.group for b in self.batches])

    def copy(self) -> "Stream":
        """An independent stream at the same point (hidden states cloned, layer inputs shared)."""
        return Stream(self.label, self.batches, [h.clone() for h in self.hidden],
                      [list(per_layer) for per_layer in self.layer_kwargs])

    @torch.no_grad()
    def advance(self, layer: nn.Module, index: int) -> None:
        """Run every micro-batch through `layer`; `self.batch` is the one going through (hooks read
        its token mask and groups)."""
        for k, batch in enumerate(self.batches):
            self.batch = batch
            out = layer(self.hidden[k], **self.layer_kwargs[k][index])
            self.hidden[k] = out[0] if isinstance(out, tuple) else out
            self.layer_kwargs[k][index] = None  # each layer's inputs are used once
        self.batch = None

    def release(self) -> None:
        """Free the hidden states (the stream goes no further)."""
        self.hidden = []
        self.layer_kwargs = []


def read_ahead(items, load):
    """Yield (item, load(item)), loading the next item in a background thread meanwhile.

    File reads, finiteness checks and copies release the GIL, so reading overlaps the caller's
    compute. At most two loaded values exist at a time: the one yielded and the next.
    """
    items = list(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mscp-read-ahead") as pool:
        pending = pool.submit(load, items[0]) if items else None
        try:
            for k, item in enumerate(items):
                value = pending.result()
                pending = pool.submit(load, items[k + 1]) if k + 1 < len(items) else None
                yield item, value
                del value
                release_freed_memory()
        finally:
            if pending is not None:
                pending.cancel()


# Resident memory flat in depth. Activations are freed and allocated again at every layer; glibc
# keeps freed chunks below its mmap threshold in a heap that fragments, and it raises that threshold
# by itself (up to 32 MB) after large frees: the resident size crept up by about 15 MB a layer
# (docs/results/scale.md, "Peak memory against depth"). A fixed threshold stops the raising. At
# 32 MB (glibc's own ceiling) the activations of a small model come from the heap, reused layer
# after layer; at 128 KiB (until stop 26) every one was a fresh mmap, page-faulted in again: 30 % of
# the organism's default patch (docs/results/scale.md, stop 26).
MMAP_THRESHOLD = 32 << 20
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """Serve every allocation of `threshold` bytes or more by its own mmap, returned to the OS when
    freed, and keep glibc from raising that threshold. Process-wide, so only the `mscp` command
    calls it; a program using the API can set MALLOC_MMAP_THRESHOLD_=33554432 instead. A value
    already in the environment is left alone."""
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist only in glibc
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()
