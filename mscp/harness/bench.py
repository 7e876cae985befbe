"""`mscp bench`: where a patch's time and memory go, measured in one run on one checkpoint trio.

Figures (all wall-clock, this machine, page cache as the run leaves it; both a case and its floor
are timed back to back in the same state):
  io floor          reading the bytes a case reads, raw, in large chunks, nothing else
  projection only   fast_project with the masks of the full run (reads W_a, W_b of masked modules)
  full pipeline     patch(): stream every layer, score, localise, project; per stage and per layer
  peak memory       ru_maxrss of this process after the full run (the bench itself adds little)
  K adapters        patch_many with K adapters against K separate patch() runs; K adapters and one
                    under both fine-tuned passes (with the calibration streams, or after the window)
  dense Safe LoRA   C = V V^T / ||V||_F built densely, C @ B, against the low-rank op, same modules

The patches run with the paper's setting (PAPER_SETTING: every layer read once per pass), the setting
the I/O-floor goals are stated for; `patch_options` overrides it. One more run with the package
defaults (the attribution score) gives its wall time against the single-pass score's and both
figures as passes over (base + aligned) (the report's `weight_reads`), and one counted run of each
their FLOPs (`count_flops`).
"""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mscp.core.adapter import Adapter
from mscp.core.checkpoint import Checkpoint
from mscp.core.config import PAPER_SETTING
from mscp.core.pipeline import patch, patch_many
from mscp.core.project import project_adapter
from mscp.core.prompts import default_prompts
from mscp.core.reads import count_flops
from mscp.kernels import lowrank_project

CHUNK = 64 << 20


def page_cache_residency(paths) -> float:
    """Share of the files' pages in the page cache now (mincore on a private mapping; Linux)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = Path(path).stat().st_size
        if not size:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(m)  # the mapping's first byte: its address, nothing read
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            del anchor
            resident += sum(v & 1 for v in vec)
            total += pages
    return resident / total if total else 1.0


def evict(paths) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED, no root: it drops clean
    pages only, so the files are synced first)."""
    import os

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def machine_state(paths) -> dict:
    """What a timing depends on: threads, the load around it, and how much of its files is cached."""
    import os

    return {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0], "page_cache_residency": page_cache_residency(paths)}


