"""What the store is made of: entries (a manifest and its files), digests, store errors."""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, denied, full, corrupted entry)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient  # a retry later may succeed (connection dropped, 5xx)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(files: Any, meta: Any) -> str:
    return sha256_bytes(json.dumps({"files": files, "meta": meta}, sort_keys=True).encode())


@dataclass(frozen=True)
class Entry:
    """A complete, verified entry: its manifest and where its files are."""

    stage: str
    key: str
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    @property
    def step(self) -> int | None:
        """A checkpoint's training step (None for an entry)."""
        return self.manifest["meta"].get("step")

    @property
    def content(self) -> str:
        """The files alone (names and sha256), not when or how fast they were made: a stage
        that reruns and writes the same bytes leaves every downstream cache key unchanged."""
        return sha256_bytes(json.dumps(self.files, sort_keys=True).encode())


NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")


def _transient(exc: BaseException) -> bool:
    """Errors worth another try: dropped connections, timeouts, 5xx; never a missing file,
    a denied request or a full disk."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return False
    if type(exc).__name__ in NO_CREDENTIALS:  # botocore finds none: asking again finds none either
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or "botocore" in type(exc).__module__


def folder_bytes(folder: str | Path) -> int:
    """Size on disk of every file under a local folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
