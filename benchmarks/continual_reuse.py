"""The cost of `mscp continual add` against a fresh `mscp patch`, in one process (docs/continual.md).

    python benchmarks/continual_reuse.py TRIO_DIR WORK_DIR DIM.txt ... [--task F] [--layers A-B] [--repeats N]
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from mscp.continual import add, init, load_state


def measure_reuse(base, aligned, adapter, dims: dict[str, Path], work: Path, *, task=None, repeats: int = 3,
                  **overrides) -> dict:
    """In one process (imports and warm-up excluded), per dimension: wall and CPU seconds of a fresh
    `patch` with the dimension's harmful prompts against `add` of the same prompts to a state; the
    runs are interleaved and each is repeated (median). Also init against patch."""
    import statistics

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(progress=False, hash_inputs=False, **overrides)

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out

    first = next(iter(dims.values()))
    patch_fn = lambda files: __import__("mscp.core.pipeline", fromlist=["patch"]).patch(
        base, aligned, adapter, harmful=files, task=task, **kw)
    patch_fn([first])  # warm-up: imports, first-touch of the files
    rows: dict[str, dict[str, list[float]]] = {}
    states = []
    for r in range(repeats):
        state = work / f"state-{r}"
        shutil.rmtree(state, ignore_errors=True)
        w, c, _ = timed(lambda: patch_fn(None))  # the same prompts as init: built-in harmful + benign
        rows.setdefault("patch (init's prompts)", {}).setdefault("wall", []).append(w)
        rows["patch (init's prompts)"].setdefault("cpu", []).append(c)
        w, c, st = timed(lambda: init(base, aligned, adapter, state, task=task, figures=False, **kw))
        rows.setdefault("init", {}).setdefault("wall", []).append(w)
        rows["init"].setdefault("cpu", []).append(c)
        states.append(state)
        for name, f in dims.items():
            w, c, res = timed(lambda: patch_fn([f]))
            rows.setdefault(f"patch {name}", {}).setdefault("wall", []).append(w)
            rows[f"patch {name}"].setdefault("cpu", []).append(c)
            w, c, entry = timed(lambda: add(state, name, harmful=[f], progress=False, figures=False))
            rows.setdefault(f"add {name}", {}).setdefault("wall", []).append(w)
            rows[f"add {name}"].setdefault("cpu", []).append(c)
    st = load_state(states[-1])
    return {"safety_layers": st.safety_layers, "n_layers": st.n_layers, "repeats": repeats,
            "median_s": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rows.items()},
            "dimensions": [{k: getattr(d, k) for k in ("name", "mask_rows", "new_rows", "incremental_edit_fraction",
                                                       "cumulative_edit_fraction")} for d in st.dimensions]}


if __name__ == "__main__":  # python -m mscp.continual TRIO_DIR WORK_DIR DIM.txt ... [--task F] [--layers A-B] [--repeats N]
    import argparse

    from mscp.core.config import parse_layer_range

    ap = argparse.ArgumentParser(description="time `continual add` against a fresh `patch` (in one process)")
    ap.add_argument("trio", help="folder with base/, aligned/, adapter/ (as `mscp synth` writes)")
    ap.add_argument("work", help="scratch folder for the states")
    ap.add_argument("dims", nargs="+", help="one harmful prompt file per dimension (named after the file)")
    ap.add_argument("--task")
    ap.add_argument("--layers")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    extra = {"layers": parse_layer_range(a.layers)} if a.layers else {}
    trio = Path(a.trio)
    result = measure_reuse(trio / "base", trio / "aligned", trio / "adapter", {Path(f).stem: Path(f) for f in a.dims},
                           Path(a.work), task=a.task, repeats=a.repeats, **extra)
    print(json.dumps(result, indent=2))
