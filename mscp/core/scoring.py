"""Level 2: safety neurons (docs/method.md, "Level 2").

Per targeted module, the RMS of each input channel over the valid tokens of a prompt set
(n^H: aligned model on harmful prompts; n^T: fine-tuned model on task prompts), then Wanda row
scores summed over a row:
    I^H_i = sum_j |W_a[i,j]| n^H_j        I^T_i = sum_j |W_a + s B A|[i,j] n^T_j
and the safety rows S = TopRows(I^H, q) minus TopRows(I^T, p).
"""
from __future__ import annotations

import torch
from torch import nn

from mscp.core.adapter import Adapter, LoraModule
from mscp.core.sequential import Observer
from mscp.core.streaming import Stream
from mscp.errors import MSCPError
from mscp.kernels import channel_sumsq, row_importance


class ChannelStats:
    """Running per-channel sum of squares and token count of a module's input."""

    def __init__(self, d_in: int, device):
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        channel_sumsq(x, token_mask, self.sumsq, self.count)

    def rms(self) -> torch.Tensor:
        return (self.sumsq / self.count.clamp(min=1)).sqrt()


def record_inputs(modules: dict[str, nn.Linear], stats: dict[str, ChannelStats], token_mask) -> list:
    """Pre-hooks adding each module's input to its stats, over the tokens `token_mask()` selects."""
    def make(name):
        def hook(_module, args):
            stats[name].add(args[0], token_mask())
        return hook

    return [modules[name].register_forward_pre_hook(make(name)) for name in stats]


