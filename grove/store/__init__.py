"""The artifact store: content-addressed files and per-entry manifests over fsspec.

Layout under the artifact root (a local folder or s3://bucket/prefix, any fsspec URL):

    blobs/<sha[:2]>/<sha>                each distinct file once, named by its sha256
    manifests/<digest>.json              every manifest ever written, immutable, by digest
    entries/<stage>/<key>/MANIFEST.json  the entry for one stage's cache key (a manifest copy)
    runs/<run id>.json                   what each run used and produced (grove runs / gc)
    checkpoints/<stage>/<key>/<step:08d>/MANIFEST.json
                                         a running stage's checkpoint (training state)

A manifest lists every file of the entry (relative path, size, sha256) and is written
LAST, after all blobs are in place: an entry without a manifest is incomplete and never
counts as a cache hit. The entry manifest is created exclusively (a conditional PUT on S3,
a hard link locally): of two runs racing on one key the first stands and both continue with
it; a forced write (--from-stage) or a damaged entry is replaced. Downstream stages open an
upstream artifact by its digest, through the immutable copy. Reads check sizes and, through
a per-machine memo of verified blobs (verify.py), bytes. The store knows nothing of stages
beyond the names it is given.

Checkpoints follow the same rules (blobs, manifest written last, verified when read). The
newest two of a (stage, key) are kept while the stage runs and all are dropped once its
entry is stored; dropping one deletes the blobs no other manifest lists, so optimizer
states do not pile up between `grove gc` runs.
"""

from grove.store.artifacts import ArtifactStore
from grove.store.entries import MANIFEST, Entry, StoreError, folder_bytes, manifest_digest, sha256_bytes, sha256_file

# Garbage collection (grove.store.gc) is imported from its own module, not from here: every
# stage imports this package, and a stage's cache key covers all it imports; cleaning the
# store cannot change what a stage makes, so an edit to it must not rerun every stage.
__all__ = ["MANIFEST", "ArtifactStore", "Entry", "StoreError", "folder_bytes", "manifest_digest", "sha256_bytes",
           "sha256_file"]
