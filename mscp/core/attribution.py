"""Level 2, the attribution score: the first-order effect of each row's edit on what the model says.

For a LoRA module with output y = W_a x + s B (A x), the projection changes row i of B by E_i (the
edit: alpha (C B - B)_i), and so changes y_i by d_i(x) = s (E A x)_i. The first-order change of the
log-likelihood of a target answer, summed over tokens and prompts, is

    a_i = sum_{prompts, tokens} (d log p(target) / d y_i) * d_i

computed in the fine-tuned model (aligned + LoRA) with one forward and one backward pass, and no
training: nothing is updated. Two such scores per row:

    harmful  targets: the aligned model's own greedy answers to the harmful prompts (its refusals).
             a_i > 0: editing row i brings the refusal back.
    task     targets: the fine-tuned model's own greedy answers to the task prompts.
             a_i < 0: editing row i costs the task.

Unlike Wanda scores (|W| times input size, the same ranking on any prompt set), these measure what
the LoRA's update on a row does to the answer that matters, so safety rows and task rows part.

Streamed like everything else: targets are generated one token per pass over the layers (no layer
is ever loaded whole with another), the forward pass keeps each layer's input in a scratch folder
(memory flat in depth), and the backward pass walks the layers in reverse, recomputing one layer at
a time from its stored input and carrying the gradient down to the first scored layer.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from mscp.core.adapter import Adapter, LoraModule
from mscp.core.prompts import Batch, by_prompt, make_target_batches
from mscp.core.scoring import LoraAdded, linears_of, plus_lora
from mscp.core.sequential import Observer, Step, advance_with, sweep
from mscp.core.shared_prefix import shared_length, with_prefix
from mscp.core.streaming import Head, ModelShell, Stream, hooks
from mscp.kernels import lora_attribution

Lora = tuple[Adapter, dict[int, dict[str, LoraModule]]]  # an adapter and its modules by layer


def greedy_answers(model: ModelShell, head: Head, prompts: list[list[int]], n_tokens: int, *, eos: set[int],
                   batch_size: int, pad_id: int, lora: Lora | None = None, progress=None,
                   resident_bytes: int = 0) -> list[list[int]]:
    """Each prompt's greedy continuation (at most n_tokens, ending at an EOS token), streamed: one
    pass over the layers per token, each layer keeping its own KV cache, prompts left-padded.
    Layers stay loaded across tokens up to `resident_bytes` (ModelShell.resident): a model that
    fits is read once, not once per token; the answers are the same either way."""
    return scored_greedy_answers(model, head, prompts, n_tokens, eos=eos, batch_size=batch_size, pad_id=pad_id,
                                 lora=lora, progress=progress, resident_bytes=resident_bytes)[0]


def scored_greedy_answers(model: ModelShell, head: Head, prompts: list[list[int]], n_tokens: int, *,
                          eos: set[int], batch_size: int, pad_id: int, lora: Lora | None = None, progress=None,
                          resident_bytes: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    """`greedy_answers`, and the log-likelihood of each answer token under the model that chose it,
    taken from the logits that chose it: the model's own log-likelihood of its answers without the
    teacher-forced pass that would otherwise measure it (the adaptive budget's reference)."""
    with model.resident(resident_bytes):
        return _greedy_answers(model, head, prompts, n_tokens, eos=eos, batch_size=batch_size, pad_id=pad_id,
                               lora=lora, progress=progress)


def _greedy_answers(model: ModelShell, head: Head, prompts: list[list[int]], n_tokens: int, *, eos: set[int],
                    batch_size: int, pad_id: int, lora: Lora | None, progress
                    ) -> tuple[list[list[int]], list[list[float]]]:
    from transformers import DynamicCache

    answers: list[list[int]] = [[] for _ in prompts]
    logliks: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    groups = [list(range(start, min(start + batch_size, len(prompts)))) for start in range(0, len(prompts), batch_size)]
    masks, caches, step_ids = [], [], []
    for rows in groups:
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.int64)
            mask[r, width - len(prompts[i]):] = 1
        masks.append(mask)
        step_ids.append(ids)
        caches.append(DynamicCache(config=model.config))
    bar = progress(total=n_tokens, desc="answer tokens") if progress else None  # one bar for the stage
    for step in range(n_tokens):
        batches, extra = [], []
        for g, rows in enumerate(groups):
            mask = masks[g]
            width = step_ids[g].shape[1]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
            batches.append(Batch(step_ids[g], mask, torch.full((len(rows),), width - 1), torch.zeros(len(rows))))
            extra.append({"cache": caches[g], "use_cache": True, "position_ids": positions.to(model.device)})
        stream = model.capture({"gen": batches}, extra={"gen": extra})["gen"]
        observers = [LoraAdded(stream, *lora)] if lora else []
        sweep([Step(model, i, [stream]) for i in range(model.n_layers)], advance_with(observers))
        with torch.no_grad():
            for g, rows in enumerate(groups):
                logits = head.logits(stream.hidden[g][:, -1])
                tokens = logits.argmax(dim=-1)
                chosen = _token_logliks(logits, tokens).double().cpu()
                for r, i in enumerate(rows):
                    if not done[i]:
                        answers[i].append(int(tokens[r]))
                        logliks[i].append(float(chosen[r]))
                        done[i] = int(tokens[r]) in eos
                step_ids[g] = tokens[:, None].cpu()
                masks[g] = torch.cat([masks[g], torch.ones((len(rows), 1), dtype=torch.int64)], dim=1)
        if bar is not None:
            bar.update(1)
        if all(done):
            break
    if bar is not None:
        bar.close()
    return answers, logliks


