"""Level 2: safety neurons (METHOD.md).

Per targeted module, the RMS of each input channel over the valid tokens of a prompt set
(n^H: aligned model on harmful prompts; n^T: fine-tuned model on task prompts), then Wanda row
scores summed over a row:
    I^H_i = sum_j |W_a[i,j]| n^H_j        I^T_i = sum_j |W_a + s B A|[i,j] n^T_j
and the safety rows S = TopRows(I^H, q) minus TopRows(I^T, p).
"""
from __future__ import annotations

import torch
from torch import nn

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


def record_inputs(modules: dict[str, nn.Linear], stats: dict[str, ChannelStats], current_mask: list) -> list:
    """Pre-hooks adding each module's input to its stats, over the tokens in `current_mask[0]`."""
    def make(name):
        def hook(_module, args):
            stats[name].add(args[0], current_mask[0])
        return hook

    return [modules[name].register_forward_pre_hook(make(name)) for name in stats]


def apply_lora(modules: dict[str, nn.Linear], lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> list:
    """Forward hooks that turn W_a x into (W_a + s B A) x without forming B A."""
    def make(A, B, s):
        def hook(_module, args, out):
            return out + s * ((args[0] @ A.T) @ B.T)
        return hook

    return [modules[name].register_forward_hook(make(A, B, s)) for name, (A, B, s) in lora.items()]


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
