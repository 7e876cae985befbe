"""A batch of adapters of one base and aligned model, patched in groups, resumable.

    adapters = list_adapters("adapters.txt")          # or a glob: "runs/*/adapter"
    summary = run_batch(BatchSpec(base, aligned, config.to_dict()), adapters, "out/", executor="ray")

1. Each adapter gets an output folder DIR/<name> and a fingerprint of everything its output
   depends on: the config, the base, aligned, adapter and tokenizer files (path, size, mtime), the
   prompt files (sha256) and the mscp version. An output whose report carries the same
   fingerprint is complete (outputs are written atomically, so a folder is whole or absent): a
   rerun skips it.
2. The safety window is computed once (curves of base and aligned: no adapter needed) unless
   --layers gives it; every group then runs with that window, so each output equals patching its
   adapter alone (the scores in the window do not depend on the pass; tests/test_batch.py).
3. The rest are patched in groups of `per_task` adapters (`patch_many`: the weights read once per
   group), here or as Ray tasks. A group that fails on bad input is patched again one adapter at a
   time, so only the adapter at fault fails; any other error retries the group (`retries` times)
   and then fails each of its adapters, never the whole run.
4. DIR/mscp_run.json: the run summary (done, skipped, failed, with each adapter's error).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import time
from collections.abc import Callable
from pathlib import Path

from mscp.core.atomic import write_file_atomically
from mscp.core.config import PatchConfig
from mscp.core.hub import ADAPTER_FILES, parse_hub_id, resolve
from mscp.core.report import OUTPUT_FILES, read_report
from mscp.core.store import digest
from mscp.errors import MSCPError
from mscp.executors.jobs import SUMMARY_NAME, BatchSpec, Job, line, outcome

EXECUTORS = ("local", "ray")
DEFAULT_RAY_PER_TASK = 4


# -- the list of adapters and their output folders ---------------------------------------------------
def list_adapters(source: str) -> list[str]:
    """`--adapters FILE_OR_GLOB`: a file with one adapter folder or hub id a line ('#' starts a
    comment; relative folders are relative to the file's folder), or a glob of adapter folders."""
    path = Path(source).expanduser()
    if path.is_file():
        items = []
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            local = Path(entry).expanduser()
            if not local.is_absolute() and (path.parent / local).exists():
                local = path.parent / local
            items.append(str(local) if local.exists() else entry)
        if not items:
            raise MSCPError(f"adapter list {path} names no adapter")
    else:
        items = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_dir())
        if not items:
            raise MSCPError(f"--adapters {source!r} is neither a file nor a pattern matching any folder")
    seen = set()
    for item in items:
        key = str(Path(item).resolve()) if Path(item).exists() else item
        if key in seen:
            raise MSCPError(f"adapter {item} is listed twice")
        seen.add(key)
    return items


def output_names(adapters: list[str]) -> list[str]:
    """DIR/<name> per adapter: the folder's name, or org--name[--rev] for a hub id; numbered when two
    would collide."""
    names = []
    for a in adapters:
        hub = parse_hub_id(a) if not Path(a).exists() else None
        names.append("--".join(x for x in ((*hub[0].split("/"), hub[1]) if hub else (Path(a).resolve().name,)) if x))
    if len(set(names)) != len(names):
        names = [f"{k:02d}-{name}" for k, name in enumerate(names)]
    return names


# -- fingerprints: resume only what was made from the same inputs and config ------------------------------
def _files_identity(path: Path) -> dict:
    path = path.absolute()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _sha256(path: Path) -> str:
    from mscp.core.checkpoint import sha256_file

    return sha256_file(Path(path))


def common_identity(spec: BatchSpec) -> dict:
    """Everything the outputs depend on besides the adapter (resolving hub ids through the cache)."""
    from mscp import __version__

    config = {k: v for k, v in spec.config.items() if k != "progress"}
    prompts = {name: [_sha256(Path(f)) for f in files] for name, files in
               (("harmful", spec.harmful or []), ("benign", [spec.benign] if spec.benign else []),
                ("task", [spec.task] if spec.task else []))}
    return {"mscp": __version__, "config": config, "prompts": prompts,
            "base": _files_identity(resolve(spec.base, "base")),
            "aligned": _files_identity(resolve(spec.aligned, "aligned")),
            "tokenizer": _files_identity(resolve(spec.tokenizer, "tokenizer")) if spec.tokenizer else None}


