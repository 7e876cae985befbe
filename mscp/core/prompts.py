"""Prompt files and calibration batches.

Prompt files (`read_prompts`): `.txt` (one prompt a line), `.jsonl` (one record a line), `.json`
(one array), `.csv` (a "prompt" or "goal" column). Prompts are rendered with the tokenizer's chat
template (generation prompt added) when it has one, tokenised, truncated to `max_length`, and
right-padded into micro-batches, so a prompt's last token sits at `length - 1` and its positions
match an unpadded forward.
"""
from __future__ import annotations

import csv
import io
import random
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mscp.core.textfiles import json_type, parse_json, read_text, unicode_problem
from mscp.errors import MSCPError, MSCPWarning

DEFAULT_SETS = {"harmful": "harmful_default.txt", "benign": "benign_default.txt"}
SAMPLE_SEED = 0  # the seed of `sample_prompts`, recorded with every sample


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompt file, read by its suffix:

      .jsonl  one JSON object a line; .json  one JSON array, of prompt strings or of such objects.
              An object gives its "prompt" string, or, as a chat record ({"messages": [{"role":
              "user", "content": "..."}, ...]}), the content of its last user message.
      .csv    the "prompt" column, else the "goal" column (AdvBench, JailbreakBench).
      other   (.txt) one prompt a line.

    Prompts are stripped and blank ones dropped. Anything else (a record of another shape, a file
    with no prompt, text that is not Unicode, a path that is not a regular file) is one MSCPError
    line naming the file and the line or item."""
    path = Path(path)
    text = read_text(path, "prompt file")  # a folder, FIFO or device is refused before it is opened
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = [_record_prompt(parse_json(line, f"{path}:{n}: not a JSON line"), f"{path}:{n}")
                   for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif suffix == ".json":
        prompts = _json_prompts(text, path)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps newlines inside quoted fields
        try:
            columns = {c.strip().lower(): c for c in reader.fieldnames or []}
            column = columns.get("prompt") or columns.get("goal")  # AdvBench/JBB call it Goal
            if column is None:
                raise MSCPError(f"{path}: no 'prompt' or 'goal' column")
            prompts = [row[column] or "" for row in reader]
        except csv.Error as e:  # e.g. a field over the csv module's limit (128 KiB)
            raise MSCPError(f"{path}:{reader.line_num}: not CSV the csv module reads: {e}") from None
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise MSCPError(f"prompt file is empty: {path}")
    return prompts


def _json_prompts(text: str, path: Path) -> list[str]:
    """A .json prompt file: one array of prompt strings or records."""
    if not text.strip():
        return []
    try:
        items = parse_json(text, f"{path}: not JSON")
    except MSCPError as e:
        if "Extra data" in str(e):  # several values: most likely JSON Lines under a .json name
            raise MSCPError(f"{e}; a file of one JSON record a line is read as JSON Lines when named .jsonl") from None
        raise
    if not isinstance(items, list):
        raise MSCPError(f"{path}: a JSON {json_type(items)}; a .json prompt file holds one array of prompt strings "
                        "or of objects with a 'prompt' field or chat 'messages'")
    prompts = []
    for i, item in enumerate(items):
        where = f"{path}: item [{i}]"
        if isinstance(item, str):
            prompts.append(_unicode(item, where))
        elif isinstance(item, dict):
            prompts.append(_record_prompt(item, where))
        else:
            raise MSCPError(f"{where} is a JSON {json_type(item)}; items must be prompt strings or objects with a "
                            "'prompt' field or chat 'messages'")
    return prompts


def _record_prompt(record, where: str) -> str:
    """A JSON record's prompt: its "prompt" string, or a chat record's last user message."""
    if not isinstance(record, dict):
        raise MSCPError(f"{where}: no 'prompt' field (a JSON {json_type(record)}, not an object)")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):  # null must not become the prompt "None"
            raise MSCPError(f"{where}: 'prompt' must be a string, got {json_type(record['prompt'])}")
        return _unicode(record["prompt"], where)
    if "messages" not in record:
        raise MSCPError(f"{where}: no 'prompt' field nor chat 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise MSCPError(f"{where}: 'messages' must be an array of objects with a 'role' and a 'content'")
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise MSCPError(f"{where}: the chat 'messages' hold no user message")
    content = users[-1].get("content")
    if not isinstance(content, str):
        raise MSCPError(f"{where}: the last user message's 'content' must be a string, got {json_type(content)}")
    return _unicode(content, where)


def _unicode(prompt: str, where: str) -> str:
    problem = unicode_problem(prompt)
    if problem:
        raise MSCPError(f"{where}: the prompt {problem}")
    if "\x00" in prompt:  # a JSON "\u0000", refused as a NUL byte in a .txt file is
        raise MSCPError(f"{where}: the prompt holds a NUL character (\\u0000 at character {prompt.index(chr(0))})")
    return prompt


def sample_prompts(prompts: list[str], limit: int, what: str) -> tuple[list[str], dict | None]:
    """At most `limit` prompts: above it, a seeded random subset kept in the file's order, with a
    warning; returns (prompts, None) or (subset, what was sampled, for the report)."""
    if len(prompts) <= limit:
        return prompts, None
    keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(prompts)), limit))
    warnings.warn(MSCPWarning(f"the {what} prompts number {len(prompts)}; using a sample of {limit} "
                              f"(seed {SAMPLE_SEED}; --max-prompts sets the limit)"), stacklevel=2)
    return [prompts[i] for i in keep], {"available": len(prompts), "used": limit, "seed": SAMPLE_SEED}


def default_prompts(kind: str) -> list[str]:
    """The small built-in prompt sets shipped with the package (see mscp/core/data/)."""
    text = resources.files("mscp.core").joinpath("data", DEFAULT_SETS[kind]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise MSCPError(f"cannot load a tokenizer from {path} (pass --tokenizer DIR): "
                        f"{' '.join(str(e).split())[:200] or type(e).__name__}") from None


def pad_id(tok) -> int:
    """The padding token: the tokenizer's pad, else its EOS, else 0 (every batcher and decoder)."""
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def eos_ids(tok, model_config) -> set[int]:
    """The tokens that end an answer, for every greedy decoder: the tokenizer's EOS and the model
    config's (one id or a list)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eos = getattr(model_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def chat_ids(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """A prompt's token ids as the model sees it when asked: the tokenizer's chat template (one user
    turn and the generation prompt) when it has one, else the plain text with special tokens. The
    one encoder of prompts, for calibration, training and generation alike."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode(tokenizer, prompts: list[str], *, max_length: int, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt (chat_ids), keeping the last max_length: the last token is the one
    the curves read."""
    out = []
    for prompt in prompts:
        ids = chat_ids(tokenizer, prompt, chat_template)[-max_length:]
        if not ids:
            raise MSCPError(f"prompt tokenises to nothing: {prompt[:60]!r}")
        out.append(ids)
    return out


def check_token_ids(tokenizer, batches: list["Batch"], n_embeddings: int | None, names: dict[int, str]) -> None:
    """Every token id of the batches must index a row of the model's embedding: a tokenizer with
    tokens added past it would fail deep inside the forward (IndexError). Checked on the ids the
    prompts produce, so unused added tokens pass. names: group label -> prompt set."""
    if not n_embeddings:
        return
    for batch in batches:
        over = (batch.input_ids >= n_embeddings).nonzero()
        if len(over):
            row, col = over[0].tolist()
            token = int(batch.input_ids[row, col])
            text = tokenizer.convert_ids_to_tokens(token) if hasattr(tokenizer, "convert_ids_to_tokens") else None
            raise MSCPError(f"the tokenizer ({len(tokenizer)} tokens) gives token id {token}"
                            f"{f' ({text!r})' if text else ''} in the {names.get(int(batch.group[row]), '')} prompts, "
                            f"past the model's {n_embeddings} embedding rows: the tokenizer is not the model's "
                            "(--tokenizer DIR picks another)")


@dataclass
class Batch:
    """One right-padded micro-batch of prompts."""

    input_ids: torch.Tensor  # (n, T) int64
    attention_mask: torch.Tensor  # (n, T) int64, 1 on real tokens
    last_index: torch.Tensor  # (n,) position of each prompt's last token
    group: torch.Tensor  # (n,) int64 label of each prompt's set (e.g. 0 harmful, 1 benign)
    labels: torch.Tensor | None = None  # (n, T) int64: the token at each target position, -100 elsewhere
    order: torch.Tensor | None = None  # (n,) int64: each row's index in the list it was made from (target batches)

    @property
    def token_mask(self) -> torch.Tensor:
        return self.attention_mask.bool()


def make_target_batches(prompts: list[list[int]], targets: list[list[int]], group: int, batch_size: int,
                        pad_id: int) -> list[Batch]:
    """Micro-batches of prompt + target sequences whose `labels` mark the target tokens (teacher forcing).
    The sequences are batched shortest first, so that each micro-batch pads to about its own length
    (file order padded the organism's check prompts by 35 %, this order by 12 %); `order` says where
    each row came from (by_prompt puts per-row figures back in the caller's order)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + len(targets[i]), i))
    prompts, targets = [prompts[i] for i in order], [targets[i] for i in order]
    batches = make_batches([p + t for p, t in zip(prompts, targets)], [group] * len(prompts), batch_size, pad_id)
    for start, batch in zip(range(0, len(prompts), batch_size), batches):
        labels = torch.full_like(batch.input_ids, -100)
        for row, (p, t) in enumerate(zip(prompts[start: start + batch_size], targets[start: start + batch_size])):
            labels[row, len(p): len(p) + len(t)] = torch.tensor(t, dtype=torch.int64)
        batch.labels = labels
        batch.order = torch.tensor(order[start: start + batch_size], dtype=torch.int64)
    return batches


def by_prompt(rows: list[torch.Tensor], batches: list[Batch]) -> torch.Tensor:
    """Per-row figures of target micro-batches (one tensor per batch, as make_target_batches made
    them from one list) back in that list's order."""
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    values, order = torch.cat(rows), torch.cat([b.order for b in batches])
    return torch.empty_like(values).index_copy_(0, order, values)


def make_batches(sequences: list[list[int]], groups: list[int], batch_size: int, pad_id: int) -> list[Batch]:
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        last = torch.tensor([len(s) - 1 for s in chunk])
        batches.append(Batch(ids, mask, last, torch.tensor(groups[start : start + batch_size])))
    return batches