class _ScratchStore:
    """Hidden states by (layer, micro-batch) in a scratch folder: memory stays flat in depth."""

    def __init__(self, root: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="mscp-attribution-", dir=root))

    def put(self, index: int, k: int, tensor: torch.Tensor) -> None:
        torch.save(tensor.detach().cpu(), self.dir / f"{index}_{k}.pt")

    def take(self, index: int, k: int, device) -> torch.Tensor:
        path = self.dir / f"{index}_{k}.pt"
        tensor = torch.load(path, map_location=device, weights_only=True)
        path.unlink()
        return tensor

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _KeepInputs(Observer):
    """Stores each layer's input (hidden states and layer kwargs) from `first` on, for the backward pass."""

    def __init__(self, stream: Stream, first: int, store: _ScratchStore, skip: set[int] = frozenset()):
        self.stream, self.first, self.store, self.skip = stream, first, store, skip  # skip: micro-batches not kept
        self.kwargs: dict[int, list[dict]] = {}

    def before(self, stream, index, layer):
        if stream is self.stream and index >= self.first:
            for k, h in enumerate(stream.hidden):
                if k not in self.skip:
                    self.store.put(index, k, h)
            self.kwargs[index] = [per_batch[index] for per_batch in stream.layer_kwargs]


def _target_loglik_grads(head: Head, stream: Stream) -> tuple[list[torch.Tensor], list[float]]:
    """Per micro-batch: d (sum of its target log-likelihoods) / d (its last hidden states), and that sum."""
    grads, totals = [], []
    for h, batch in zip(stream.hidden, stream.batches):
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            ll = _loglik(head, h, batch)
            ll.backward()
        grads.append(h.grad.detach())
        totals.append(ll.item())
    return grads, totals


