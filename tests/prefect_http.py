"""The tests' HTTP client for the Prefect API.

Prefect's server answers 503 when a request meets a retryable database error (SQLite busy while
workers, flow runs and the test write at once) and expects the client to retry, as Grove's own calls
through Prefect's client do. A plain httpx call turns that into a flaky failure, so the tests use
Prefect's own client with the same retry rules; status codes are left to the test to check.
"""
from __future__ import annotations

from prefect.client.base import PrefectHttpxSyncClient

prefect_http = PrefectHttpxSyncClient(timeout=30, raise_on_all_errors=False)
