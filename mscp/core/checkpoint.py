"""Reading checkpoints one tensor at a time.

A `Checkpoint` is a model folder (single `model.safetensors`, or shards listed in
`model.safetensors.index.json`), an adapter folder, or a single `.safetensors` file. Tensors are
read with plain `seek` + `readinto` rather than mmap, so a tensor's memory is freed when the tensor
is, and a row subset of a 2-D tensor can be read without the rest. Read-only consumers (the
projection, the streamed layers) may ask for a mapped view instead (`get(..., mapped=True)`),
which copies nothing.
Every float tensor read is checked for NaN/Inf unless the caller takes that over (`check=False`).
Pickle checkpoints (`.bin`, `.pt`) are refused unless allowed, and are then loaded with
`weights_only=True`.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from mscp.core.textfiles import json_type, parse_json, read_json_object
from mscp.errors import MSCPError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# dtype names of configs and options (PatchConfig.dtype, config.json's "dtype") -> torch: the one map
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100 * 1024 * 1024


MAX_DIMS = 64  # torch's own limit on a tensor's dimensions


class SafetensorsFile:
    """Header of one .safetensors file, validated in full before any tensor is read.

    The checks are those of the safetensors format itself (the library refuses such files too):
    a header of at most MAX_HEADER_BYTES of UTF-8 JSON, an object without duplicate names; each
    entry a known dtype, a shape of non-negative integers and data_offsets [begin, end] with
    end - begin = product(shape) x item size; the byte ranges, ordered, start at 0, follow each
    other without gap or overlap and end exactly where the file does.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MSCPError(f"missing safetensors file: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MSCPError(f"truncated safetensors file (no header): {self.path}")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER_BYTES:
                raise MSCPError(f"corrupt safetensors header: {self.path} declares a header of {header_len} bytes "
                                f"(at most {MAX_HEADER_BYTES})")
            if header_len > size - 8:
                raise MSCPError(f"truncated or corrupt safetensors header: {self.path}")
            text = f.read(header_len)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise MSCPError(f"corrupt safetensors header: {self.path} (not UTF-8)") from None
        header = parse_json(text, f"corrupt safetensors header: {self.path}")
        if not isinstance(header, dict):
            raise MSCPError(f"corrupt safetensors header (not a JSON object): {self.path}")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise MSCPError(f"corrupt safetensors header: __metadata__ of {self.path} is not an object of strings")
        self.metadata = metadata or {}
        self.data_start = 8 + header_len
        self.bytes_read = 0
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info)
        self._check_layout(size - self.data_start)

    def _entry(self, name, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """One header entry, checked: known dtype, integer shape, a byte range of exactly its size."""
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _ints(shape) and _ints(offsets)
                and len(offsets) == 2):
            raise MSCPError(f"corrupt safetensors header entry {name!r} in {self.path}")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise MSCPError(f"unsupported dtype {info['dtype'][:40]!r} for {name!r} in {self.path}")
        if len(shape) > MAX_DIMS:
            raise MSCPError(f"corrupt safetensors header: {name!r} has {len(shape)} dimensions in {self.path}")
        begin, end = offsets
        numel, extent = 1, dtype.itemsize
        for s in shape:
            numel *= s
            extent *= max(s, 1)
        if extent >= 2**63:  # torch (and the format) compute sizes in int64, zero dimensions or not
            raise MSCPError(f"corrupt safetensors header: the shape of {name!r} overflows 64-bit sizes in {self.path}")
        if min(shape, default=0) < 0 or begin < 0 or end - begin != numel * dtype.itemsize:
            raise MSCPError(f"corrupt safetensors header: the byte range of {name!r} does not match its shape in {self.path}")
        return dtype, tuple(shape), begin, end

    def _check_layout(self, data_bytes: int) -> None:
        """The tensors' byte ranges tile the data section: no overlap (two tensors sharing bytes), no
        gap, nothing after the last one; a range past the end is a truncated file."""
        at, previous = 0, None
        for name, (_dtype, _shape, begin, end) in sorted(self.entries.items(), key=lambda e: e[1][2:]):
            if begin != at:
                what = f"overlaps {previous!r}" if begin < at else "leaves a gap before it"
                raise MSCPError(f"corrupt safetensors header: the byte range of {name!r} {what} in {self.path}")
            if end > data_bytes:
                raise MSCPError(f"truncated safetensors file: {self.path} ends before tensor {name!r}")
            at, previous = end, name
        if at != data_bytes:
            raise MSCPError(f"corrupt safetensors file: {self.path} has {data_bytes - at} bytes after its last tensor")

    def read(self, name: str, rows: torch.Tensor | None = None, pin: bool = False) -> torch.Tensor:
        """The tensor `name`, or only the given rows (sorted, unique) of a 2-D tensor.

        pin: read into page-locked memory, so the copy to a GPU can run asynchronously.
        """
        dtype, shape, begin, end = self.entries[name]
        self.bytes_read += (end - begin) if rows is None else (end - begin) // max(shape[0], 1) * len(rows)
        with open(self.path, "rb", buffering=0) as f:
            if rows is None:
                out = torch.empty(shape, dtype=dtype, pin_memory=pin)
                _readinto(f, self.data_start + begin, out)
                return out
            row_bytes = (end - begin) // shape[0]
            out = torch.empty((len(rows), *shape[1:]), dtype=dtype, pin_memory=pin)
            for first, last, at in _runs(rows.tolist()):  # one read per run of consecutive rows
                _readinto(f, self.data_start + begin + first * row_bytes, out[at : at + last - first + 1])
            return out

    def map(self, name: str) -> torch.Tensor | None:
        """A read-only view of the tensor's bytes in the file: mmap'd with its pages mapped up front.

        No allocation and no copy. A fresh tensor for every read pays a page fault on each 4 KiB
        and the kernel zeroes each page; on this machine that made reading 256 MB out of the page
        cache 7-30x slower than reading into touched memory, and mapping is faster still. The view
        must only be read (writing to it crashes). None where mmap is unavailable or the bytes are
        not aligned to the element size; then use `read`.
        """
        dtype, shape, begin, end = self.entries[name]
        start = self.data_start + begin
        if not hasattr(mmap, "MAP_SHARED") or end == begin or start % dtype.itemsize:
            return None
        at = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), end + self.data_start - at, offset=at, prot=mmap.PROT_READ,
                                flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": callers only read it
            t = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start - at)
        self.bytes_read += end - begin
        return t.view(shape)  # the tensor holds the mapping; it is unmapped when the tensor is freed


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _readinto(f, offset: int, out: torch.Tensor) -> None:
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise MSCPError(f"truncated safetensors file: {f.name}")
        done += n


