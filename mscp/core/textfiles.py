"""The small text files a run reads (prompt files, adapter_config.json, shard indexes, state.json):
strict UTF-8 and strict JSON, every failure one line naming the file.

Strict JSON here means: no duplicate keys (which one wins is parser-dependent, so a file that has
them means two things), no NaN/Infinity constants (not JSON), and nesting too deep for the parser
is refused rather than a RecursionError.
"""
from __future__ import annotations

import codecs
import json
import os
import stat
import sys
from pathlib import Path

from mscp.errors import MSCPError

_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))  # UTF-32 LE starts like UTF-16 LE


_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is not a regular file (a FIFO)"),
          (stat.S_ISCHR, "is not a regular file (a character device)"),
          (stat.S_ISBLK, "is not a regular file (a block device)"), (stat.S_ISSOCK, "is not a regular file (a socket)"))


def check_regular_file(path: Path, what: str) -> None:
    """`path` is a regular file, checked by os.stat before any open: opening a FIFO blocks until a
    writer comes, and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MSCPError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise MSCPError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((words for test, words in _KINDS if test(mode)), "is not a regular file")
        raise MSCPError(f"{what} {path} {kind}")


def read_bytes(path: Path, what: str) -> bytes:
    check_regular_file(path, what)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MSCPError(f"cannot read {what} {path}: {e.strerror or e}") from None


def decode_text(data: bytes, what: str, path) -> str:
    """UTF-8 (a leading BOM, as spreadsheets write, is dropped); anything else is refused."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise MSCPError(f"{what} {path} is {name} text; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MSCPError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if "\x00" in text:
        raise MSCPError(f"{what} {path} holds NUL bytes: not a text file")
    return text


def read_text(path: Path, what: str) -> str:
    return decode_text(read_bytes(path, what), what, path)


def unicode_problem(text: str) -> str | None:
    """Why `text` is not Unicode text, or None. A JSON string may spell a lone surrogate
    ("\\ud800"), which no UTF-8 encoder (a tokenizer's included) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), which is not Unicode text"
    return None


class _Invalid(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name):
    raise _Invalid(f"{name} is not JSON")


def parse_json(text: str | bytes, error: str, *, allow_nan: bool = False):
    """The JSON value of `text`; on failure MSCPError(error + the reason)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except _Invalid as e:
        raise MSCPError(f"{error} ({e})") from None
    except json.JSONDecodeError as e:
        raise MSCPError(f"{error} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise MSCPError(f"{error} (not UTF-8)") from None
    except ValueError:  # (after its subclass above) an integer past Python's int(str) digit limit
        raise MSCPError(f"{error} (an integer of more than {sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise MSCPError(f"{error} (nested too deeply)") from None


def read_json_object(path: Path, what: str, *, allow_nan: bool = False) -> dict:
    """A file holding one JSON object (adapter_config.json, a shard index, state.json)."""
    value = parse_json(read_text(path, what), f"corrupt {what}: {path}", allow_nan=allow_nan)
    if not isinstance(value, dict):
        raise MSCPError(f"corrupt {what}: {path} (a JSON {json_type(value)}, not an object)")
    return value


def json_type(value) -> str:
    """JSON's name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
