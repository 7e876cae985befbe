"""The one store for what is computed once and read again: the patch cache (curves, the aligned
model's refusals), the evaluation's answers, the organism's base answers, the harness's scoring
passes and the embedding judge's weights.

An entry is addressed by what it was computed from: `digest(parts)`, the SHA-256 of a canonical
JSON encoding of the parts (keys sorted, no spaces, paths as strings), always the full 64 hex
characters, never cut. It is named

    <kind>-v<version>-<digest>.json     a JSON value (`get` / `put`)
    <kind>-v<version>-<digest>/         a folder of files (`folder`)

kind names what it holds (lower case, digits, `_`; no `-`, so a name splits unambiguously) and
version is that kind's schema version: bump it when what an entry holds, or how it is computed,
changes, and every older entry is a miss, never misread. A changed input is a changed digest, so a
miss too. Files are written by `write_file_atomically` and folders by `write_atomically`, so a
reader sees a whole entry or none; an entry that cannot be read (damaged by hand, a disk error) is
a miss, and the next store replaces it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from mscp.core.atomic import write_atomically, write_file_atomically

_KIND = re.compile(r"[a-z][a-z0-9_]*")


def _plain(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # anything else has no stable text (a set's order, an object's address): fail, never a random key
    raise TypeError(f"a store key cannot hold {type(value).__name__}: give it as JSON values or paths")


def digest(value) -> str:
    """The full SHA-256 (64 hex) of `value` as canonical JSON; the one content address of mscp."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def files_digest(paths) -> str:
    """One digest of several files' names and contents, whatever order they come in."""
    from mscp.core.checkpoint import sha256_file

    return digest(sorted([Path(p).name, sha256_file(p)] for p in paths))


class Store:
    """Entries in `root` (made on first store); `used` records kind -> "hit" / "stored"."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.used: dict[str, str] = {}

    def name(self, kind: str, parts, version: int) -> str:
        """`<kind>-v<version>-<digest(parts)>`, the entry's name without a suffix."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"store kind {kind!r}: lower-case letters, digits and _ only")
        if type(version) is not int or version < 0:
            raise ValueError(f"store version {version!r}: a whole number >= 0")
        return f"{kind}-v{version}-{digest(parts)}"

    def get(self, kind: str, parts, version: int) -> Any:
        """The stored JSON value, or None on a miss (absent or unreadable)."""
        path = self.root / f"{self.name(kind, parts, version)}.json"
        try:
            value = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        self.used[kind] = "hit"
        return value

    def put(self, kind: str, parts, version: int, value) -> None:
        if value is None:  # get's miss; a stored None could never be told apart from one
            raise ValueError("a store value cannot be None")
        write_file_atomically(self.root / f"{self.name(kind, parts, version)}.json", json.dumps(value))
        self.used[kind] = "stored"

    def folder(self, kind: str, parts, version: int, fill: Callable[[Path], None],
               read: Callable[[Path], Any] = lambda path: path) -> Any:
        """`read(entry folder)`; on a miss the folder is built first by `fill(empty folder)` and
        swapped in whole. An entry `read` fails on with OSError or ValueError is damaged: a miss."""
        path = self.root / self.name(kind, parts, version)
        if path.is_dir():
            try:
                value = read(path)
            except (OSError, ValueError):
                pass
            else:
                self.used[kind] = "hit"
                return value
        write_atomically(path, fill, overwrite=True, parents=True)
        self.used[kind] = "stored"
        return read(path)
