"""Level 1: where the safety layers are (docs/method.md, "Level 1").

From the last-prompt-token hidden states after each layer (index -1 is the embedding output):
    c_t(l)   = mean cos(h_l^base(x), h_l^aligned(x)) over prompts x of set t (harmful, benign)
    sigma(l) = dc_benign(l) - dc_harmful(l),   dc_t(l) = c_t(l) - c_t(l-1)
and Li et al.'s gap inside the aligned model: mean cos over benign-benign pairs minus mean cos
over benign-harmful pairs. The safety layers are the contiguous window of w layers with the
largest sum of the chosen criterion (sigma, or the gap's growth d gap).
"""
from __future__ import annotations

import torch

from mscp.core.config import PatchConfig
from mscp.core.sequential import Observer
from mscp.core.streaming import Stream
from mscp.errors import MSCPError

HARMFUL, BENIGN, TASK = 0, 1, 2  # prompt groups of the streams' micro-batches


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i), in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def li_gap(states: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean benign-benign cosine (distinct pairs) minus mean benign-harmful cosine."""
    x = torch.nn.functional.normalize(states.double(), dim=-1)
    benign, harmful = x[groups == BENIGN], x[groups == HARMFUL]
    n = benign.shape[0]
    if n < 2 or harmful.shape[0] < 1:
        return float("nan")
    bb = benign @ benign.T
    mean_bb = (bb.sum() - bb.diagonal().sum()) / (n * (n - 1))
    return (mean_bb - (benign @ harmful.T).mean()).item()


class CurveRecorder:
    """Collects per-layer statistics as the streams advance."""

    def __init__(self):
        self.c_harmful: list[float] = []  # index 0 is the embedding output
        self.c_benign: list[float] = []
        self.gap: list[float] = []

    def add(self, base_last: torch.Tensor, aligned_last: torch.Tensor, groups: torch.Tensor) -> None:
        self.c_harmful.append(mean_cosine(base_last[groups == HARMFUL], aligned_last[groups == HARMFUL]))
        self.c_benign.append(mean_cosine(base_last[groups == BENIGN], aligned_last[groups == BENIGN]))
        self.gap.append(li_gap(aligned_last, groups))

    def curves(self) -> list[dict]:
        """One record per decoder layer (the embedding entry only seeds the differences)."""
        out = []
        for l in range(1, len(self.c_harmful)):
            dc_h = self.c_harmful[l] - self.c_harmful[l - 1]
            dc_b = self.c_benign[l] - self.c_benign[l - 1]
            out.append({
                "layer": l - 1,
                "c_harmful": self.c_harmful[l], "c_benign": self.c_benign[l],
                "dc_harmful": dc_h, "dc_benign": dc_b, "sigma": dc_b - dc_h,
                "li_gap": self.gap[l], "d_li_gap": self.gap[l] - self.gap[l - 1],
            })
        return out


class Curves(Observer):
    """Records the curves as the base and aligned streams go through each layer (base first)."""

    def __init__(self, base: Stream, aligned: Stream):
        self.base, self.aligned = base, aligned
        self.groups = base.groups()
        self.recorder = CurveRecorder()
        self.recorder.add(base.last_tokens(), aligned.last_tokens(), self.groups)  # the embedding output

    def after(self, stream, index, layer):
        if stream is self.aligned:
            self.recorder.add(self.base.last_tokens(), self.aligned.last_tokens(), self.groups)

    def curves(self) -> list[dict]:
        return self.recorder.curves()


def best_window(values: list[float], width: int) -> tuple[int, int]:
    """(first, last) of the contiguous window of `width` entries with the largest sum (earliest on ties)."""
    if not values:
        raise MSCPError("no layers to choose from")
    width = min(max(1, width), len(values))
    sums = [sum(values[i : i + width]) for i in range(len(values) - width + 1)]
    first = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return first, first + width - 1


def safety_layers(curves: list[dict], config: PatchConfig) -> list[int]:
    n_layers = len(curves)
    if config.layers is not None:
        first, last = config.layers
        if last >= n_layers:
            raise MSCPError(f"--layers {first}-{last} is outside the model's {n_layers} decoder layers (0-{n_layers - 1})")
        return list(range(first, last + 1))
    key = "sigma" if config.criterion == "sigma" else "d_li_gap"
    values = [c[key] for c in curves]
    if any(v != v for v in values):  # NaN: too few prompts for the criterion
        raise MSCPError(f"criterion {config.criterion} needs at least two benign and one harmful prompt")
    first, last = best_window(values, round(config.rho * n_layers))
    return list(range(first, last + 1))
