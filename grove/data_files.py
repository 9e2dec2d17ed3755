"""Data locations and their content digests, local or behind any fsspec URL.

A data location is a file, a glob (`data/*.jsonl`, `s3://bucket/tone/2026-*.jsonl`) or a
folder/prefix (`s3://bucket/tone/`: every data file under it). It is listed again at the
start of every run, so a nightly run reads whatever has arrived since the last one.

The digest of the listed files' bytes is part of every cache key: a night with no new data
reruns nothing, one new or edited file reruns everything from load_data. Olive keyed on
the path only and reused stale adapters; Grove hashes the bytes.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

import fsspec

_CHUNK = 8 * 1024 * 1024
DATA_SUFFIXES = ("json", "jsonl", "csv", "parquet")
GLOB_CHARS = "*?["


class DataLocationError(ValueError):
    """A data location that names no readable data file."""


def is_remote(location: str) -> bool:
    return "://" in location


def list_data_files(location: str, search_dirs: list[Path], options: dict[str, Any] | None = None) -> list[str]:
    """The data files a location names, sorted. Relative local paths are tried in each
    of search_dirs in turn; remote ones are listed through fsspec with `options`."""
    if is_remote(location):
        return _list_remote(location, options or {})
    for root in search_dirs:
        found = _list_local(str((root / location).expanduser()))
        if found:
            return found
    tried = " and ".join(str(d) for d in search_dirs)
    if any(c in location for c in GLOB_CHARS):
        raise DataLocationError(f"no files match {location} (looked in {tried})")
    if any((root / location).expanduser().is_dir() for root in search_dirs):
        raise DataLocationError(f"folder {location} holds no data files (.{', .'.join(DATA_SUFFIXES)})")
    raise DataLocationError(f"data file not found: {location} (looked in {tried})")


def _list_local(pattern: str) -> list[str]:
    path = Path(pattern)
    if any(c in pattern for c in GLOB_CHARS):
        return sorted(str(Path(p).resolve()) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if path.is_dir():
        return sorted(str(p.resolve()) for p in path.rglob("*") if p.is_file() and _is_data(p.name))
    return [str(path.resolve())] if path.is_file() else []


def remote_fs(url: str, options: dict[str, Any] | None = None):
    """A fresh filesystem with no listings cache: new data must be seen the moment it lands
    (a cached listing from the last run would hide it, or make a new file look missing)."""
    extra = {"use_listings_cache": False} if url.startswith(("s3://", "s3a://")) else {}
    return fsspec.url_to_fs(url, skip_instance_cache=True, **extra, **(options or {}))


def open_data(url: str, options: dict[str, Any] | None = None):
    if not is_remote(url):
        return open(url, "rb")
    fs, path = remote_fs(url, options)
    return fs.open(path, "rb")


def _list_remote(location: str, options: dict[str, Any]) -> list[str]:
    fs, path = remote_fs(location, options)
    protocol = location.split("://", 1)[0]
    if any(c in path for c in GLOB_CHARS):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
        if not found:
            raise DataLocationError(f"no files match {location}")
    elif location.endswith("/") or fs.isdir(path):
        found = [p for p in fs.find(path) if _is_data(p)]
        if not found:
            raise DataLocationError(f"{location} holds no data files (.{', .'.join(DATA_SUFFIXES)})")
    elif fs.isfile(path):
        found = [path]
    else:
        raise DataLocationError(f"data file not found: {location}")
    return sorted(f"{protocol}://{p}" for p in found)


def _is_data(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in DATA_SUFFIXES and not name.rsplit("/", 1)[-1].startswith(".")


def content_digest(url: str, options: dict[str, Any] | None = None, fs=None) -> str:
    """sha256 of a file's bytes; `fs`: an open filesystem to read a remote url through."""
    digest = hashlib.sha256()
    with (fs.open(url, "rb") if fs is not None else open_data(url, options)) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
