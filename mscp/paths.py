"""Where mscp keeps what it computes once: one cache root, chosen here and nowhere else.

`MSCP_CACHE` if set, else `$XDG_CACHE_HOME/mscp`, else `~/.cache/mscp`. Everything cached lives
under it (the converted SmolLM2 model, the organism, answers, judges, the patch cache's default, the
C++ build), and `cache_dir` makes the folders on demand, so a machine that has never seen mscp (no
`~/.cache` at all) works as well as the developer's.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MSCP_CACHE"
CACHE_ROOT_HELP = ("caches live under $MSCP_CACHE, else $XDG_CACHE_HOME/mscp, else ~/.cache/mscp "
                   "(made on first use)")


def cache_root(root: str | Path | None = None) -> Path:
    """The cache root: `root` when given (a `--cache` option), else as above. Not created here:
    `cache_dir` makes what a writer needs."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "mscp"
    return Path.home() / ".cache" / "mscp"


def cache_dir(*parts: str, root: str | Path | None = None) -> Path:
    """`<root>/<parts...>`, created with its parents; `root` defaults to `cache_root()`."""
    folder = cache_root(root).joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