def apply_lora(modules: dict[str, nn.Linear], lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> list:
    """Forward hooks that turn W_a x into (W_a + s B A) x without forming B A."""
    def make(A, B, s):
        def hook(_module, args, out):
            return plus_lora(out, args[0] @ A.T, B, s)
        return hook

    return [modules[name].register_forward_hook(make(A, B, s)) for name, (A, B, s) in lora.items()]


def plus_lora(out: torch.Tensor, u: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """out + s u B^T (u = A x) as one matrix product that adds into out: no full-size temporaries
    (s u B^T, then the sum): 7 % of a check pass on the organism (docs/results/scale.md, stop 26)."""
    d = out.shape[-1]
    return torch.addmm(out.reshape(-1, d), u.reshape(-1, u.shape[-1]), B.T, alpha=s).view(out.shape)


def linears_of(layer: nn.Module, index: int, names) -> dict[str, nn.Linear]:
    """name inside the layer -> linear module."""
    out = {}
    for rel in sorted(names):
        module = layer.get_submodule(rel)
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            raise MSCPError(f"adapter module layers.{index}.{rel} is not a linear layer")
        out[rel] = module
    return out


class LoraAdded(Observer):
    """The fine-tuned stream: the aligned layer with an adapter's LoRA added by forward hooks."""

    def __init__(self, stream: Stream, lora: Adapter, by_layer: dict[int, dict[str, LoraModule]]):
        self.stream, self.lora, self.by_layer = stream, lora, by_layer

    def hooks(self, stream, index, layer):
        mods = self.by_layer.get(index, {})
        if stream is not self.stream or not mods:
            return []
        w = next(layer.parameters())
        weights = {rel: (self.lora.tensors[m.key_a].to(w.device, w.dtype), self.lora.tensors[m.key_b].to(w.device, w.dtype),
                         m.scale) for rel, m in mods.items()}
        return apply_lora(linears_of(layer, index, mods), weights)


class WandaScores(Observer):
    """Wanda row scores |W| n of the modules `names[index]`, n the RMS of each input channel over
    the tokens of `stream` (all of them, or those of one prompt group). With `lora`, W is the
    fine-tuned weight W_a + s B A, formed a block of rows at a time by the row_importance op.
    scores[index][name] = (d_out,) fp32, for the layers in `layers` (default: all)."""

    def __init__(self, stream: Stream, names: dict[int, set[str]], *, group: int | None = None,
                 lora: tuple[Adapter, dict[int, dict[str, LoraModule]]] | None = None, layers=None):
        self.stream, self.names, self.group, self.lora = stream, names, group, lora
        self.layers = None if layers is None else set(layers)
        self.scores: dict[int, dict[str, torch.Tensor]] = {}
        self.rms: dict[int, dict[str, torch.Tensor]] = {}  # n per module: the per-weight scores need it
        self._stats: dict[str, ChannelStats] = {}

    def _active(self, stream, index) -> bool:
        return stream is self.stream and bool(self.names.get(index)) and (self.layers is None or index in self.layers)

    def _mask(self):
        b = self.stream.batch
        mask = b.token_mask if self.group is None else b.token_mask & (b.group == self.group)[:, None]
        return mask.to(self._device)

    def hooks(self, stream, index, layer):
        if not self._active(stream, index):
            return []
        linears = linears_of(layer, index, self.names[index])
        self._device = next(layer.parameters()).device
        self._stats = {rel: ChannelStats(m.weight.shape[1], self._device) for rel, m in linears.items()}
        return record_inputs(linears, self._stats, self._mask)

    def after(self, stream, index, layer):
        if not self._active(stream, index):
            return
        out = {}
        self.rms[index] = {rel: stats.rms().cpu() for rel, stats in self._stats.items()}
        for rel, stats in self._stats.items():
            W = layer.get_submodule(rel).weight
            if self.lora is None:
                out[rel] = row_scores(W, stats.rms()).cpu()
            else:
                lora, by_layer = self.lora
                m = by_layer[index][rel]
                A, B = lora.tensors[m.key_a].to(W.device), lora.tensors[m.key_b].to(W.device)
                out[rel] = row_scores(W, stats.rms(), B, A, m.scale).cpu()
        self.scores[index] = out
        self._stats = {}


def row_scores(W: torch.Tensor, channel_rms: torch.Tensor, B=None, A=None, scale: float = 1.0) -> torch.Tensor:
    """Wanda row importance |W + s B A| @ n, fp32 (d_out,)."""
    return row_importance(W, B, A, float(scale), channel_rms.float().reshape(-1, 1)).reshape(-1)


def top_rows(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * d_out) highest scores; ties broken by lower index."""
    k = round(fraction * scores.numel())
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    return order[:k]


def safety_rows(i_harmful: torch.Tensor, i_task: torch.Tensor, q: float, p: float) -> torch.Tensor:
    """S = TopRows(I^H, q) minus TopRows(I^T, p), sorted."""
    safety = top_rows(i_harmful, q)
    task = top_rows(i_task, p)
    return torch.sort(safety[~torch.isin(safety, task)]).values


def weight_safety_mass(W: torch.Tensor, rms_harmful: torch.Tensor, rms_task: torch.Tensor, q: float, p: float,
                       B=None, A=None, scale: float = 1.0) -> torch.Tensor:
    """wanda_weight (Wei et al. 2024's set difference, per weight): per weight S^H = |W_a| n^H and
    S^T = |W_a + s B A| n^T; the safety-only weights are the top q of S^H (over the module) that are
    not in the top p of S^T; a row's score is the mass of its safety-only weights, sum S^H. Float64
    over one module at a time (d_out x d_in), formed here and dropped."""
    Wa = W.double()
    sh = Wa.abs() * rms_harmful.double().to(Wa.device)[None, :]
    Wf = Wa if B is None else Wa + scale * (B.double().to(Wa.device) @ A.double().to(Wa.device))
    st = Wf.abs() * rms_task.double().to(Wa.device)[None, :]
    n = sh.numel()
    keep = sh >= _threshold(sh, round(q * n))
    if p > 0:
        keep &= st < _threshold(st, round(p * n))
    return (sh * keep).sum(dim=1).float().cpu()


def _threshold(x: torch.Tensor, k: int) -> float:
    """The k-th largest value of x (+inf for k = 0: nothing reaches it)."""
    if k <= 0:
        return float("inf")
    flat = x.reshape(-1)
    return torch.kthvalue(flat, flat.numel() - min(k, flat.numel()) + 1).values.item()


def global_safety_rows(harmful: dict[str, torch.Tensor], task: dict[str, torch.Tensor] | None, q: float,
                       p: float, count: int | None = None) -> dict[str, torch.Tensor]:
    """The attribution score's selection, over all modules at once (its scores share a unit, the
    change of a log-likelihood): the top q fraction of all candidate rows by the harmful score (or
    the top `count` rows, the adaptive budget's), among rows whose edit raises the refusal's
    likelihood (score > 0), minus the top p fraction by task damage (the edit lowers the task
    answer's likelihood: -task > 0). Per module key, sorted rows. task is read only when p > 0 (at
    p 0 the pipeline does not compute it)."""
    keys = sorted(harmful)
    if not keys:
        return {}
    h = torch.cat([harmful[k].double() for k in keys])
    owner = torch.cat([torch.full((harmful[k].numel(),), i) for i, k in enumerate(keys)])
    local = torch.cat([torch.arange(harmful[k].numel()) for k in keys])
    n = h.numel()
    order = torch.sort(h, descending=True, stable=True).indices[: round(q * n) if count is None else count]
    chosen = order[h[order] > 0]
    if p > 0:
        if task is None or any(task.get(k) is None for k in keys):
            raise MSCPError("p > 0 needs the task scores, and these scores were computed without them (p = 0)")
        t = torch.cat([task[k].double() for k in keys])
        damage = torch.sort(-t, descending=True, stable=True).indices[: round(p * n)]
        damage = damage[-t[damage] > 0]
        chosen = chosen[~torch.isin(chosen, damage)]
    out = {}
    for i, k in enumerate(keys):
        rows = local[chosen[owner[chosen] == i]]
        out[k] = torch.sort(rows).values
    return out


def rows_for_gain(harmful: dict[str, torch.Tensor], gain: float, limit: int,
                  rank: dict[str, torch.Tensor] | None = None) -> int:
    """The fewest top rows (global_safety_rows' order by `rank`, the harmful score if None) whose
    harmful scores sum to `gain`, the first-order estimate of what their edits win back; `limit` if
    even that many do not reach it. Rows global_safety_rows never edits (rank <= 0) add nothing."""
    if gain <= 0 or not harmful:
        return 0
    keys = sorted(harmful)
    h = torch.cat([harmful[k].double() for k in keys])
    r = h if rank is None else torch.cat([rank[k].double() for k in keys])
    order = torch.sort(r, descending=True, stable=True).indices[:limit]
    reached = torch.nonzero(torch.cumsum(h[order].clamp(min=0) * (r[order] > 0), 0) >= gain)
    return int(reached[0]) + 1 if reached.numel() else min(limit, h.numel())


def safety_rank(rows: dict[str, dict[str, torch.Tensor]], benign_penalty: float) -> dict[str, torch.Tensor]:
    """The order in which the attribution score selects rows (global_safety_rows' `harmful`): the
    harmful score a_i less `benign_penalty` times b_i, the rise of the refusal opening's likelihood on
    the benign prompts that the row's edit brings (only a rise counts; "benign_refusal", already in
    a_i's unit: per prompt, times the harmful prompts). benign_penalty 0: a_i alone."""
    if benign_penalty == 0:
        return {key: sc["harmful"] for key, sc in rows.items()}
    return {key: sc["harmful"].double() - benign_penalty * sc["benign_refusal"].double().clamp(min=0)
            for key, sc in rows.items()}
