"""The one atomic folder writer: a folder's new contents are built in a temporary sibling, flushed
to disk, then swapped in, so a reader sees the old folder or the new one, never a mix.

Temporary siblings are named `.NAME.tmp-HOST-PID-START` (and `.NAME.old-...` during a two-rename
swap), so a later run to the same place can tell which were left by a process that no longer runs
(killed, power lost) and removes them first.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
from pathlib import Path

from mscp.errors import MSCPError

_NAME_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<start>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def sibling(out: Path, kind: str) -> Path:
    """`.NAME.tmp-HOST-PID-START` beside `out` (kind 'tmp' or 'old')."""
    start = _start_ticks(os.getpid()) or 0
    return out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}-{start}"


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    ticks = _start_ticks(pid)
    return ticks is None or start == 0 or ticks == start


def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of `out` left by processes of this host that no longer run."""
    out = Path(out)
    found = []
    try:
        candidates = list(out.parent.iterdir())
    except OSError:
        return []
    for p in candidates:
        m = _NAME_RE.match(p.name)
        if m and m["name"] == out.name and m["host"] == _host() and not _alive(int(m["pid"]), int(m["start"])):
            found.append(p)
    return found


def remove_stale(out: Path) -> list[Path]:
    removed = stale_siblings(out)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """Hard links of `src` (a file or a folder) at `dst`; copies where links are not possible."""
    if src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            link_tree(child, dst / child.name)
    elif src.exists():
        _link_or_copy(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def write_atomically(out, fill, *, overwrite: bool = False, keep: tuple = (), mode: int = 0o755) -> Path:
    """Build `out` with `fill(tmp_folder)` and swap it in; returns `out`.

    keep: paths inside an existing `out` carried into the new one as hard links (unchanged parts
    of a state). An existing `out` is replaced only with `overwrite`. On any error or interrupt the
    temporary folder is removed and `out` is as it was.
    """
    out = Path(out)
    if out.is_symlink():
        raise MSCPError(f"output folder {out} is a symbolic link; give the real path")
    out = out.parent.resolve() / out.name
    remove_stale(out)
    tmp = sibling(out, "tmp")
    tmp.mkdir()
    try:
        for rel in keep:
            link_tree(out / rel, tmp / rel)
        fill(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, mode)
        if not out.exists():
            os.rename(tmp, out)
        elif not overwrite:
            raise MSCPError(f"output folder {out} already exists (pass --overwrite to replace it)")
        elif exchange(tmp, out):  # tmp now holds the previous contents
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = sibling(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
