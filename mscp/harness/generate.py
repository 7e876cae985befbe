"""Batched greedy generation with left padding (any causal LM folder, optionally with a peft adapter)."""
from __future__ import annotations

from pathlib import Path

import torch

from mscp.core.checkpoint import TORCH_DTYPES
from mscp.core.prompts import chat_ids
from mscp.errors import MSCPError


def load_model(model: str | Path, adapter: str | Path | None = None, dtype: str = "bfloat16"):
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=TORCH_DTYPES[dtype])
    except Exception as e:  # noqa: BLE001
        raise MSCPError(f"cannot load a model from {model}: {' '.join(str(e).split())[:200]}") from None
    if adapter is not None:
        from peft import PeftModel

        try:
            m = PeftModel.from_pretrained(m, str(adapter)).merge_and_unload()
        except Exception as e:  # noqa: BLE001
            raise MSCPError(f"cannot apply the adapter {adapter}: {' '.join(str(e).split())[:200]}") from None
    return m.eval()


class Generator:
    """Greedy decoding of many prompts, exact and lean on a CPU.

    Three things keep it fast without changing what greedy decoding answers:
    - the token prefix every prompt shares (the chat template's system turn: about 20 of a prompt's
      ~50 tokens) is run once and its KV cache copied into each batch; each batch's own tokens are
      padded on the left of their own part, so the pads sit between the prefix and the prompt,
      masked out, and positions count real tokens only;
    - prompts go in length-sorted batches (little padding);
    - a row that has answered (EOS) leaves the batch, with its cache rows.
    """

    def __init__(self, model, adapter=None, tokenizer=None, dtype: str = "bfloat16", chat_template: bool = True,
                 max_prompt_tokens: int = 256):
        from mscp.core.prompts import eos_ids, load_tokenizer, pad_id

        self.model = model if isinstance(model, torch.nn.Module) else load_model(model, adapter, dtype)
        tok_path = tokenizer or (None if isinstance(model, torch.nn.Module) else model)
        self.tok = tokenizer if (tokenizer is not None and not isinstance(tokenizer, (str, Path))) else load_tokenizer(tok_path)
        self.chat_template, self.max_prompt_tokens = chat_template, max_prompt_tokens
        self.pad_id = pad_id(self.tok)
        self.eos = eos_ids(self.tok, getattr(self.model, "config", None))  # the rule the patch's decoder uses

    def _forward(self, ids, mask, cache):
        """The next-token logits after `ids` (the cache extended in place); positions count real tokens."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def _prefix_cache(self, prefix: list[int]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if prefix:
            ids = torch.tensor([prefix], dtype=torch.long)
            self._forward(ids, torch.ones_like(ids), cache)
        return cache

    def _prefill(self, seqs: list[list[int]], shared: int, prefix):
        """One batch's prompt tokens after the shared prefix: (its cache, attention mask, first answer tokens)."""
        import copy

        width = max(len(s) for s in seqs) - shared
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for row, seq in enumerate(seqs):
            own = seq[shared:]
            ids[row, width - len(own):] = torch.tensor(own, dtype=torch.long)
            mask[row, shared + width - len(own):] = 1
        cache = copy.deepcopy(prefix)
        if shared:
            cache.batch_repeat_interleave(len(seqs))
        return cache, mask, self._forward(ids, mask, cache).argmax(dim=-1)

    def _merge(self, parts):
        """Prefilled batches as one decode batch: caches and masks padded on the left to one length."""
        from transformers import DynamicCache

        if len(parts) == 1:
            return parts[0]
        length = max(mask.shape[1] for _, mask, _ in parts)
        pad = lambda t, dim: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1 - dim) + (length - t.shape[dim], 0))  # noqa: E731
        cache = DynamicCache(config=self.model.config)
        for index in range(len(parts[0][0].layers)):
            keys = torch.cat([pad(c.layers[index].keys, 2) for c, _, _ in parts])
            values = torch.cat([pad(c.layers[index].values, 2) for c, _, _ in parts])
            cache.update(keys, values, index)
        mask = torch.cat([pad(m, 1) for _, m, _ in parts])
        return cache, mask, torch.cat([t for _, _, t in parts])

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16, progress=None,
                 decode_rows: int | None = None) -> list[str]:
        """Greedy answers (at most max_new_tokens each, up to EOS). Prompts are prefilled at most
        `batch_size` at a time (fewer where padding would pass 10 %); prefilled batches then decode
        together up to `decode_rows` rows (default 4 x batch_size: a token step costs little more
        for 256 rows than for 64 on a CPU)."""
        seqs = [chat_ids(self.tok, p, self.chat_template)[-self.max_prompt_tokens:] for p in prompts]
        out: list[str] = [""] * len(seqs)
        if not seqs or max_new_tokens < 1:
            return out
        shared = shared_prefix_length(seqs)
        prefix = self._prefix_cache(seqs[0][:shared])
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = length_batches(order, [len(s) - shared for s in seqs], batch_size)
        groups = row_groups(batches, decode_rows or 4 * batch_size)
        for group in (progress(groups) if progress else groups):
            parts = [self._prefill([seqs[i] for i in idx], shared, prefix) for idx in group]
            cache, mask, tokens = self._merge(parts)
            rows = [i for idx in group for i in idx]  # the prompt of each row still decoding
            answers: dict[int, list[int]] = {i: [] for i in rows}
            for step in range(max_new_tokens):
                alive = []
                for r, i in enumerate(rows):
                    token = int(tokens[r])
                    if token not in self.eos:
                        answers[i].append(token)
                        alive.append(r)
                if not alive or step == max_new_tokens - 1:
                    break
                if len(alive) < len(rows):  # answered rows leave the batch, cache rows too
                    keep = torch.tensor(alive, dtype=torch.long)
                    cache.batch_select_indices(keep)
                    mask, tokens = mask[keep], tokens[keep]
                    rows = [rows[r] for r in alive]
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
                tokens = self._forward(tokens[:, None], mask, cache).argmax(dim=-1)
            for i in answers:
                out[i] = self.tok.decode(answers[i], skip_special_tokens=True).strip()
        return out


def shared_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own (the last
    prompt token must run in its batch: its logits give the first answer token)."""
    limit = min(len(s) for s in seqs) - 1
    n = 0
    first = seqs[0]
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def length_batches(order: list[int], lengths: list[int], batch_size: int, waste: float = 0.1) -> list[list[int]]:
    """Consecutive runs of `order` (ascending length) of at most batch_size, closed early where the
    next prompt would make padding more than `waste` of the batch's tokens."""
    batches: list[list[int]] = []
    run: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if run and (len(run) >= batch_size or (len(run) + 1) * n - (total + n) > waste * (len(run) + 1) * n):
            batches.append(run)
            run, total = [], 0
        run.append(i)
        total += n
    return batches + [run] if run else batches


def row_groups(batches: list[list[int]], rows: int) -> list[list[list[int]]]:
    """Consecutive batches, grouped while their rows stay within `rows` (a batch larger alone is its own group)."""
    groups: list[list[list[int]]] = []
    for batch in batches:
        if groups and sum(map(len, groups[-1])) + len(batch) <= rows:
            groups[-1].append(batch)
        else:
            groups.append([batch])
    return groups
