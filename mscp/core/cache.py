"""What a patch computes from the base and aligned models and the prompts alone, kept between runs.

The layer curves (level 1) and the aligned model's answers to the harmful prompts (the attribution
score's targets) are the same for every adapter of one base/aligned pair and one prompt set: a
service patching adapters one process at a time, or the demo patching one adapter two ways, need
not compute them again. Each entry is keyed by the SHA-256 of the model files, the prompts' token
ids and every setting that shapes it (dtype, device, batch size, ...), so a changed input is a miss,
never a stale hit. Entries are JSON files written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mscp.core.checkpoint import sha256_file

VERSION = 1  # part of every key: bump when what an entry holds, or how it is computed, changes


def files_sha256(paths) -> str:
    """One digest of several files (each read once per process while its size and mtime hold)."""
    parts = [f"{p.name}:{sha256_file(p)}" for p in sorted(Path(p).resolve() for p in paths)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class ResultCache:
    """A folder of entries: `get(kind, parts)` is the stored value or None; `put` stores one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.used: dict[str, str] = {}  # kind -> "hit" / "stored": what the report records

    def key(self, kind: str, parts) -> str:
        return hashlib.sha256(json.dumps([VERSION, kind, parts], sort_keys=True).encode()).hexdigest()[:32]

    def get(self, kind: str, parts):
        path = self.folder / f"{kind}-{self.key(kind, parts)}.json"
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):  # a damaged entry is a miss; it is replaced on put
            return None
        self.used[kind] = "hit"
        return value

    def put(self, kind: str, parts, value) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{kind}-{self.key(kind, parts)}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
        self.used[kind] = "stored"
