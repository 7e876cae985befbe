"""The one loop over decoder layers, in the manner of llm-compressor's sequential pipeline.

A pass is a list of `Step`s: a model, a decoder-layer index, and the streams (prompt sets' hidden
states) that go through that layer. `sweep` loads each step's layer while the previous one computes
(read-ahead: two layers in memory at most), calls `visit(step, layer)`, frees the layer, and keeps
the time of each step and how long it waited for its read. Progress bars and timing live here; what
is measured lives in observers, which `advance_with` attaches around each stream's forward:

    observer.before(stream, index, layer)   before the stream goes through the layer
    observer.hooks(stream, index, layer)    module hooks attached while it does
    observer.after(stream, index, layer)    once it has

so the method code (curves, scores, the LoRA added to the fine-tuned stream) is a set of small
observers, and the loop is written once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from mscp.core.streaming import ModelShell, Stream, hooks, read_ahead


class Observer:
    """Does nothing; subclasses override what they need."""

    def before(self, stream: Stream, index: int, layer: nn.Module) -> None:
        pass

    def hooks(self, stream: Stream, index: int, layer: nn.Module) -> list:
        return []

    def after(self, stream: Stream, index: int, layer: nn.Module) -> None:
        pass


@dataclass
class Step:
    model: ModelShell
    index: int
    streams: list[Stream] = field(default_factory=list)
    release: list[Stream] = field(default_factory=list)
    """Streams not needed after this step: their hidden states are freed."""


@dataclass
class PassTimes:
    """Seconds of each step (its read's wait included) and of that wait alone."""

    steps: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    total: float = 0.0

    def per_index(self, steps: list[Step]) -> tuple[list[float], list[float]]:
        """Summed over the steps of each layer index, in index order."""
        by: dict[int, list[float]] = {}
        for step, seconds, wait in zip(steps, self.steps, self.waits):
            entry = by.setdefault(step.index, [0.0, 0.0])
            entry[0] += seconds
            entry[1] += wait
        order = sorted(by)
        return [by[i][0] for i in order], [by[i][1] for i in order]


def sweep(steps: list[Step], visit: Callable[[Step, nn.Module], None], *, progress=None, desc: str = "layers",
          unit: str = "layer") -> PassTimes:
    """Load each step's layer (the next one read ahead meanwhile) and `visit(step, layer)` it."""
    times = PassTimes()
    start = time.perf_counter()
    indices = sorted({s.index for s in steps}) if steps else []
    bar = progress(total=len(indices), desc=desc, unit=unit) if progress else None
    seen: set[int] = set()
    mark = time.perf_counter()
    try:
        for step, layer in read_ahead(steps, lambda s: s.model.load_layer(s.index)):
            wait = time.perf_counter() - mark  # the read not hidden behind the previous step
            visit(step, layer)
            for stream in step.release:
                stream.release()
            del layer  # before the next read completes: two layers in memory at most
            now = time.perf_counter()
            times.steps.append(now - mark)
            times.waits.append(wait)
            mark = now
            if bar is not None and step.index not in seen:
                seen.add(step.index)
                bar.update()
    finally:  # also on an error: an open bar would be drawn again after the error line
        if bar is not None:
            bar.close()
    times.total = time.perf_counter() - start
    return times


def advance_with(observers: list[Observer]) -> Callable[[Step, nn.Module], None]:
    """The usual visit: every stream of the step goes through the layer, observers attached."""
    def visit(step: Step, layer: nn.Module) -> None:
        for stream in step.streams:
            for o in observers:
                o.before(stream, step.index, layer)
            handles = [h for o in observers for h in o.hooks(stream, step.index, layer)]
            with hooks(handles):
                stream.advance(layer, step.index)
            for o in observers:
                o.after(stream, step.index, layer)
    return visit
