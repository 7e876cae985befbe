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
    """Greedy decoding of many prompts: length-sorted, left-padded batches."""

    def __init__(self, model, adapter=None, tokenizer=None, dtype: str = "bfloat16", chat_template: bool = True,
                 max_prompt_tokens: int = 256):
        from mscp.core.prompts import load_tokenizer

        self.model = model if isinstance(model, torch.nn.Module) else load_model(model, adapter, dtype)
        tok_path = tokenizer or (None if isinstance(model, torch.nn.Module) else model)
        self.tok = tokenizer if (tokenizer is not None and not isinstance(tokenizer, (str, Path))) else load_tokenizer(tok_path)
        self.chat_template, self.max_prompt_tokens = chat_template, max_prompt_tokens
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16, progress=None) -> list[str]:
        seqs = [chat_ids(self.tok, p, self.chat_template)[-self.max_prompt_tokens:] for p in prompts]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[str] = [""] * len(seqs)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        it = progress(batches) if progress else batches
        eos = self.tok.eos_token_id
        for idx in it:
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
                mask[row, width - len(seqs[i]):] = 1
            gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.pad_id, eos_token_id=eos)
            for row, i in enumerate(idx):
                out[i] = self.tok.decode(gen[row, width:], skip_special_tokens=True).strip()
        return out
