"""STATE/state.json as a typed record: `State`, with its `Module`s and `Dimension`s.

`State.from_json` is the one reader: it checks the schema version (the key `format`) and every
field, its JSON type and the modules the row lists name, and says what is wrong in one MSCPError
line; `State.to_json` is the one writer, the same keys in the same order. The fields are declared
in the order state.json holds them.

Schema versions: 1, the layout since continual states exist (a file without `format`, as none was
ever written, is read as 1). Bump STATE_VERSION when a field is renamed, dropped or changes meaning,
and read the older layout here or refuse it by its version.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Union

from mscp.core.config import config_from_mapping
from mscp.core.textfiles import json_type
from mscp.errors import MSCPError

STATE_VERSION = 1
_OMIT_NONE = {"omit_none": True}  # a field written only when set (e.g. prompts_sampled)


class _Bad(ValueError):
    """What is wrong with a field, in words; from_json adds the file."""


@dataclass(frozen=True)
class Module:
    """A LoRA module of the adapter: where it sits and what `init`'s projection of all its rows found."""

    module: str
    layer: int
    name: str  # its name inside the decoder layer
    d_out: int
    rank: int
    safety_layer: bool  # in the window: its rows can be projected
    norm_v: float | None  # ‖V‖_F of its projection (None outside the window)
    skipped: str | None  # why its rows are never edited (e.g. "V is zero"), else None


@dataclass(frozen=True)
class Dimension:
    """A safety dimension added (`add`): its prompts, its mask and what it added to the union."""

    name: str
    step: int
    harmful_files: list[str] | str  # the prompt files, or "in-memory"
    harmful_sha256: dict[str, str]
    prompts_sha256: str
    prompts: int
    q: float
    p: float
    prompts_sampled: dict | None = field(metadata=_OMIT_NONE)
    mask_rows: int
    mask_parameters: int
    mask_edit_fraction: float
    new_rows: int
    new_parameters: int
    incremental_edit_fraction: float
    cumulative_edit_fraction: float
    rows: dict[str, list[int]]  # lora_B key -> the mask's rows
    new_rows_by_module: dict[str, list[int]]  # lora_B key -> the rows not in the union before


@dataclass(frozen=True)
class State:
    """What STATE/state.json holds (continual/state.py's docstring: what every step reuses)."""

    format: int  # the schema version, STATE_VERSION
    mscp_version: str | None
    created: str
    paths: dict[str, str]  # base, aligned, adapter (, tokenizer): as init was given them, resolved
    config: dict  # PatchConfig.to_dict() of init
    n_layers: int
    safety_layers: list[int]
    layer_curves: list[dict]
    modules: dict[str, Module]  # lora_B key -> its module
    lora_parameters: int
    adapter_config: dict
    prompts: dict[str, int]
    prompts_sha256: dict[str, str]
    prompts_sampled: dict | None = field(metadata=_OMIT_NONE)
    prompt_sources: dict
    backends: dict[str, str]
    compute_dtype: str
    init_timings_s: dict
    inputs_sha256: dict | str  # or why not computed
    inputs_stat: dict[str, dict[str, list[int]]]  # role -> file -> [size, mtime_ns] (`add` checks them)
    versions: dict
    dimensions: list[Dimension]
    union: dict[str, list[int]]  # lora_B key (a safety-layer module) -> the rows projected so far
    history: list[dict]  # one entry a step: init, add, a repeated add

    @classmethod
    def from_json(cls, data, where) -> State:
        """The record of a parsed state.json (`where`: the file, for messages). A damaged or foreign
        file, or one of a newer schema, is one MSCPError line."""
        if not isinstance(data, dict):
            raise MSCPError(f"corrupt continual state: {where} (a JSON {json_type(data)}, not an object)")
        version = data.get("format", 1)  # none was ever written without it; read as the first
        if type(version) is not int or not 1 <= version <= STATE_VERSION:
            newer = type(version) is int and version > STATE_VERSION
            raise MSCPError(f"{where} has state format {version!r}{' (written by a newer mscp)' if newer else ''}; "
                            f"this mscp reads format {STATE_VERSION}")
        try:
            state = _record(cls, {"format": version, **data}, "")
            _check_references(state)
        except _Bad as e:
            raise MSCPError(f"corrupt continual state: {where} ({e})") from None
        config_from_mapping(state.config, where=f"{where}: config")  # field names only; add checks the values
        return state

    def to_json(self) -> dict:
        """The JSON object of state.json (from_json's inverse)."""
        return _json(self)


# -- reading: each field checked against its declared type -----------------------------------------------
def _record(cls, data, where: str):
    """A dataclass from a JSON object: every field present (those written only when set may be
    absent), of its declared type; no field it does not declare."""
    if not isinstance(data, dict):
        raise _Bad(f"{where}a JSON {json_type(data)} where an object belongs")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.metadata.get("omit_none"):
                values[f.name] = None
                continue
            raise _Bad(f"{where}no '{f.name}'")
        values[f.name] = _value(data[f.name], hints[f.name], f.name, where)
    unknown = sorted(set(data) - set(values))
    if unknown:
        raise _Bad(f"{where}unknown field '{unknown[0]}'")
    return cls(**values)


_PLAIN = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def _value(value, hint, name: str, where: str):
    """`value` checked to be of type `hint` (nested records built); `name` says which field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _value(value, option, name, where)
            except _Bad:
                continue
        raise _Bad(f"{where}'{name}' is a JSON {json_type(value)}")
    if hint is type(None):
        if value is None:
            return None
        raise _Bad(f"{where}'{name}' is a JSON {json_type(value)}")
    if dataclasses.is_dataclass(hint):
        return _record(hint, value, where)
    plain = origin or hint
    ok = isinstance(value, plain) and not (isinstance(value, bool) and plain in (int, float))
    if plain is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise _Bad(f"{where}'{name}' is a JSON {json_type(value)}")
    if plain is list and args:
        return [_value(v, args[0], f"{name}[{i}]", _inside(args[0], i, where)) for i, v in enumerate(value)]
    if plain is dict and args:
        return {k: _value(v, args[1], name, _inside(args[1], k, where)) for k, v in value.items()}
    return value


def _inside(item, key, where: str) -> str:
    """Where a record inside a list or dict is, for messages: "module KEY: ", "dimension N: "."""
    return f"{where}{item.__name__.lower()} {key}: " if dataclasses.is_dataclass(item) else where


def _check_references(state: State) -> None:
    """What the types do not say: a window, an aligned model, rows of modules the state has."""
    if not state.safety_layers:
        raise _Bad("'safety_layers' is not a list of layer indices")
    if "aligned" not in state.paths:
        raise _Bad("no 'paths.aligned'")
    if any(k not in state.modules for k in state.union):
        raise _Bad("'union' names rows of unknown modules")
    for n, d in enumerate(state.dimensions):
        if any(k not in state.modules for k in d.rows):
            raise _Bad(f"dimension {n}: rows of unknown modules")


# -- writing -------------------------------------------------------------------------------------------
def _json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value