def _loglik(head: Head, h: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The sum of a micro-batch's target-token log-likelihoods from its last hidden states; the
    head is applied to the positions that predict a target token only."""
    return _row_logliks(head, h, batch).sum()


def _row_logliks(head: Head, h: torch.Tensor, batch: Batch, first: int | None = None) -> torch.Tensor:
    """Each sequence's target log-likelihood (n,), from the positions that predict a target token
    (its first `first` target tokens only, if given)."""
    return _row_fits(head, h, batch, first, greedy=False)[0]


def _row_fits(head: Head, h: torch.Tensor, batch: Batch, first: int | None = None, greedy: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """_row_logliks, and per sequence whether greedy decoding would emit those target tokens (each
    is its position's most likely token): (n,) float, (n,) bool (None without `greedy`: the
    scoring passes skip the argmax over the vocabulary)."""
    follow = batch.labels.to(h.device)[:, 1:]
    sel = follow != -100
    if first is not None:
        sel &= sel.cumsum(dim=1) <= first
    logits, tokens = head.logits(h[:, :-1][sel]), follow[sel]
    token_ll = _token_logliks(logits, tokens)
    rows = torch.arange(follow.shape[0], device=h.device)[:, None].expand_as(follow)[sel]
    n = follow.shape[0]
    ll = torch.zeros(n, dtype=token_ll.dtype, device=h.device).index_add_(0, rows, token_ll)
    if not greedy:
        return ll, None
    not_top = (logits.argmax(-1) != tokens).long()
    return ll, torch.zeros(n, dtype=torch.int64, device=h.device).index_add_(0, rows, not_top) == 0


def _token_logliks(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) per position (n, vocab) -> (n,), the softmax taken in float32 at least."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]


def _attribution_hook(A, B, s, E, acc):
    """Forward hook: adds the LoRA (gradients flow through it) and, for a scored module, records
    sum over tokens of grad(y) * s (E A x) into `acc` (float64, d_out) during the backward pass,
    as s * sum_k E[i, k] (grad^T u)[i, k] (mscp::lora_attribution): the tokens x d_out effect
    s (u E^T) is never formed, and only u (tokens x r) is kept until the backward pass."""
    def hook(_module, args, out):
        u = args[0] @ A.T
        y = plus_lora(out, u, B, s)
        if E is not None:
            u_kept = u.detach()

            def record(grad):
                acc.add_(lora_attribution(grad, u_kept, E, float(s)).to(acc.device))

            y.register_hook(record)
        return y
    return hook


def attribution_scores(model: ModelShell, head: Head, prompts: list[list[int]], targets: list[list[int]],
                       lora: Lora, edits: dict[str, torch.Tensor], scored: set[int], *, batch_size: int, pad_id: int,
                       scratch: str | Path | None = None, progress=None) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
    """a_i (see the module doc) of every module in the `scored` layers whose lora_B key has an edit
    in `edits` (key_b -> E, d_out x r); returns ({layer: {name: scores}}, total log-likelihood)."""
    return attribution_scores_many(model, head, prompts, targets, [lora], [edits], scored, batch_size=batch_size,
                                   pad_id=pad_id, scratch=scratch, progress=progress)[0]


def attribution_scores_many(model: ModelShell, head: Head, prompts: list[list[int]], targets: list[list[int]],
                            loras: list[Lora | None], edits: list[dict[str, torch.Tensor]], scored: set[int], *,
                            batch_size: int, pad_id: int, scratch: str | Path | None = None, progress=None
                            ) -> list[tuple[dict[int, dict[str, torch.Tensor]], float]]:
    """`attribution_scores` of several adapters on the same prompts and targets, each layer loaded
    once per pass for all of them: `attribution_scores_sets` with one set."""
    return [per_set[0][:2] for per_set in attribution_scores_sets(
        model, head, [(prompts, targets)], loras, edits, scored, batch_size=batch_size, pad_id=pad_id,
        scratch=scratch, progress=progress)]


class SetScores(NamedTuple):
    """One adapter's `attribution_scores_sets` on one set."""

    scores: dict[int, dict[str, torch.Tensor]]  # layer -> module name -> a_i
    total: float  # the targets' log-likelihood, summed
    opening: torch.Tensor | None  # per prompt, the log-likelihood of the targets' first `opening` tokens
    greedy: torch.Tensor | None = None  # per prompt, whether greedy decoding emits those tokens (bool)


def attribution_scores_sets(model: ModelShell, head: Head, sets: list[tuple[list[list[int]], list[list[int]]]],
                            loras: list[Lora | None], edits: list[dict[str, torch.Tensor]], scored: set[int], *,
                            batch_size: int, pad_id: int, opening: int | None = None, unscored: frozenset = frozenset(),
                            alone: frozenset | None = None, scratch: str | Path | None = None, progress=None
                            ) -> list[list[SetScores | None]]:
    """Per adapter, per set of (prompts, targets): `attribution_scores`, and with `opening` each
    prompt's TargetFit of its target's first `opening` tokens; the sets whose index is
    in `unscored` run forward only (their scores stay empty). One forward pass with one
    stream per adapter, then a backward pass that recomputes each adapter's layer from its stored
    input; every layer is loaded once per pass for all adapters and sets. A sequence's gradient
    depends on its own tokens only, so each set's scores are what it gets alone (its micro-batches
    add to its own sums), and so are each adapter's. A None in `loras` is the model alone: it scores
    nothing ({}) and gives the model's own log-likelihood of each set's targets, from the same
    forward pass (no backward); of the sets in `alone` only, if given (None for the others)."""
    first = min(scored)
    batches, owner = [], []  # micro-batches of every set, and the set each belongs to
    for g, (prompts, targets) in enumerate(sets):
        made = make_target_batches(prompts, targets, 0, batch_size, pad_id)
        batches += made
        owner += [g] * len(made)
    apart = alone is not None and None in loras  # the model alone runs only some sets: its own capture
    runs_alone = [k for k, g in enumerate(owner) if not apart or g in alone]  # what a None stream runs
    captured = model.capture({"targets": batches} | ({"alone": [batches[k] for k in runs_alone]} if apart else {}))
    streams, owners = [], []
    for lora in loras:
        name = "alone" if lora is None and apart else "targets"
        streams.append(captured[name].copy() if any(s is captured[name] for s in streams) else captured[name])
        owners.append(owner if lora is not None else [owner[k] for k in runs_alone])
    for name, stream in captured.items():  # a capture no stream took
        if not any(s is stream for s in streams):
            stream.release()
    stores = [_ScratchStore(scratch) if lora is not None else None for lora in loras]
    try:
        forward_only = {k for k, s in enumerate(owner) if s in unscored}
        keeps = [_KeepInputs(stream, first, store, forward_only) for stream, store in zip(streams, stores)
                 if store is not None]
        observers = [LoraAdded(stream, *lora) for stream, lora in zip(streams, loras) if lora is not None]
        sweep([Step(model, i, streams) for i in range(model.n_layers)], advance_with(observers + keeps),
              progress=progress, desc="forward")
        grads, totals, openings = [], [], []
        for stream, lora, own in zip(streams, loras, owners):
            openings.append(_per_prompt(head, stream, own, len(sets), opening) if opening else [None] * len(sets))
            g, per_batch = _target_loglik_grads(head, stream) if lora is not None else ([], _logliks(head, stream))
            grads.append(g)
            totals.append([sum(ll for ll, o in zip(per_batch, own) if o == s) for s in range(len(sets))])
            stream.release()
        scores: list[list[dict[int, dict[str, torch.Tensor]]]] = [[{} for _ in sets] for _ in loras]
        scoring = [j for j, lora in enumerate(loras) if lora is not None]
        keep_of = dict(zip(scoring, keeps))

        def backward(step: Step, layer) -> None:
            for j in scoring:
                adapter, by_layer = loras[j]
                accs = _backward_layer(layer, step.index, adapter, by_layer.get(step.index, {}), edits[j], scored,
                                       batches, owner, len(sets), unscored, keep_of[j], stores[j], grads[j])
                for s, acc in enumerate(accs):
                    if acc:
                        scores[j][s][step.index] = acc

        steps = [Step(model, i) for i in reversed(range(first, model.n_layers))]
        sweep(steps, backward, progress=progress, desc="backward")
    finally:
        for store in stores:
            if store is not None:
                store.close()
    ran = [alone if lora is None and apart else range(len(sets)) for lora in loras]  # the sets each stream ran
    return [[SetScores(per, tot, *(fit or (None, None))) if g in sets_run else None
             for g, (per, tot, fit) in enumerate(zip(per_set, total, opened))]
            for per_set, total, opened, sets_run in zip(scores, totals, openings, ran)]


class TargetFit(NamedTuple):
    """Per prompt, how a model fits its target."""

    loglik: torch.Tensor  # the target's log-likelihood, float64
    greedy: torch.Tensor  # whether greedy decoding emits the target, bool


def _per_prompt(head: Head, stream: Stream, owner: list[int], n_sets: int, first: int | None = None
                ) -> list[TargetFit]:
    """Per set (`owner`: each micro-batch's), each prompt's TargetFit of its target (its first
    `first` tokens only, if given) at the end of a stream, in the set's own order."""
    with torch.no_grad():
        fits = [_row_fits(head, h, batch, first) for h, batch in zip(stream.hidden, stream.batches)]
    per_set = []
    for s in range(n_sets):
        own = [(fit, b) for fit, b, o in zip(fits, stream.batches, owner) if o == s]
        batches = [b for _, b in own]
        per_set.append(TargetFit(by_prompt([f[0].double().cpu() for f, _ in own], batches),
                                 by_prompt([f[1].cpu() for f, _ in own], batches).bool()))
    return per_set


def target_logliks(model: ModelShell, head: Head, prompts: list[list[int]], targets: list[list[int]],
                   loras: list[Lora | None], *, batch_size: int, pad_id: int, progress=None) -> list[TargetFit]:
    """How the model with each LoRA added (None: the model alone) fits each prompt's target (its
    log-likelihood, and whether greedy decoding emits it), from one forward pass with each layer
    loaded once for all of them; nothing is scored. The tokens every prompt opens with run once per
    LoRA (core/shared_prefix.py)."""
    shared = shared_length(prompts)
    batches = make_target_batches([p[shared:] for p in prompts], targets, 0, batch_size, pad_id)
    captured_batches, extra = with_prefix(model, prompts[0][:shared], batches) if shared else (batches, None)
    captured = model.capture({"targets": captured_batches}, extra and {"targets": extra})["targets"]
    streams = [captured] + [captured.copy() for _ in loras[1:]]
    observers = [LoraAdded(stream, *lora) for stream, lora in zip(streams, loras) if lora is not None]
    sweep([Step(model, i, streams) for i in range(model.n_layers)], advance_with(observers), progress=progress,
          desc="check")
    for stream in streams:  # the prefix's micro-batch has done its part
        stream.hidden, stream.batches = stream.hidden[len(captured_batches) - len(batches):], batches
    per_prompt = [_per_prompt(head, stream, [0] * len(batches), 1)[0] for stream in streams]
    for stream in streams:
        stream.release()
    return per_prompt


def _logliks(head: Head, stream: Stream) -> list[float]:
    """Per micro-batch, the sum of its target tokens' log-likelihoods at the end of a stream (no gradient)."""
    with torch.no_grad():
        return [_loglik(head, h, batch).item() for h, batch in zip(stream.hidden, stream.batches)]


def _backward_layer(layer, index: int, adapter, mods: dict[str, LoraModule], edits: dict[str, torch.Tensor],
                    scored: set[int], batches, owner: list[int], n_sets: int, unscored: frozenset, keep: _KeepInputs,
                    store: _ScratchStore, grads: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One adapter's step of the backward pass through `layer`: recompute it (LoRA added) from the
    stored input, carry `grads` down (in place) and return, per set, the scored modules' a_i (each
    micro-batch adds to its own set's: `owner`)."""
    linears = linears_of(layer, index, mods)
    w = next(layer.parameters())
    targeted = [rel for rel, m in mods.items() if index in scored and m.key_b in edits]
    accs = [{rel: torch.zeros(linears[rel].weight.shape[0], dtype=torch.float64, device=w.device) for rel in targeted}
            if s not in unscored else {} for s in range(n_sets)]
    for k in range(len(batches)):
        if owner[k] in unscored:  # forward only: nothing to carry down
            continue
        x = store.take(index, k, w.device).to(w.dtype).requires_grad_(True)
        handles = []
        for rel, m in mods.items():
            A = adapter.tensors[m.key_a].to(w.device, w.dtype)
            B = adapter.tensors[m.key_b].to(w.device, w.dtype)
            E = edits[m.key_b].to(w.device, w.dtype) if rel in accs[owner[k]] else None
            handles.append(linears[rel].register_forward_hook(_attribution_hook(A, B, m.scale, E,
                                                                                accs[owner[k]].get(rel))))
        with torch.enable_grad(), hooks(handles):
            out = layer(x, **keep.kwargs[index][k])
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward(out, grads[k])
        grads[k] = x.grad.detach()
    return [{rel: acc.cpu() for rel, acc in per_set.items()} for per_set in accs]
