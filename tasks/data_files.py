"""Content digests of data files, local or behind any fsspec URL.

The digest of the data is part of every cache key: editing one byte of the dataset
must rerun everything from load_data. Olive keyed on the path only and reused stale
adapters; Grove hashes the bytes.
"""

from __future__ import annotations

import hashlib

import fsspec

_CHUNK = 8 * 1024 * 1024


def content_digest(url: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
