"""The one atomic folder writer: a folder's new contents are built in a temporary sibling, flushed
to disk, then swapped in, so a reader sees the old folder or the new one, never a mix; and the one
single-file writer (`write_file_atomically`), the same for a file.

Temporary siblings are named `.NAME.tmp-HOST-PID-START` (and `.NAME.old-...` during a two-rename
swap), so a later run to the same place can tell which were left by a process that no longer runs
(killed, power lost) and removes them first; an `.old` left where NAME is missing (killed between
the two renames) is the previous NAME and is renamed back instead.

SIGINT and SIGTERM arriving while a temporary folder is created, swapped in or removed are held
until that step ends, so an interrupt never leaves one behind; a write that fails (disk full,
read-only file system) is one line, MSCPError, and leaves NAME as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import threading
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
    """Remove the temporary siblings of `out` left by dead processes; returns them.

    An `.old` sibling where `out` itself is missing holds the previous `out` (the run died between
    the two renames of a swap): it is renamed back, so `out` is the old folder, never a mix."""
    out = Path(out)
    found = stale_siblings(out)
    with signals_deferred():
        for p in sorted(found, key=lambda p: _NAME_RE.match(p.name)["kind"] != "old"):
            if _NAME_RE.match(p.name)["kind"] == "old" and not os.path.lexists(out):
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
    return found


def check_writable(out: Path) -> None:
    """Fail now, not after the work, when `out` cannot be created: a probe folder named like the
    writer's temporary sibling is made and removed beside it (in the nearest existing folder
    above it when parents are missing)."""
    out = Path(os.path.abspath(out))
    here = out
    while not here.parent.exists() and here.parent != here:
        here = here.parent
    if not here.parent.is_dir():
        raise MSCPError(f"cannot create the output folder {out}: {here.parent} is not a folder")
    probe = sibling(here, "tmp")
    try:
        with signals_deferred():
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        raise MSCPError(f"cannot create the output folder {out} in {here.parent}: {e.strerror or e}") from None


class _Deferred:
    def __init__(self):
        self.pending: list[int] = []

    def __call__(self, signum, frame):
        self.pending.append(signum)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM arriving inside the block are delivered when it ends (main thread only;
    elsewhere Python runs no signal handlers anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hold = _Deferred()
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous is not None:  # None: installed outside Python, cannot be restored
            saved[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
        for signum in hold.pending:
            signal.raise_signal(signum)


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


written: list[Path] = []  # every folder swapped in by this process, in order (what an interrupt leaves)


def write_atomically(out, fill, *, overwrite: bool = False, keep: tuple = (), mode: int = 0o755,
                     parents: bool = False) -> Path:
    """Build `out` with `fill(tmp_folder)` and swap it in; returns `out`.

    keep: paths inside an existing `out` carried into the new one as hard links (unchanged parts
    of a state). An existing `out` is replaced only with `overwrite`. parents: create missing
    parent folders (removed again if the write fails). On any error or interrupt the temporary
    folder is removed and `out` is as it was; an OSError (disk full...) becomes an MSCPError.
    """
    out = Path(out)
    if out.is_symlink():
        raise MSCPError(f"output folder {out} is a symbolic link; give the real path")
    created = _make_parents(out) if parents else []
    out = out.parent.resolve() / out.name
    tmp = sibling(out, "tmp")
    garbage = None  # the previous contents once swapped out
    try:
        remove_stale(out)
        with signals_deferred():
            tmp.mkdir()
        for rel in keep:
            link_tree(out / rel, tmp / rel)
        fill(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, mode)
        with signals_deferred():  # the swap and its record happen together or not at all
            if not out.exists():
                os.rename(tmp, out)
            elif not overwrite:
                raise MSCPError(f"output folder {out} already exists (pass --overwrite to replace it)")
            elif exchange(tmp, out):
                garbage = tmp  # tmp now holds the previous contents
            else:
                garbage = sibling(out, "old")
                os.rename(out, garbage)
                os.rename(tmp, out)
            written.append(out)
        if garbage is not None:
            with signals_deferred():
                shutil.rmtree(garbage, ignore_errors=True)
    except BaseException as e:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            if garbage is not None:
                shutil.rmtree(garbage, ignore_errors=True)
            if not out.exists():
                _remove_empty(created)
        if isinstance(e, OSError):
            raise MSCPError(f"cannot write {out}: {_reason(e)}; nothing was written") from None
        raise
    return out


def write_file_atomically(path, data: bytes | str) -> Path:
    """Write one file the way `write_atomically` writes a folder: `data` goes to a temporary
    sibling, is flushed to disk, then renamed over `path`, so a reader sees the old file or the new
    one. Missing parents are made. On any error or interrupt the temporary file is removed and
    `path` is as it was; an OSError becomes an MSCPError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_siblings(path):  # left by a killed writer: rmtree in remove_stale skips files
            stale.unlink(missing_ok=True)
        tmp = sibling(path, "tmp")
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with signals_deferred(), contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MSCPError(f"cannot write {path}: {_reason(e)}; nothing was written") from None
        raise
    return path


def _reason(e: OSError) -> str:
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else (e.strerror or str(e))


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of `out`; returns them, deepest first."""
    missing = []
    here = Path(os.path.abspath(out)).parent
    while not here.exists():
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as e:
            _remove_empty(missing)
            raise MSCPError(f"cannot create folder {folder}: {_reason(e)}") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass
