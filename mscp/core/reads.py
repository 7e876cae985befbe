"""What a patch reads of the two models' weights, stage by stage (the report's `weight_reads`), and,
inside `count_flops()`, what it computes.

On a GPU a large patch is bound by reading weights, so bytes read carry over to any machine where
seconds do not: `passes` is the bytes read over one read of both models (base + aligned), the
unit the goals are stated in (issue 22: the single-pass score reads about 1 pass). Where it is
bound by compute (a CPU), the floating-point operations are the figure that carries over: counted
only when asked (`count_flops`), since every operator then goes through torch's counter.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_counter = None  # the FlopCounterMode of the innermost count_flops(), else None


@contextmanager
def count_flops() -> Iterator[None]:
    """While inside, each patch also counts its floating-point operations per stage (torch's
    FlopCounterMode: matrix products and attention, forward and backward; element-wise work and
    mscp's own ops, small beside the layers' products, are not counted), in its report's
    `weight_reads["flops"]`. Slower: for benchmarks, not patches."""
    from torch.utils.flop_counter import FlopCounterMode

    global _counter
    outer, _counter = _counter, FlopCounterMode(display=False)
    try:
        with _counter:
            yield
    finally:
        _counter = outer


class WeightReads:
    """Counts the base's and the aligned model's bytes read (their checkpoints' `bytes_read`)
    between `mark` calls, and inside `count_flops` the FLOPs too; what was counted since the last
    mark goes to the stage named."""

    def __init__(self, *checkpoints):
        self.checkpoints = checkpoints
        self.counter = _counter
        self.stages: dict[str, int] = {}
        self.flop_stages: dict[str, int] = {}
        self._last = self._total()
        self._last_flops = self._flops()

    def _total(self) -> int:
        return sum(c.bytes_read for c in self.checkpoints)

    def _flops(self) -> int:
        return self.counter.get_total_flops() if self.counter is not None else 0

    def mark(self, stage: str) -> None:
        now, flops = self._total(), self._flops()
        _add(self.stages, stage, now - self._last)
        _add(self.flop_stages, stage, flops - self._last_flops)
        self._last, self._last_flops = now, flops

    def record(self) -> dict:
        size = sum(c.tensor_bytes for c in self.checkpoints)
        total = sum(self.stages.values())
        out = {"stages": dict(self.stages), "total": total, "one_pass": size,
               "passes": round(total / size, 4) if size else None,
               "stage_passes": {k: round(v / size, 4) for k, v in self.stages.items()} if size else {}}
        if self.counter is not None:
            out["flops"] = {"stages": dict(self.flop_stages), "total": sum(self.flop_stages.values())}
        return out


def _add(stages: dict[str, int], stage: str, amount: int) -> None:
    if amount:
        stages[stage] = stages.get(stage, 0) + amount
