"""What a patch computes from the base and aligned models and the prompts alone, kept between runs.

The layer curves (level 1) and the aligned model's answers to the harmful prompts (the attribution
score's targets, with its log-likelihood of each token) are the same for every adapter of one
base/aligned pair and one prompt set: a service patching adapters one process at a time, or the demo
patching one adapter two ways, need not compute them again. Each entry is keyed by the SHA-256 of
the model files, the prompts' token ids and every setting that shapes it (dtype, device, batch
size, ...), so a changed input is a miss, never a stale hit. Entries live in a `Store`
(core/store.py): `curves-v1-<digest>.json`, `targets_harmful-v2-<digest>.json`.
"""
from __future__ import annotations

from pathlib import Path

from mscp.core.store import Store, files_digest

# each kind's schema version: bump one when what its entries hold, or how they are computed, changes
VERSIONS = {"curves": 1, "targets_harmful": 2}

files_sha256 = files_digest  # the name the pipeline keys the model files by


class ResultCache:
    """The patch's view of a Store: `get(kind, parts)` / `put(kind, parts, value)` with the
    kind's version from VERSIONS; `folder` and `used` are what the report records."""

    def __init__(self, folder: str | Path):
        self.store = Store(folder)

    @property
    def folder(self) -> Path:
        return self.store.root

    @property
    def used(self) -> dict[str, str]:
        return self.store.used

    def get(self, kind: str, parts):
        return self.store.get(kind, parts, VERSIONS[kind])

    def put(self, kind: str, parts, value) -> None:
        self.store.put(kind, parts, VERSIONS[kind], value)
