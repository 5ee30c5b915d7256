"""Model bundle manifest and checksums (ARCHITECTURE.md §3). Pure core: no Django import.

A bundle is one directory. ``manifest.json`` at its root records the version, creation time,
data snapshot ids, feature list and schema, parameters, offline metrics and the sha256 of
every other file in the directory tree. Pickle files are never allowed: loading one runs
arbitrary code, and the bundle format (npz, parquet, faiss, LightGBM text, ONNX, SQLite)
never needs it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# joblib files are pickles under another name.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle cannot be written as asked (for example it contains a pickle file)."""


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_pickle(name: str) -> bool:
    """True for file names whose suffix marks a pickle (``.pkl``, ``.pickle``, ``.joblib``)."""
    return PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES


def _walk(directory: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of the regular files under ``directory`` (manifest excluded), and
    of the symlinks found there (which a bundle may not contain)."""
    files: list[str] = []
    links: list[str] = []
    for root, dirnames, filenames in os.walk(directory, followlinks=False):
        base = Path(root)
        for name in dirnames:
            if (base / name).is_symlink():
                links.append((base / name).relative_to(directory).as_posix())
        for name in filenames:
            path = base / name
            rel = path.relative_to(directory).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if path.is_symlink():
                links.append(rel)
            else:
                files.append(rel)
    return sorted(files), sorted(links)


def _iso(value: dt.datetime | str) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def write_manifest(
    directory: Path | str,
    *,
    version: str,
    created_at: dt.datetime | str,
    data_snapshot: Mapping[str, Any],
    features: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """Hash every file under ``directory`` and write ``manifest.json``; return the manifest.

    ``features`` is the ordered feature schema (``{"name": ..., "dtype": ...}`` per feature).
    Raises ``BundleError`` if the directory holds a pickle file or a symlink. The manifest is
    written to a temporary file and renamed, so a reader never sees half a manifest.
    """
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    files, links = _walk(root)
    pickles = [f for f in files if is_pickle(f)]
    if pickles:
        raise BundleError(f"pickle files are not allowed in a bundle: {', '.join(pickles)}")
    if links:
        raise BundleError(f"symlinks are not allowed in a bundle: {', '.join(links)}")
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": version,
        "created_at": _iso(created_at),
        "data_snapshot": dict(data_snapshot),
        "features": [dict(f) for f in features],
        "params": dict(params),
        "metrics": dict(metrics),
        "files": {rel: file_sha256(root / rel) for rel in files},
    }
    target = root / MANIFEST_NAME
    temporary = root / f".{MANIFEST_NAME}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, target)
    return manifest


def read_manifest(directory: Path | str) -> dict[str, Any]:
    """Parse ``manifest.json``; raises ``ValueError`` (or ``OSError``) when it is unusable."""
    text = (Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8")
    manifest = json.loads(text)
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise ValueError('manifest.json has no "files" mapping of path to sha256')
    return manifest


def manifest_sha256(directory: Path | str) -> str:
    """The sha256 of ``manifest.json`` itself (recorded on the registry row), or "" if absent."""
    path = Path(directory) / MANIFEST_NAME
    return file_sha256(path) if path.is_file() else ""


def _unsafe(rel: str) -> bool:
    path = PurePosixPath(rel)
    return path.is_absolute() or ".." in path.parts or rel in ("", ".")


def verify_bundle(directory: Path | str) -> list[str]:
    """Check a bundle against its manifest; return the problems found (empty when valid).

    Problems: a missing directory or unreadable manifest, a listed file that is missing, a
    file whose sha256 differs, a file on disk the manifest does not list, a path that escapes
    the directory, a symlink, and any pickle file (listed or not).
    """
    root = Path(directory)
    if not root.is_dir():
        return [f"bundle directory {root} does not exist"]
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        return [f"{MANIFEST_NAME} is missing"]
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST_NAME} is unreadable: {exc}"]

    problems: list[str] = []
    listed: dict[str, str] = manifest["files"]
    on_disk, links = _walk(root)
    problems.extend(f"symlink not allowed: {rel}" for rel in links)
    for rel in sorted(set(listed) | set(on_disk)):
        if is_pickle(rel):
            problems.append(f"pickle file not allowed: {rel}")
    for rel, expected in sorted(listed.items()):
        if _unsafe(rel):
            problems.append(f"unsafe path in manifest: {rel}")
            continue
        path = root / rel
        if rel in links:
            continue
        if not path.is_file():
            problems.append(f"missing file: {rel}")
        elif file_sha256(path) != expected.lower():
            problems.append(f"checksum mismatch: {rel}")
    problems.extend(f"extra file not in manifest: {rel}" for rel in on_disk if rel not in listed)
    return problems