def read_floor(ranges: list[tuple[Path, int, int]]) -> float:
    """Seconds to read the given (file, offset, length) byte ranges into one reusable buffer."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    for path, offset, length in ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while length > 0:
                n = f.readinto(view[: min(CHUNK, length)])
                if not n:
                    break
                length -= n
    return time.perf_counter() - start


def tensor_ranges(ckpt: Checkpoint, names) -> list[tuple[Path, int, int]]:
    return [ckpt.byte_range(name) for name in names]


def file_ranges(paths) -> list[tuple[Path, int, int]]:
    return [(p, 0, p.stat().st_size) for p in paths]


def variant_adapters(adapter: Path, root: Path, k: int) -> list[Path]:
    """The adapter and k-1 seeded variants with the same modules (other A and B of the same scale)."""
    out = [adapter]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for seed in range(1, k):
        folder = root / f"variant-{seed}"
        if not (folder / "adapter_model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(adapter / "adapter_config.json", folder / "adapter_config.json")
            g = torch.Generator().manual_seed(seed)
            save_file({n: (torch.randn(t.shape, generator=g) * t.float().std()).to(t.dtype) for n, t in tensors.items()},
                      str(folder / "adapter_model.safetensors"))
        out.append(folder)
    return out


def other_pass(mode: str) -> str:
    """The fine-tuned pass a run did not use (both are timed side by side)."""
    return "after_window" if mode == "with_calibration" else "with_calibration"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_bench(base, aligned, adapter, *, k: int = 8, work: Path, repeats: int = 3, full_separate: bool = True,
              n_prompts: int | None = None, patch_options: dict | None = None, log=print) -> dict:
    base, aligned, adapter = Path(base), Path(aligned), Path(adapter)
    # the single streamed pass the I/O-floor goals are defined for (the paper's score); the attribution
    # default adds generation and a backward pass, which read the layers again
    opts = dict(progress=False, hash_inputs=False, **{**PAPER_SETTING, **(patch_options or {})})
    if n_prompts:  # the first n of each built-in set: the forward passes scale with the prompts
        benign = default_prompts("benign")
        opts["prompts"] = {"harmful": default_prompts("harmful")[:n_prompts], "benign": benign[:n_prompts],
                           "task": benign[-n_prompts:]}
    base_ck, aligned_ck = Checkpoint(base, label="base"), Checkpoint(aligned, label="aligned")
    lora = Adapter.load(adapter)
    fig: dict = {"trio": {"base": str(base), "aligned": str(aligned), "adapter": str(adapter)},
                 "checkpoint_bytes": sum(p.stat().st_size for p in base_ck.files if p.suffix == ".safetensors")}

    # full pipeline (after an untimed warm-up run: page cache, lazy inits), then its floor:
    # every byte of both checkpoints and the adapter
    fig["state_start"] = machine_state([])
    log("warm-up run ...")
    start = time.perf_counter()
    patch(base, aligned, adapter, **opts)
    fig["warmup_full_s"] = time.perf_counter() - start
    log("full pipeline ...")
    start = time.perf_counter()
    full = patch(base, aligned, adapter, **opts)
    fig["full_s"] = time.perf_counter() - start
    fig["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fig["safety_layers"] = full.report["safety_layers"]
    fig["layers_given"] = (patch_options or {}).get("layers") is not None
    t = full.report["timings_s"]
    fig["stages_s"] = {k_: v for k_, v in t.items() if isinstance(v, float)}
    fig["per_layer_s"] = t["layers"]
    fig["per_layer_io_wait_s"] = t["layers_waiting_for_io"]
    fig["bytes_read_full"] = sum(full.report["bytes_read"].values())
    full_files = [p for p in base_ck.files + aligned_ck.files + lora.files if p.suffix == ".safetensors"]
    fig["io_floor_full_s"] = read_floor(file_ranges(full_files))
    fig["io_floor_ratio_full"] = fig["full_s"] / fig["io_floor_full_s"]
    fig["compute_s"] = sum(t["layers"]) - sum(t["layers_waiting_for_io"]) + t["capture"]
    fig["full_over_3x_floor_plus_compute"] = fig["full_s"] / (3 * fig["io_floor_full_s"] + fig["compute_s"])
    fig["passes_full"] = full.report["weight_reads"]["passes"]

    # the package default (the attribution score) beside it: wall time and passes over (base +
    # aligned), the figure that carries over to a GPU, where a large patch is bound by reading weights
    log("full pipeline with the package defaults ...")
    default_opts = {k_: v for k_, v in opts.items() if k_ not in PAPER_SETTING}
    start = time.perf_counter()
    default = patch(base, aligned, adapter, **default_opts)
    fig["default_s"] = time.perf_counter() - start
    fig["default_over_single_pass"] = fig["default_s"] / fig["full_s"]
    fig["passes_default"] = default.report["weight_reads"]["passes"]
    fig["passes_default_by_stage"] = default.report["weight_reads"]["stage_passes"]
    # what each computes, the figure that carries over where a patch is bound by compute (this CPU):
    # FLOPs counted in runs of their own, since the counter slows every operator
    log("FLOPs of both ...")
    with count_flops():
        flops_full = patch(base, aligned, adapter, **opts).report["weight_reads"]["flops"]
        flops_default = patch(base, aligned, adapter, **default_opts).report["weight_reads"]["flops"]
    fig["gflop_full"], fig["gflop_default"] = flops_full["total"] / 1e9, flops_default["total"] / 1e9
    fig["gflop_default_by_stage"] = {k_: v / 1e9 for k_, v in flops_default["stages"].items()}
    fig["flops_default_over_single_pass"] = flops_default["total"] / flops_full["total"]

    # projection only, with the full run's masks: reads W_a and W_b of the masked modules
    masks = {key: m["rows"] for key, m in full.report["modules"].items()}
    by_b = lora.by_b_key()
    weights = sorted({by_b[key].weight_key for key in masks})
    proj_ranges = tensor_ranges(base_ck, weights) + tensor_ranges(aligned_ck, weights) + file_ranges(
        [p for p in lora.files if p.suffix == ".safetensors"])
    fig["bytes_read_projection"] = sum(r[2] for r in proj_ranges)
    proj_files = sorted({r[0] for r in proj_ranges})
    fig["state_projection"] = machine_state(proj_files)  # warm: the full run just read them
    fig["io_floor_projection_s"] = median_time(lambda: read_floor(proj_ranges), repeats)
    fig["projection_s"] = median_time(lambda: project_adapter(Adapter.load(adapter), base, aligned, masks), repeats)
    fig["io_floor_ratio_projection"] = fig["projection_s"] / fig["io_floor_projection_s"]
    # the same from a cold page cache (the files evicted before each timing): disk-bound instead
    log("projection only, cold page cache ...")
    evict(proj_files)
    fig["state_projection_cold"] = machine_state(proj_files)
    fig["io_floor_projection_cold_s"] = read_floor(proj_ranges)
    evict(proj_files)
    start = time.perf_counter()
    project_adapter(Adapter.load(adapter), base, aligned, masks)
    fig["projection_cold_s"] = time.perf_counter() - start
    fig["io_floor_ratio_projection_cold"] = fig["projection_cold_s"] / fig["io_floor_projection_cold_s"]

    # K adapters in one pass against K separate runs; both fine-tuned passes side by side (the
    # default one is the figure), and one adapter under the pass its default does not use
    log(f"{k} adapters ...")
    adapters = variant_adapters(adapter, work / "variants", k)
    start = time.perf_counter()
    chosen = patch_many(base, aligned, adapters, **opts)[0].report["timings_s"]["finetuned_pass"]
    fig["multi_adapter_s"] = time.perf_counter() - start
    fig["finetuned_pass"] = {"one": full.report["timings_s"]["finetuned_pass"], "k": chosen}
    start = time.perf_counter()
    patch_many(base, aligned, adapters, **{**opts, "finetuned_pass": other_pass(chosen)})
    fig["multi_adapter_s_by_pass"] = {chosen: fig["multi_adapter_s"], other_pass(chosen): time.perf_counter() - start}
    one = fig["finetuned_pass"]["one"]
    start = time.perf_counter()
    patch(base, aligned, adapter, **{**opts, "finetuned_pass": other_pass(one)})
    fig["full_s_by_pass"] = {one: fig["full_s"], other_pass(one): time.perf_counter() - start}
    if full_separate:
        start = time.perf_counter()
        for a in adapters:
            patch(base, aligned, a, **opts)
        fig["separate_runs_s"] = time.perf_counter() - start
    else:
        fig["separate_runs_s"] = None
    fig["multi_adapter_k"] = k
    fig["prompts"] = full.report["prompts"]
    fig["multi_adapter_ratio"] = fig["multi_adapter_s"] / fig["full_s"]
    fig["multi_adapter_vs_separate"] = fig["multi_adapter_s"] / fig["separate_runs_s"] if full_separate else None

    # dense Safe LoRA against the low-rank op on the projected modules
    log("dense Safe LoRA vs low-rank ...")
    dense_t, low_t, worst = 0.0, 0.0, 0.0
    for key, rows in masks.items():
        if not rows:
            continue
        m = by_b[key]
        W_a, W_b, B = aligned_ck.get(m.weight_key).float(), base_ck.get(m.weight_key).float(), lora.tensors[key].float()
        rows_t = torch.tensor(rows)
        start = time.perf_counter()
        V = W_a - W_b
        C = V @ V.T / torch.linalg.vector_norm(V)
        dense = B.clone()
        dense[rows_t] = (C @ B)[rows_t]
        dense_t += time.perf_counter() - start
        del C
        start = time.perf_counter()
        low, _ = lowrank_project(W_a, W_b, B, rows_t, 1.0)
        low_t += time.perf_counter() - start
        worst = max(worst, (low - dense).abs().max().item() / max(dense.abs().max().item(), 1e-30))
    fig["dense_safelora_s"], fig["lowrank_s"] = dense_t, low_t
    fig["dense_over_lowrank"] = dense_t / low_t if low_t else None
    fig["dense_vs_lowrank_max_rel_diff"] = worst
    return fig


def print_figures(fig: dict) -> None:
    rows = [
        ("full pipeline", f"{fig['full_s']:.2f} s", f"{fig['io_floor_ratio_full']:.2f} x io floor "
         f"({fig['io_floor_full_s']:.2f} s for {fig['bytes_read_full'] / 1e9:.2f} GB); compute {fig['compute_s']:.2f} s; "
         f"{fig['passes_full']:.2f} passes over base + aligned"),
        ("default score", f"{fig['default_s']:.2f} s", f"{fig['default_over_single_pass']:.2f} x the single-pass "
         f"score; {fig['passes_default']:.2f} passes ("
         + ", ".join(f"{k} {v:.2f}" for k, v in fig["passes_default_by_stage"].items()) + ")"),
        ("FLOPs", f"{fig['gflop_default']:.1f} G", f"the default, {fig['flops_default_over_single_pass']:.2f} x the "
         f"single-pass score's {fig['gflop_full']:.1f} G ("
         + ", ".join(f"{k} {v:.1f}" for k, v in fig["gflop_default_by_stage"].items()) + ")"),
        ("projection only, warm", f"{fig['projection_s']:.3f} s", f"{fig['io_floor_ratio_projection']:.2f} x io floor "
         f"({fig['io_floor_projection_s']:.3f} s for {fig['bytes_read_projection'] / 1e9:.3f} GB); "
         + state_text(fig["state_projection"])),
        ("projection only, cold", f"{fig['projection_cold_s']:.3f} s",
         f"{fig['io_floor_ratio_projection_cold']:.2f} x io floor ({fig['io_floor_projection_cold_s']:.3f} s); "
         + state_text(fig["state_projection_cold"])),
        ("peak RSS", f"{fig['peak_rss_bytes'] / 1e9:.2f} GB", f"checkpoint {fig['checkpoint_bytes'] / 1e9:.2f} GB"),
        (f"{fig['multi_adapter_k']} adapters, one pass", f"{fig['multi_adapter_s']:.2f} s",
         f"{fig['multi_adapter_ratio']:.2f} x one adapter"
         + (f"; {fig['multi_adapter_vs_separate']:.2f} x {fig['multi_adapter_k']} separate runs "
            f"({fig['separate_runs_s']:.2f} s)" if fig["separate_runs_s"] else "")),
        ("dense Safe LoRA", f"{fig['dense_safelora_s']:.3f} s",
         f"{fig['dense_over_lowrank']:.1f} x the low-rank op ({fig['lowrank_s']:.3f} s), "
         f"max rel diff {fig['dense_vs_lowrank_max_rel_diff']:.1e}" if fig["dense_over_lowrank"] else "no rows"),
    ]
    for name, value, note in rows:
        print(f"{name:<24} {value:>10}   {note}")
    for n, key, times in ((1, "one", fig["full_s_by_pass"]), (fig["multi_adapter_k"], "k", fig["multi_adapter_s_by_pass"])):
        for mode, t in times.items():
            default = "  (the default)" if mode == fig["finetuned_pass"][key] else ""
            print(f"  {n} adapter(s), fine-tuned pass {mode:<16} {t:8.2f} s{default}")
    print("per layer (s): " + " ".join(f"{x:.2f}" for x in fig["per_layer_s"]))


def state_text(state: dict) -> str:
    return (f"{100 * state['page_cache_residency']:.0f} % cached, {state['torch_threads']} threads, "
            f"load {state['load_average_1m']:.1f}")


def write_json(fig: dict, path: Path) -> None:
    path.write_text(json.dumps(fig, indent=2) + "\n")
