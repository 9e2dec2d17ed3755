"""Where the keys for an s3:// artifact root come from, and keeping them out of every message.

Keys are never read from the run config. They come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION: what botocore reads
itself) or from a prefect-aws `AwsCredentials` block named in the config
(`grove.aws_credentials_block`), which keeps the secret encrypted in Prefect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from grove.errors import UserError

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class S3Access:
    """What s3fs needs for one artifact root; `secrets` only to scrub them from messages."""

    options: dict[str, Any] = field(default_factory=dict)
    endpoint: str = "AWS S3"
    block: str | None = None
    secrets: tuple[str, ...] = ()

    def scrub(self, text: str) -> str:
        for secret in (*self.secrets, *(os.environ.get(v, "") for v in SECRET_VARIABLES)):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


# Fail fast on an unreachable endpoint rather than botocore's default of a minute per attempt.
_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}


def s3_access(credentials_block: str | None = None) -> S3Access:
    if credentials_block:
        return _from_block(credentials_block)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"config_kwargs": dict(_CLIENT_CONFIG)}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return S3Access(options=options, endpoint=endpoint or "AWS S3")


def _from_block(name: str) -> S3Access:
    try:
        from prefect_aws import AwsCredentials

        block = AwsCredentials.load(name, _sync=True)
    except ValueError as exc:  # a UserError: the CLI says it in one line, a stage never retries it
        raise UserError(f"grove.aws_credentials_block: no prefect-aws AwsCredentials block named {name!r} in "
                        f"the Prefect API (create one in the UI or with AwsCredentials(...).save({name!r}))") from exc
    secret = block.aws_secret_access_key.get_secret_value() if block.aws_secret_access_key else None
    token = block.aws_session_token
    client_kwargs: dict[str, Any] = {}
    endpoint = block.aws_client_parameters.endpoint_url if block.aws_client_parameters else None
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if block.region_name:
        client_kwargs["region_name"] = block.region_name
    options: dict[str, Any] = {"config_kwargs": dict(_CLIENT_CONFIG), "client_kwargs": client_kwargs}
    if block.aws_access_key_id:
        options["key"] = block.aws_access_key_id
    if secret:
        options["secret"] = secret
    if token:
        options["token"] = token
    if block.profile_name:
        options["profile"] = block.profile_name
    return S3Access(options=options, endpoint=endpoint or "AWS S3", block=name,
                    secrets=tuple(s for s in (secret, token, block.aws_access_key_id) if s))
