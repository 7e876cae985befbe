"""Configuration of a patch: every choice METHOD.md leaves open is a field here, with its default.

The whole dataclass is written into each run's report (`mscp_report.json`, key "config").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mscp.errors import MSCPError

CRITERIA = ("sigma", "li_gap")
PROJECTORS = ("safelora", "exact")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
BACKEND_CHOICES = ("auto", "torch", "triton", "cpp", "cuda")
FINETUNED_PASSES = ("auto", "with_calibration", "after_window")


@dataclass
class PatchConfig:
    # Level 1: safety layers
    rho: float = 0.2
    """Window width as a fraction of the decoder layers: w = max(1, round(rho * n_layers))."""
    layers: tuple[int, int] | None = None
    """Explicit safety layers, inclusive (first, last), counted from 0; overrides the criterion."""
    criterion: str = "sigma"
    """'sigma': base/aligned divergence gradient (METHOD.md level 1); 'li_gap': Li et al.'s gap."""

    # Level 2: safety neurons
    q: float = 0.3
    """Safety rows: the top q fraction of each module's rows by harmful-prompt Wanda score."""
    p: float = 0.3
    """Task rows: the top p fraction by task-prompt Wanda score; removed from the safety rows."""

    # Projection
    alpha: float = 1.0
    """Blend towards the projection: B' = B + alpha * M_S (C B - B)."""
    projector: str = "safelora"
    """'safelora': C = V V^T / ||V||_F; 'exact': C = Q Q^T, Q the top-`exact_rank` left singular vectors of V."""
    exact_rank: int = 64
    """Rank of Q for the 'exact' projector."""

    # Calibration
    max_length: int = 256
    """Prompts longer than this many tokens (after the chat template) are truncated."""
    batch_size: int = 16
    """Prompts per forward call through a decoder layer."""
    chat_template: bool = True
    """Apply the tokenizer's chat template (with the generation prompt) when it has one."""

    # Execution
    device: str = "cpu"
    dtype: str = "auto"
    """Compute dtype of the streamed layers; 'auto' takes the checkpoint's. Statistics are always fp32."""
    backend: str = "auto"
    """Kernel backend for the mscp ops: auto, torch, triton, cpp, cuda."""
    finetuned_pass: str = "auto"
    """When the fine-tuned streams (one per adapter) run. 'with_calibration': in the same pass as
    base and aligned, through every layer (the window is not known yet; nothing is read twice).
    'after_window': a second pass once the window is known, through its last layer only, reading
    the aligned layers up to it again. 'auto': after_window for several adapters and no --layers
    (their forward passes grow with the adapters, the re-read does not), else with_calibration."""
    allow_pickle: bool = False
    """Accept .bin/.pt checkpoints (loaded with weights_only=True)."""
    hash_inputs: bool = True
    """Record the sha256 of every input file in the report."""
    progress: bool = True
    """Progress bars on stderr."""

    extra: dict = field(default_factory=dict)
    """Free-form notes carried into the report."""

    def __post_init__(self):
        if not 0 < self.rho <= 1:
            raise MSCPError(f"rho must be in (0, 1], got {self.rho}")
        for name in ("q", "p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise MSCPError(f"{name} must be a fraction in [0, 1], got {value}")
        if self.criterion not in CRITERIA:
            raise MSCPError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.projector not in PROJECTORS:
            raise MSCPError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.dtype not in DTYPES:
            raise MSCPError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layers is not None:
            first, last = self.layers
            if first < 0 or last < first:
                raise MSCPError(f"layers must be a range A-B with 0 <= A <= B, got {first}-{last}")
            self.layers = (int(first), int(last))
        if self.backend not in BACKEND_CHOICES:
            raise MSCPError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.finetuned_pass not in FINETUNED_PASSES:
            raise MSCPError(f"finetuned_pass must be one of {FINETUNED_PASSES}, got {self.finetuned_pass!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise MSCPError("batch_size and max_length must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_layer_range(text: str) -> tuple[int, int]:
    """'10-15' -> (10, 15); '12' -> (12, 12)."""
    try:
        if "-" in text:
            first, last = text.split("-", 1)
            return int(first), int(last)
        return int(text), int(text)
    except ValueError:
        raise MSCPError(f"--layers must look like A-B (e.g. 10-15), got {text!r}") from None
