"""What a patch reads of the two models' weights, stage by stage (the report's `weight_reads`).

On a GPU a large patch is bound by reading weights, so bytes read carry over to any machine where
seconds do not: `passes` is the bytes read over one read of both models (base + aligned), the
unit the goals are stated in (issue 22: the single-pass score reads about 1 pass).
"""
from __future__ import annotations


class WeightReads:
    """Counts the base's and the aligned model's bytes read (their checkpoints' `bytes_read`)
    between `mark` calls; the bytes since the last mark go to the stage named."""

    def __init__(self, *checkpoints):
        self.checkpoints = checkpoints
        self.stages: dict[str, int] = {}
        self._last = self._total()

    def _total(self) -> int:
        return sum(c.bytes_read for c in self.checkpoints)

    def mark(self, stage: str) -> None:
        now = self._total()
        if now != self._last:
            self.stages[stage] = self.stages.get(stage, 0) + now - self._last
        self._last = now

    def record(self) -> dict:
        size = sum(c.tensor_bytes for c in self.checkpoints)
        total = sum(self.stages.values())
        return {"stages": dict(self.stages), "total": total, "one_pass": size,
                "passes": round(total / size, 4) if size else None,
                "stage_passes": {k: round(v / size, 4) for k, v in self.stages.items()} if size else {}}
