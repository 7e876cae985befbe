"""Benchmarks of the mscp ops at Llama-3.1 layer shapes, every available backend vs the reference.

Plain script (prints a Markdown table):
    python -m benchmarks.bench_ops            # 8B shapes (hidden 4096, intermediate 14336)
    python -m benchmarks.bench_ops --large    # also 70B shapes (8192, 28672); default on GPU
pytest-benchmark:
    pytest benchmarks/bench_ops.py --benchmark-enable

Columns: median wall time of the op for each backend, the speed-up over the pure-torch reference,
and over the formulation the op replaces, timed alongside: for lowrank_project the dense Safe LoRA
formulation (C = V V^T / ||V|| built, then C B), for lora_attribution the attribution hook's former
formula (the tokens x d_out effect s u E^T, then grad * effect summed over the tokens). On a GPU,
also the achieved memory bandwidth (bytes the op must move / time) as a fraction of a measured
device copy (torch clone of 1 GiB).
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time

import torch
from mscp.kernels import (
    _ext,
    available_backends,
    channel_sumsq,
    lora_attribution,
    lowrank_project,
    row_importance,
    use_backend,
)

SHAPES = {
    "8B": dict(hidden=4096, inter=14336),
    "70B": dict(hidden=8192, inter=28672),
}
RANK = 16
SELECTED = 0.05  # fraction of rows projected (the paper edits ~5 %)
# lora_attribution: one micro-batch of 2048 tokens through a 1536-row module (Qwen2-1.5B's hidden
# size) with a rank-8 LoRA
ATTRIBUTION = dict(tokens=2048, d_out=1536, r=8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all threads)


def timeit(fn, device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        _sync(device)
        out.append(CLOCK() - t0)
    return out


def _cpu_busy(window: float = 0.5) -> float | None:
    """Fraction of all CPUs busy (anyone's) over `window` seconds, from /proc/stat (Linux)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(window)
        t1, i1 = snap()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


_busy_log: list[float] = []


def wait_idle(max_wait: float, threshold: float = 0.15) -> None:
    """Wait (at most max_wait s) until other processes leave the CPUs idle; log what was seen."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    while True:
        busy = _cpu_busy()
        if busy is None or busy < threshold or time.monotonic() > deadline:
            _busy_log.append(busy if busy is not None else -1.0)
            return


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    ts = timeit(lambda: x.clone(), device, 5)
    return 2 * x.numel() * 4 / statistics.median(ts)


def dense_safe_lora(W_a, W_b, B, rows, alpha):
    """Safe LoRA as published: C = V V^T / ||V||_F built densely (d_out x d_out), then C B."""
    acc = torch.float64 if torch.float64 in (W_a.dtype, B.dtype) else torch.float32
    V = W_a.to(acc) - W_b.to(acc)
    norm = torch.linalg.vector_norm(V)
    C = (V @ V.T) / norm
    out = B.clone()
    Bf = B.to(acc)
    out[rows] = (Bf[rows] + alpha * ((C @ Bf)[rows] - Bf[rows])).to(B.dtype)
    return out, norm.float()


def hook_formula(grad, u, edit, scale):
    """What mscp/core/attribution.py's hook computed before mscp::lora_attribution: the effect
    s u E^T (tokens x d_out, in the forward pass), then grad * effect summed over the tokens."""
    effect = scale * (u @ edit.T)
    return (grad.float() * effect.float()).sum(dim=tuple(range(grad.dim() - 1))).double()


def attribution_cases(device, dtypes):
    gen = torch.Generator(device="cpu").manual_seed(1)
    T, d_out, r = ATTRIBUTION["tokens"], ATTRIBUTION["d_out"], ATTRIBUTION["r"]
    for dtype in dtypes:
        grad, u, E = (torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
                      for shape in ((T, d_out), (T, r), (d_out, r)))
        dn = str(dtype).replace("torch.", "")
        yield dict(op="lora_attribution", shape=f"{T} tokens x {d_out} rows r{r}", dtype=dn,
                   fn=lambda g=grad, u=u, E=E: lora_attribution(g, u, E, 2.0),
                   baseline="hook formula", baseline_fn=lambda g=grad, u=u, E=E: hook_formula(g, u, E, 2.0),
                   bytes=(grad.numel() + u.numel() + E.numel()) * grad.element_size())


def cases(device, large: bool, dtypes):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    sizes = ["8B"] + (["70B"] if large else [])
    for size in sizes:
        h, i = SHAPES[size]["hidden"], SHAPES[size]["inter"]
        for dtype in dtypes:
            dn = str(dtype).replace("torch.", "")
            # channel_sumsq: 8 sequences x 512 tokens of the hidden and the intermediate width
            for d in (h, i):
                x = rnd(8, 512, d, dtype=dtype)
                mask = torch.rand(8, 512, generator=gen).to(device) > 0.1
                acc = torch.zeros(d, device=device)
                cnt = torch.zeros(1, dtype=torch.int64, device=device)
                yield dict(op="channel_sumsq", shape=f"{size} x 8x512x{d}", dtype=dn,
                           fn=lambda x=x, m=mask, a=acc, c=cnt: channel_sumsq(x, m, a, c),
                           bytes=x.numel() * x.element_size())
            # row_importance: gate/up (inter x hidden) and down (hidden x inter), LoRA r=16, K=2
            for d_out, d_in in ((i, h), (h, i)):
                W = rnd(d_out, d_in, dtype=dtype)
                B = rnd(d_out, RANK, dtype=dtype, scale=0.01)
                A = rnd(RANK, d_in, dtype=dtype, scale=0.01)
                N = torch.rand(d_in, 2, generator=gen).to(device)
                yield dict(op="row_importance", shape=f"{size} {d_out}x{d_in} r{RANK} K2", dtype=dn,
                           fn=lambda W=W, B=B, A=A, N=N: row_importance(W, B, A, 2.0, N),
                           bytes=W.numel() * W.element_size())
            # lowrank_project: a 4096 x 14336 (d_out x d_in) module, 5 % of rows selected
            d_out, d_in = h, i
            W_a = rnd(d_out, d_in, dtype=dtype)
            W_b = (W_a.float() + rnd(d_out, d_in, dtype=torch.float32, scale=0.01)).to(dtype)
            B = rnd(d_out, RANK, dtype=dtype)
            rows = torch.randperm(d_out, generator=gen)[: int(SELECTED * d_out)].to(device)
            yield dict(op="lowrank_project", shape=f"{size} {d_out}x{d_in} r{RANK} 5% rows", dtype=dn,
                       fn=lambda a=W_a, b=W_b, B=B, r=rows: lowrank_project(a, b, B, r, 1.0),
                       baseline="dense", baseline_fn=lambda a=W_a, b=W_b, B=B, r=rows: dense_safe_lora(a, b, B, r, 1.0),
                       slow_baseline=True, result=lambda out: out[0],
                       bytes=2 * W_a.numel() * W_a.element_size())


def _with_backend(name, fn):
    with use_backend(name):
        return fn()


OPS = {"channel_sumsq": "mscp::channel_sumsq", "row_importance": "mscp::row_importance",
       "lowrank_project": "mscp::lowrank_project", "lora_attribution": "mscp::lora_attribution"}


def run(device, large: bool, reps: int, dtypes, dense_reps: int, idle_wait: float = 0.0, ops=None) -> list[dict]:
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for case in itertools.chain(cases(device, large, dtypes), attribution_cases(device, dtypes)):
        if ops and case["op"] not in ops:
            continue
        backends = [b for b in available_backends(OPS[case["op"]], device.type) if b != "triton" or device.type == "cuda"]
        backends = ["torch"] + [b for b in backends if b != "torch"]
        # Round-robin over the variants, one call each per round, so that load from other
        # processes (shared machines) hits every variant alike; medians per variant.
        fns = {b: (lambda b=b, fn=case["fn"]: _with_backend(b, fn)) for b in backends}
        base = case.get("baseline")  # the formulation the op replaces, timed alongside
        slow = case.get("slow_baseline", False)  # timed dense_reps times, no warm-up on CPU
        if base:
            fns[base] = case["baseline_fn"]
        wait_idle(idle_wait)
        for name, fn in fns.items():
            if name != base or not slow or device.type == "cuda":
                fn()  # warm-up (first-use builds, allocator)
        _sync(device)
        samples = {name: [] for name in fns}
        for rep in range(reps):
            for name, fn in fns.items():
                if name == base and slow and rep >= dense_reps:
                    continue
                samples[name].extend(timeit(fn, device, 1, warmup=0))
        times = {name: statistics.median(v) for name, v in samples.items()}
        mins = {name: min(v) for name, v in samples.items()}
        diffs = {}
        if base:  # the same result: each backend's output against the replaced formulation's
            result = case.get("result", lambda out: out)
            want = result(fns[base]()).double()
            for b in backends:
                diffs[b] = ((result(fns[b]()).double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        for b in backends + ([base] if base else []):
            rows.append(dict(op=case["op"], shape=case["shape"], dtype=case["dtype"], backend=b,
                             ms=times[b] * 1e3, min_ms=mins[b] * 1e3, vs_ref=times["torch"] / times[b],
                             vs_ref_min=mins["torch"] / mins[b], baseline=base,
                             vs_base=(times[base] / times[b]) if base else None,
                             vs_base_min=(mins[base] / mins[b]) if base else None,
                             max_rel_diff_vs_base=diffs.get(b),
                             bw_frac=(case["bytes"] / times[b] / bw) if bw and b != base else None))
        print(_fmt(rows[-len(backends) - bool(base):], header=False), flush=True)
    return rows


def _fmt(rows, header=True) -> str:
    lines = []
    if header:
        lines.append("| op | shape | dtype | backend | median ms | min ms | vs torch ref (median / min) "
                     "| vs the formulation it replaces (median / min) | bandwidth / copy bw |")
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        big = r["vs_base"] is not None and r["vs_base"] >= 20  # dense Safe LoRA: hundreds of x
        vd = (f"{r['vs_base']:.{0 if big else 2}f}x / {r['vs_base_min']:.{0 if big else 2}f}x vs {r['baseline']} "
              f"(max rel. diff {r['max_rel_diff_vs_base']:.1e})"
              if r["vs_base"] is not None and r["backend"] != r["baseline"] else "")
        bw = f"{r['bw_frac']:.0%}" if r["bw_frac"] is not None else ""
        ms, mn = (f"{t:.{1 if t >= 10 else 2}f}" for t in (r["ms"], r["min_ms"]))  # sub-ms ops: 2 decimals
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {ms} | {mn} | "
                     f"{r['vs_ref']:.2f}x / {r['vs_ref_min']:.2f}x | {vd} | {bw} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--large", action="store_true", help="also 70B shapes (default on GPU)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dense-reps", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--idle-wait", type=float, default=0.0,
                    help="before each measurement wait up to this many seconds for other processes "
                         "to leave the CPUs idle (shared machines)")
    ap.add_argument("--ops", default="", help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: CPU time of this process (summed over its threads): "
                         "insensitive to other processes taking turns on a shared CPU")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    large = args.large or device.type == "cuda"
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if device.type == "cpu" and not _ext.load():
        print(f"note: C++ extension unavailable: {_ext.build_error()}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"# load average before: {os.getloadavg()}")
    print(_fmt([]))
    ops = [o for o in args.ops.split(",") if o]
    rows = run(device, large, args.reps, dtypes, args.dense_reps, args.idle_wait, ops)
    print(f"# load average after: {os.getloadavg()}")
    if _busy_log:
        noisy = sum(b >= 0.15 for b in _busy_log)
        print(f"# CPU busy (other processes) just before each of {len(_busy_log)} measurements: "
              f"median {statistics.median(_busy_log):.0%}, max {max(_busy_log):.0%}; "
              f"{noisy} started with >= 15% busy")
    print()
    print(_fmt(rows))
    return rows


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points (8B shapes, bf16; lora_attribution fp32, beside the hook's former
# formula; run with --benchmark-enable)
# ----------------------------------------------------------------------------------------------
def _bench_cases():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for case in itertools.chain(cases(dev, False, [torch.bfloat16]), attribution_cases(dev, [torch.float32])):
        for b in ["torch"] + [b for b in available_backends(OPS[case["op"]], dev.type) if b not in ("torch", "triton") or dev.type == "cuda"]:
            out.append((case, b))
        if case.get("baseline") and not case.get("slow_baseline"):
            out.append((case, case["baseline"]))
    return out


try:
    import pytest

    @pytest.mark.parametrize("case,backend", _bench_cases() if os.environ.get("MSCP_BENCH", "1") != "0" else [],
                             ids=lambda v: v if isinstance(v, str) else f"{v['op']}-{v['shape']}")
    def test_bench_op(benchmark, case, backend):
        def call():
            if backend == case.get("baseline"):
                case["baseline_fn"]()
            else:
                with use_backend(backend):
                    case["fn"]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        benchmark.pedantic(call, rounds=5, warmup_rounds=1)
except ImportError:  # plain script use without pytest
    pass


if __name__ == "__main__":
    main()
