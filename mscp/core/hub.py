"""Hugging Face Hub ids wherever a folder is accepted: `org/name`, `org/name@REVISION`, or an id with
`revision=` (`--revision`). Resolved through the local Hugging Face cache by `huggingface_hub`
(HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE as usual); offline, or when the hub cannot be reached,
a cached snapshot is used, and otherwise the error is one line naming the id, the revision and
the cache that was searched.
"""
from __future__ import annotations

import re
from pathlib import Path

from mscp.errors import MSCPError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """'org/name@rev' -> ('org/name', 'rev'); None when the text cannot be a hub id."""
    m = HUB_ID.match(str(text))
    if m is None or str(text).startswith((".", "/")):
        return None
    return m["repo"], m["revision"]


def resolve(path, label: str, *, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """A local path as it is; a hub id -> the folder of its snapshot in the Hugging Face cache."""
    p = Path(path)
    if p.exists():
        return p
    parsed = parse_hub_id(str(path))
    if parsed is None:
        raise MSCPError(f"{label} path does not exist: {p}")
    repo, pinned = parsed
    revision = pinned or revision
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MSCPError(f"{label} {path!r} is not a local path, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns or MODEL_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, unknown revision...
        raise MSCPError(_hub_message(label, repo, revision, e)) from None


def _hub_message(label: str, repo: str, revision: str | None, e: Exception) -> str:
    from huggingface_hub import constants

    what = f"{label} {repo!r}" + (f" at revision {revision!r}" if revision else "")
    kind = type(e).__name__
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        why = ("the hub is offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
               else "the hub could not be reached")
        return (f"{what} is not a local path and is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"{why}")
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"{what}: no such repository on the hub, or it is private or gated (log in with `hf auth login`)"
    if kind == "RevisionNotFoundError":
        return f"{what}: the repository has no such revision"
    return f"{what} could not be fetched from the hub: {kind}: {' '.join(str(e).split())[:160]}"
