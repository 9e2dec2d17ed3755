"""Stopping what the tests start in their own process group (start_new_session=True)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """`sig` to the process and every child it started; SIGKILL if they are not gone in `timeout` s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