def fingerprint(common: dict, adapter: str, revision: str | None) -> str:
    """The digest of the common identity and the adapter's (a hub id: its resolved snapshot)."""
    from mscp.core.adapter import read_lora_config

    folder = resolve(adapter, "adapter", revision=revision, patterns=ADAPTER_FILES)
    read_lora_config(folder)  # an adapter mscp cannot project fails here, before any work
    return digest({"common": common, "adapter": _files_identity(folder)})


def completed(out: Path, fingerprint_: str) -> bool:
    """True when `out` is a complete output made from the same inputs and config."""
    out = Path(out)
    if not all((out / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        report = read_report(out)
    except MSCPError:  # damaged, or another mscp's: not this run's output
        return False
    return (report.get("batch") or {}).get("fingerprint") == fingerprint_


# -- one group of adapters (a Ray task, or a step of the local loop) ------------------------------------
def patch_group(spec: BatchSpec, jobs: list[Job], window_note: str = "") -> list[dict]:
    """Patch a group of adapters (weights read once for the group); one outcome per job.

    Bad input (MSCPError) fails only the adapter at fault: a failing group is patched again one
    adapter at a time. Other errors propagate, so the executor retries the group; an output that
    an earlier attempt completed is kept."""
    import torch

    from mscp.core.adapter import Adapter
    from mscp.core.pipeline import patch_many

    if spec.threads:
        torch.set_num_threads(spec.threads)
    config = spec.patch_config()
    results: dict[str, dict] = {}
    todo = []
    for job in jobs:
        if completed(Path(job.out), job.fingerprint):  # written by an earlier attempt of this group
            results[job.adapter] = outcome(job, "done", report_status=_report_status(job.out))
            continue
        try:  # cheap checks first, so one broken adapter does not cost the group a pass
            Adapter.load(job.adapter, allow_pickle=config.allow_pickle, revision=spec.revision)
        except MSCPError as e:
            results[job.adapter] = outcome(job, "failed", error=line(e))
        else:
            todo.append(job)

    def run(group: list[Job]) -> None:
        clock = time.perf_counter()
        extra = [{"batch": {"fingerprint": j.fingerprint, "window": window_note,
                            "summary": str(Path(j.out).parent / SUMMARY_NAME)}} for j in group]
        done = patch_many(spec.base, spec.aligned, [j.adapter for j in group], [j.out for j in group],
                          harmful=spec.harmful, benign=spec.benign, task=spec.task, tokenizer=spec.tokenizer,
                          config=config, overwrite=spec.overwrite, revision=spec.revision, report_extra=extra)
        seconds = (time.perf_counter() - clock) / len(group)
        for j, r in zip(group, done):
            results[j.adapter] = outcome(j, "done", seconds=seconds, report_status=r.report["status"])

    if todo:
        try:
            run(todo)
        except MSCPError as e:
            if len(todo) == 1:
                results[todo[0].adapter] = outcome(todo[0], "failed", error=line(e))
            else:
                for job in todo:  # which adapter is at fault: each alone
                    try:
                        run([job])
                    except MSCPError as err:
                        results[job.adapter] = outcome(job, "failed", error=line(err))
    return [results[j.adapter] for j in jobs]


def _report_status(out) -> str | None:
    try:
        return read_report(out)["status"]
    except MSCPError:
        return None


def run_local(groups: list[list[Job]], spec: BatchSpec, *, retries: int, on_done, task=patch_group,
              window_note: str = "") -> dict:
    """The groups one after the other in this process; an unexpected error retries the group."""
    for group in groups:
        for attempt in range(retries + 1):
            try:
                outcomes = task(spec, group, window_note)
                break
            except MSCPError:
                raise
            except Exception as e:  # noqa: BLE001 - disk, memory...: retried, then this group's failure
                if attempt == retries:
                    outcomes = [outcome(j, "failed", error=f"{line(e)} (after {retries + 1} attempts)")
                                for j in group]
        on_done(outcomes)
    return {"kind": "local", "tasks": len(groups)}


# -- the batch --------------------------------------------------------------------------------------------
def _absolute(path):
    """A local path made absolute; a hub id (or None) as it is."""
    return str(Path(path).absolute()) if path is not None and Path(path).exists() else path


def chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def run_batch(spec: BatchSpec, adapters: list[str], out_dir, *, executor: str = "local", ray_address: str | None = None,
              per_task: int | None = None, retries: int = 2, cpus_per_task: int = 1, progress: bool = True,
              task=patch_group) -> dict:
    """Patch every adapter into out_dir/<name>, skipping complete outputs; returns the run summary
    (also written to out_dir/mscp_run.json). `task` is the group function (tests inject faults)."""
    if executor not in EXECUTORS:
        raise MSCPError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    for name, value, low in (("adapters per task", per_task, 1), ("retries", retries, 0),
                             ("cpus per task", cpus_per_task, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise MSCPError(f"{name} must be an integer >= {low}, got {value!r}")
    if not adapters:
        raise MSCPError("no adapter given")
    started, clock = time.time(), time.perf_counter()
    out_dir = Path(out_dir).absolute()
    # absolute local paths: a Ray worker does not run in this process's working directory
    spec = dataclasses.replace(spec, base=_absolute(spec.base), aligned=_absolute(spec.aligned),
                               harmful=[_absolute(f) for f in spec.harmful] if spec.harmful else spec.harmful,
                               benign=_absolute(spec.benign), task=_absolute(spec.task),
                               tokenizer=_absolute(spec.tokenizer))
    adapters = [_absolute(a) for a in adapters]
    config = spec.patch_config()
    from mscp.core.patcher import prompt_sets

    prompt_sets(spec.harmful, spec.benign, spec.task, None)  # bad prompt files stop the run before any work
    common = common_identity(spec)
    jobs, records = [], {}
    for adapter, name in zip(adapters, output_names(adapters)):
        out = out_dir / name
        try:
            job = Job(adapter, str(out), fingerprint(common, adapter, spec.revision))
        except MSCPError as e:  # a missing or unsupported adapter fails alone
            records[adapter] = outcome(Job(adapter, str(out), ""), "failed", error=line(e))
            continue
        jobs.append(job)
        if completed(out, job.fingerprint):
            records[adapter] = outcome(job, "skipped", report_status=_report_status(out))
    if not jobs:  # no adapter can be patched: bad input, refused before anything is written
        raise MSCPError(next(iter(records.values()))["error"] if len(records) == 1 else
                        f"none of the {len(records)} adapters can be patched; the first: "
                        f"{next(iter(records.values()))['error']}")
    todo = [j for j in jobs if j.adapter not in records]
    clash = [j.out for j in todo if Path(j.out).exists()]
    if clash and not spec.overwrite:
        raise MSCPError(f"output folder {clash[0]} exists but was not made from these inputs and config"
                        f"{f' (and {len(clash) - 1} more)' if len(clash) > 1 else ''}; pass --overwrite to replace")
    from mscp.core.report import check_out_dir

    inputs = [Path(p) for p in (spec.base, spec.aligned, *adapters) if p and Path(p).exists()]
    for job in todo:  # overlaps with an input, unwritable places: refused before any folder is made
        check_out_dir(Path(job.out), True, inputs, parents=True)
    if executor == "ray" and todo:
        from mscp.executors.ray_executor import ray_session

        session = ray_session(ray_address, cpus_per_task)  # no Ray, no cluster: one line before any work
    else:
        session = contextlib.nullcontext({"kind": "local"} if executor == "local" else {"kind": "ray"})
    with session as info:
        return _run(_Run(spec=spec, adapters=adapters, out_dir=out_dir, config=config, records=records, todo=todo,
                         executor=executor, per_task=per_task, retries=retries, cpus_per_task=cpus_per_task,
                         progress=progress, task=task, info=info, started=started, clock=clock))


@dataclasses.dataclass(frozen=True)
class _Run:
    """What run_batch has checked and set up, for the rest of the run (records fills as adapters end)."""

    spec: BatchSpec
    adapters: list[str]
    out_dir: Path
    config: PatchConfig
    records: dict[str, dict]  # adapter -> its outcome so far
    todo: list[Job]
    executor: str
    per_task: int | None
    retries: int
    cpus_per_task: int
    progress: bool
    task: Callable
    info: dict  # the executor's description (ray_session's)
    started: float  # time.time() at the start, for the summary
    clock: float  # time.perf_counter() at the start


def _run(run: _Run) -> dict:
    """run_batch after its checks: the window, then the groups, then the summary."""
    from mscp.core.patcher import Patcher

    spec, config, records, todo, executor, task = run.spec, run.config, run.records, run.todo, run.executor, run.task
    info, retries = run.info, run.retries
    window, note = None, "not needed: every output was complete"
    task_config = dataclasses.replace(config, progress=False)
    if todo and config.layers is None:
        window_clock = time.perf_counter()
        # the curves see no LoRA: the window any adapter's patch would choose on these prompts
        window = Patcher.open(spec.base, spec.aligned, harmful=spec.harmful, benign=spec.benign,
                              tokenizer=spec.tokenizer, config=config).localize().safety_layers
        note = (f"layers {window[0]}-{window[-1]}: computed once for the batch by the {config.criterion} criterion "
                f"in {time.perf_counter() - window_clock:.1f} s")
        task_config = dataclasses.replace(task_config, layers=(window[0], window[-1]))
    elif config.layers is not None:
        window, note = list(range(config.layers[0], config.layers[1] + 1)), "given (--layers)"
    task_spec = dataclasses.replace(spec, config=task_config.to_dict())
    run.out_dir.mkdir(parents=True, exist_ok=True)

    size = run.per_task or (len(todo) if executor == "local" else DEFAULT_RAY_PER_TASK)
    groups = chunks(todo, max(size, 1))
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(run.adapters), initial=len(records), unit="adapter", desc=f"adapters ({executor})")
    patch_clock = time.perf_counter()

    def on_done(outcomes: list[dict]) -> None:
        for o in outcomes:
            records[o["adapter"]] = o
        if bar is not None:
            bar.update(len(outcomes))
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in records.values()), refresh=False)

    try:
        if not groups:
            pass
        elif executor == "local":
            info = {**info, **run_local(groups, task_spec, retries=retries, on_done=on_done, task=task,
                                        window_note=note)}
        else:
            from mscp.executors.ray_executor import run_on_ray

            info = {**info, **run_on_ray(groups, task_spec, retries=retries, cpus_per_task=run.cpus_per_task,
                                         on_done=on_done, task=task, window_note=note)}
    finally:
        if bar is not None:
            bar.close()
        patch_seconds = time.perf_counter() - patch_clock
        summary = summarize(run, _Ran(window=window, note=note, info=info, size=size,
                                      seconds=time.perf_counter() - run.clock, patch_seconds=patch_seconds))
        write_file_atomically(run.out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


@dataclasses.dataclass(frozen=True)
class _Ran:
    """What _run found and measured, for the summary beside _Run's records."""

    window: list[int] | None  # the safety layers every group ran with (None: no adapter needed them)
    note: str  # how the window came about
    info: dict  # the executor's description, with what it reported
    size: int  # adapters per task
    seconds: float  # the whole run
    patch_seconds: float  # the groups alone


def summarize(run: _Run, ran: _Ran) -> dict:
    """The run summary (DIR/mscp_run.json): every adapter's outcome, those not reached as not_run."""
    from mscp import __version__

    entries = [run.records.get(a) or {"adapter": a, "out": None, "status": "not_run", "error": "interrupted",
                                      "seconds": None, "report_status": None} for a in run.adapters]
    counts = {status: sum(e["status"] == status for e in entries)
              for status in ("done", "skipped", "failed", "not_run")}
    patch_seconds = ran.patch_seconds
    return {
        "mscp_version": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(run.started)),
        "seconds": round(ran.seconds, 3),
        "patch_seconds": round(patch_seconds, 3),
        "adapters_per_second": round(counts["done"] / patch_seconds, 4) if counts["done"] and patch_seconds else None,
        "executor": {**ran.info, "adapters_per_task": ran.size, "retries": run.retries},
        "counts": {**counts, "total": len(entries)},
        "noop": sum(e.get("report_status") == "noop" for e in entries),
        "safety_layers": ran.window,
        "window": ran.note,
        "out_dir": str(run.out_dir),
        "base": run.spec.base, "aligned": run.spec.aligned,
        "config": run.config.to_dict(),
        "adapters": entries,
    }
