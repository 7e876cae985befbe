"""A prefix every prompt shares, run once per stream instead of once per prompt.

A chat template opens every prompt with the same tokens (SmolLM2's default system prompt: 24 of
the organism's 44-token mean). In a teacher-forced forward pass without gradients (the budget's
checks) those tokens' keys and values are the same for every prompt of a stream, so the stream runs
them once, as its first micro-batch, and every other micro-batch holds only its own tokens and
attends to the prefix's keys and values. Exact up to float rounding (tests/test_shared_prefix.py:
the same log-likelihoods as the whole prompts).

How: the prefix micro-batch goes through each layer first, and its cache (`_Recorder`) keeps that
layer's keys and values in a holder; each later micro-batch's cache (`_Reader`) puts them in front
of its own. Streams that share the captured inputs (Stream.copy: the probes of one pass) share the
holder: a stream takes a layer whole (prefix, then the rest) before the next stream does
(sequential.advance_with), so each reads its own prefix's.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from mscp.core.prompts import Batch

MIN_SHARED = 8  # below this a shared prefix saves less than it costs in bookkeeping


def shared_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt opens with, leaving each at least its last token (which predicts the
    target's first); 0 where fewer than MIN_SHARED."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= MIN_SHARED else 0


Holder = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> the current stream's prefix keys and values


class _Recorder(DynamicCache):
    """The prefix micro-batch's cache: keeps each layer's keys and values in the holder."""

    def __init__(self, config, holder: Holder):
        super().__init__(config=config)
        self.holder = holder

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.holder[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _Reader(DynamicCache):
    """A later micro-batch's cache: the holder's prefix in front of its own keys and values. It is
    made `length` tokens long (placeholders) so the model builds positions and masks past the prefix."""

    def __init__(self, config, holder: Holder, rows: int, length: int, n_layers: int, device):
        super().__init__(config=config)
        self.holder = holder
        placeholder = torch.zeros(1, 1, 1, 1, device=device).expand(rows, 1, length, 1)
        for i in range(n_layers):
            super().update(placeholder, placeholder, i)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.holder[layer_idx]
        rows = key_states.shape[0]
        return (torch.cat([k.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([v.expand(rows, -1, -1, -1), value_states], dim=-2))


def with_prefix(model, prefix: list[int], batches: list[Batch]) -> tuple[list[Batch], list[dict]]:
    """The micro-batches to capture (the prefix's first, then `batches`, which hold what follows it)
    and each one's extra forward arguments (model.capture's `extra`)."""
    holder: Holder = {}
    ids = torch.tensor([prefix], dtype=torch.int64)
    ones = torch.ones_like(ids)
    opening = Batch(ids, ones, torch.tensor([len(prefix) - 1]), torch.zeros(1, dtype=torch.int64))
    extra = [{"cache": _Recorder(model.config, holder), "use_cache": True}]
    for b in batches:  # the 2-d mask covers the prefix too; positions continue after it
        rows = len(b.input_ids)
        extra.append({"cache": _Reader(model.config, holder, rows, len(prefix), model.n_layers, model.device),
                      "use_cache": True, "attention_mask": torch.cat([ones.expand(rows, -1), b.attention_mask], dim=1)})
    return [opening] + batches, extra
