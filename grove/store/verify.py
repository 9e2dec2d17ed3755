"""Checking a stored file's bytes without reading them on every lookup: a per-machine memo of
blobs whose bytes were hashed here and matched their name, keyed by what changes whenever
the bytes do.

- A local blob's fingerprint is (size, mtime_ns, ctime_ns, inode): writing a file moves its
  ctime, which no tool can set back, and replacing it changes the inode. A blob whose
  fingerprint is not in the memo is hashed again (once) before it is used.
- An S3 object's fingerprint is (size, ETag): the bytes at a key change only through a PUT,
  which gives a new ETag. An object this machine verified that now has another ETag is
  downloaded and hashed again; one it never saw is verified when it is downloaded
  (materialize hashes every file it fetches), since that download is the only way its
  bytes reach a stage.

The memo is one small file per blob under the store's materialized folder: processes share
it without locking (a lost write only costs one more hash), and gc drops the files of the
blobs it removes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VERIFIED = ".verified"


def local_fingerprint(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def s3_fingerprint(info: dict[str, Any]) -> list[Any]:
    return [info.get("size"), str(info.get("ETag") or info.get("etag") or "")]


class VerifiedBlobs:
    """sha256 -> the fingerprint the blob had when its bytes were last hashed and matched."""

    def __init__(self, folder: Path):
        self.folder = Path(folder) / VERIFIED

    def recorded(self, sha: str) -> list[Any] | None:
        try:
            return json.loads((self.folder / sha).read_text())
        except (OSError, ValueError):
            return None

    def remember(self, sha: str, fingerprint: list[Any]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{sha}.{os.getpid()}-{os.urandom(4).hex()}"
            tmp.write_text(json.dumps(fingerprint))
            os.replace(tmp, self.folder / sha)
        except OSError:
            pass  # a memo only: the blob is hashed again next time

    def forget(self, sha: str) -> None:
        try:
            (self.folder / sha).unlink()
        except OSError:
            pass

    def shas(self) -> list[str]:
        try:
            return [p.name for p in self.folder.iterdir() if not p.name.startswith(".")]
        except OSError:
            return []
