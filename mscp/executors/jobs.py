"""What travels between the batch's driver and its tasks: the shared spec, one job per adapter,
and the outcome of each (plain values, picklable as they are)."""
from __future__ import annotations

from dataclasses import dataclass

from mscp.core.config import PatchConfig, config_from_mapping
from mscp.errors import MSCPError

SUMMARY_NAME = "mscp_run.json"


@dataclass
class BatchSpec:
    """What every group of the batch shares: plain values, so it travels to Ray workers as it is."""

    base: str
    aligned: str
    config: dict  # PatchConfig fields
    harmful: list[str] | None = None
    benign: str | None = None
    task: str | None = None
    tokenizer: str | None = None
    revision: str | None = None  # of adapter hub ids given without @REV
    overwrite: bool = False
    threads: int | None = None  # torch threads of a task (a Ray task's CPUs)

    def patch_config(self) -> PatchConfig:
        return PatchConfig(**config_from_mapping(self.config))


@dataclass
class Job:
    """One adapter of the batch: where its output goes, and the fingerprint that output must carry."""

    adapter: str
    out: str
    fingerprint: str


def line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, MSCPError) else f"{type(e).__name__}: {text}"[:300]


def outcome(job: Job, status: str, *, error: str | None = None, seconds: float | None = None,
            report_status: str | None = None) -> dict:
    return {"adapter": job.adapter, "out": job.out, "status": status, "error": error, "seconds": seconds,
            "report_status": report_status}