def _runs(rows: list[int]):
    """[3,4,5,9] -> (3,5,0), (9,9,3): first row, last row, position in the output."""
    at = 0
    while at < len(rows):
        stop = at
        while stop + 1 < len(rows) and rows[stop + 1] == rows[stop] + 1:
            stop += 1
        yield rows[at], rows[stop], at
        at = stop + 1


def read_shard_index(index: Path) -> dict[str, str]:
    """The weight_map of `model.safetensors.index.json`: tensor name -> shard file name.

    Shards are plain file names inside the index's folder, so a checkpoint never reads a file
    outside its own folder (a name like ../base/model.safetensors is refused). Symbolic links
    inside the folder are followed, as the hub's cache lays out snapshots that way.
    """
    data = read_json_object(index, "shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise MSCPError(f"corrupt shard index: {index} (no 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise MSCPError(f"corrupt shard index: {index} maps {name!r} to a JSON {json_type(shard)}, not a file name")
        if not _plain_file_name(shard):
            raise MSCPError(f"shard index {index} names {shard[:200]!r}, which is not a file inside the model folder")
        if not shard.endswith(".safetensors"):
            raise MSCPError(f"shard index {index} names {shard[:200]!r}, which is not a .safetensors file")
    return weight_map


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and Path(name).name == name


class Checkpoint:
    """Named tensors of a model or adapter, read one at a time."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, label: str = "checkpoint",
                 stem: str = "model"):
        self.label = label
        self.path = Path(resolve_model_path(path, label))
        self._st: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files: list[Path] = []
        if self.path.is_file():
            self._open_file(self.path, allow_pickle)
        else:
            self._open_dir(stem, allow_pickle)
        if not self._where:
            raise MSCPError(f"{label} checkpoint {self.path} holds no tensors")

    # -- opening -------------------------------------------------------------------------
    def _open_dir(self, stem: str, allow_pickle: bool):
        d = self.path
        index = d / f"{stem}.safetensors.index.json"
        single = d / f"{stem}.safetensors"
        if index.is_file():
            weight_map = read_shard_index(index)
            self.files.append(index)
            for shard in sorted(set(weight_map.values())):
                self._open_safetensors(d / shard)
            missing = sorted(name for name, shard in weight_map.items() if self._where.get(name) != d / shard)
            if missing:
                raise MSCPError(f"shard index {index} lists tensors absent from the shards, e.g. {missing[0]}")
            return
        if single.is_file():
            self._open_safetensors(single)
            return
        pickles = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
        if pickles:
            for p in pickles:
                self._open_file(p, allow_pickle)
            return
        raise MSCPError(f"no {stem}.safetensors (or shard index) in {self.label} folder {d}")

    def _open_file(self, path: Path, allow_pickle: bool):
        if path.suffix == ".safetensors":
            self._open_safetensors(path)
        elif path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise MSCPError(f"refusing pickle checkpoint {path} (pass --allow-pickle to load it with weights_only=True)")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input
                raise MSCPError(f"cannot load pickle checkpoint {path}: {str(e).splitlines()[0]}") from None
            if not isinstance(state, dict):
                raise MSCPError(f"pickle checkpoint {path} is not a state dict")
            bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
            if bad is not None:
                raise MSCPError(f"pickle checkpoint {path} holds a non-tensor entry {bad!r}; save only the state dict")
            self._pickled = {**(self._pickled or {}), **state}
            self.files.append(path)
            for name in state:
                self._where[name] = path
        else:
            raise MSCPError(f"unsupported checkpoint file {path}")

    def _open_safetensors(self, path: Path):
        st = SafetensorsFile(path)
        self._st[path] = st
        self.files.append(path)
        for name in st.entries:
            if name in self._where:  # which copy a reader gets would depend on the order files are opened
                raise MSCPError(f"{self.label} checkpoint {self.path}: tensor {name!r} is in both "
                                f"{self._where[name].name} and {path.name}")
            self._where[name] = path

    # -- reading -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from safetensors files so far (pickles are loaded whole)."""
        return sum(st.bytes_read for st in self._st.values())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of every tensor of the checkpoint: one read of the whole model."""
        pickled = sum(t.numel() * t.element_size() for t in (self._pickled or {}).values())
        return pickled + sum(end - begin for st in self._st.values() for (_d, _s, begin, end) in st.entries.values())

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, offset, length) of a safetensors tensor's bytes, for raw-read measurements."""
        self._require(name)
        st = self._st[self._where[name]]
        _dtype, _shape, begin, end = st.entries[name]
        return st.path, st.data_start + begin, end - begin

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        if self._pickled is not None and name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self._st[self._where[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype as stored (what `get` returns without a dtype), read from the header."""
        self._require(name)
        if self._pickled is not None and name in self._pickled:
            return self._pickled[name].dtype
        return self._st[self._where[name]].entries[name][0]

    def get(self, name: str, *, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu", check: bool = True, mapped: bool = False) -> torch.Tensor:
        """Read one tensor (or some rows of it), move and cast it, check it is finite (on the device).

        check=False leaves the finiteness check to the caller (the projection gets it for free from
        ||V||, saving a pass over the weights). mapped=True returns, for a whole tensor on the CPU in
        its own dtype, a read-only view of the file's pages (`SafetensorsFile.map`) where it can."""
        self._require(name)
        to_gpu = torch.device(device).type == "cuda"
        if self._pickled is not None and name in self._pickled:
            t = self._pickled[name]
            t = t[rows] if rows is not None else t.clone()
        else:
            st = self._st[self._where[name]]
            view = st.map(name) if mapped and rows is None and not to_gpu and dtype in (None, st.entries[name][0]) else None
            t = view if view is not None else st.read(name, rows, pin=to_gpu)
        t = t.to(device=device, dtype=dtype if dtype is not None else t.dtype, non_blocking=to_gpu)
        if check:
            check_finite(t, self.label, name)
        return t

    def _require(self, name: str):
        if name not in self._where:
            raise MSCPError(f"{self.label} checkpoint {self.path} has no tensor {name}")


def check_finite(t: torch.Tensor, label: str, name: str) -> None:
    """NaN or Inf anywhere in a float tensor is bad input.

    One min/max reduction: NaN propagates into both, an Inf becomes one of them. About 25x
    faster than `isfinite(t).all()`, which builds a bool tensor as large as t.
    """
    if t.is_floating_point() and t.numel():
        low, high = torch.aminmax(t)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise MSCPError(f"{label} tensor {name} contains NaN or Inf")


def resolve_model_path(path: str | Path, label: str, *, revision: str | None = None, patterns=None) -> Path:
    """A local folder or file; a hub id ('org/name', 'org/name@rev') through the Hugging Face cache."""
    from mscp.core.hub import resolve

    return resolve(path, label, revision=revision, patterns=patterns)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    """The file's SHA-256, read once per process while its size and modification time hold (a
    patch's report, its cache keys and the evaluation's answer cache all ask for the same models)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_files(folder: Path) -> list[Path]:
    """The json/tokenizer files of a model folder, for the report's checksums."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".jinja", ".model", ".txt")
                  and not p.name.endswith(".index.json"))


class StateDictSource:
    """An in-memory state dict with the reading interface of `Checkpoint`."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str):
        self.label = label
        self.tensors = tensors
        self.files: list[Path] = []
        self.path = None
        self.bytes_read = 0  # in memory: nothing is read from storage
        self.tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise MSCPError(f"{self.label} state dict has no tensor {name}")
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if name not in self.tensors:
            raise MSCPError(f"{self.label} state dict has no tensor {name}")
        return self.tensors[name].dtype

    def get(self, name, *, rows=None, dtype=None, device="cpu", check: bool = True, mapped: bool = False):
        t = self.tensors.get(name)
        if t is None:
            raise MSCPError(f"{self.label} state dict has no tensor {name}")
        t = t[rows] if rows is not None else t
        if check:
            check_finite(t, self.label, name)
        return t.to(device=device, dtype=dtype if dtype is not None else t.dtype, copy=True)


def open_source(obj, label: str, *, allow_pickle: bool = False):
    """A `Checkpoint` for a path, a `StateDictSource` for a dict, or the source itself."""
    if isinstance(obj, dict):
        return StateDictSource(obj, label)
    if isinstance(obj, (str, Path)):
        return Checkpoint(obj, allow_pickle=allow_pickle, label=label)
    return obj
