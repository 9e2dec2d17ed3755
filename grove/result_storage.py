"""Where Prefect keeps the stages' small task results: a saved storage block under the artifact root."""

from __future__ import annotations

import hashlib
from typing import Any

from grove.store import ArtifactStore


def prefect_result_storage(store: ArtifactStore) -> Any:
    """A saved Prefect storage block under the artifact root, for the small task results.

    The saved instance itself is handed to each task (a slug would make Prefect load the
    block from the API again for every task: ~0.3 s each on a cached rerun).

    Then a cache hit needs only the store: a fresh Prefect database still hits. Prefect
    accepts only saved blocks as task result storage, so one is saved per artifact root.
    For S3 with keys in a named AwsCredentials block it is a prefect-aws S3Bucket referring
    to that block (secrets stay encrypted in Prefect).
    """
    name = "grove-results-" + hashlib.sha256(f"{store.root}/prefect-results".encode()).hexdigest()[:16]
    if store.is_local:
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=f"{store.root}/prefect-results")
        block.save(name, overwrite=True, _sync=True)
        return block
    if not store.access.block:
        # Keys from the environment: a plain fsspec block (s3fs reads the AWS_* variables of
        # whichever process runs the flow); only the endpoint is saved, nothing secret. It
        # also spares a cached rerun the ~3 s that importing and saving prefect-aws blocks costs.
        from prefect.filesystems import RemoteFileSystem

        endpoint = store.access.options.get("client_kwargs", {}).get("endpoint_url")
        settings = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
        block = RemoteFileSystem(basepath=f"{store.root}/prefect-results", settings=settings)
        block.save(name, overwrite=True, _sync=True)
        return block
    from prefect_aws import AwsCredentials, S3Bucket

    bucket, _, prefix = store.root.split("://", 1)[1].partition("/")
    block = S3Bucket(bucket_name=bucket, bucket_folder="/".join(p for p in (prefix, "prefect-results") if p),
                     credentials=AwsCredentials.load(store.access.block, _sync=True))
    block.save(name, overwrite=True, _sync=True)
    return block
