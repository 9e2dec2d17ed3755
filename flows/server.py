"""A local Prefect server that `grove` starts once and reuses, for machines with no Prefect API set.

Without PREFECT_API_URL, every `grove run` would start Prefect's temporary server in its own
process (10-20 s here, more than a whole cached rerun should take) and lose its runs when it
exits. Instead `grove run` uses the server recorded in GROVE_HOME/server/server.json if that
process is still the one Grove started, and otherwise starts one in the background (its own
session, so it outlives the command), records it, and prints the UI address. `grove server stop`
ends it. Every run stays in Prefect's API, in the server's database under GROVE_HOME/server/.

Safe to share: "is one running, else start one" happens under a lock (GROVE_HOME/server/lock,
flock: released by the kernel when its holder exits), so concurrent `grove run`s start one
server between them. A record names its process by pid and creation time: a pid reused by
another process (after a reboot) is not the server, so it is never signalled; the stale record
is dropped and a new server started.

Why not Prefect's own `prefect server start --background` / `prefect server stop` (3.9.1):
`stop` sends SIGTERM to whatever pid its pid file holds, with no check that it is a server
(after a reboot, any process: tests/test_server.py shows it); `--background` writes the server's
output into a pipe nobody reads once the command exits (no log to look at when it fails), does
not wait for it to answer, and a stale pid file refuses every later start until `stop` signals
that stale pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from grove.machine import grove_home

STARTUP_TIMEOUT_S = 300  # ~30 s on a busy 2-core machine, ~100 s when other test runs share it


class ServerError(RuntimeError):
    """The local server could not be started."""


def server_dir() -> Path:
    return grove_home() / "server"


@contextmanager
def _locked():
    """Only one grove process at a time decides whether to start a server (or stops it)."""
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _created(pid: int) -> float | None:
    """The creation time of process `pid` (None if there is none): with the pid, it names one process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _is_recorded_process(record: dict) -> bool:
    """Whether the recorded pid is still the process Grove started (not a reuse of its number)."""
    created = _created(int(record["pid"]))
    return created is not None and "created" in record and abs(created - float(record["created"])) < 0.05


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _record_file() -> Path:
    return server_dir() / "server.json"


def _write_record(record: dict) -> None:
    partial = _record_file().with_suffix(".json.partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, _record_file())  # readers never see half a record


def running() -> dict | None:
    """The recorded server, if its process is the one Grove started; a stale record is removed."""
    try:
        record = json.loads(_record_file().read_text())
    except (OSError, ValueError):
        return None
    if not _is_recorded_process(record):
        _record_file().unlink(missing_ok=True)
        return None
    return record


def _launch(port: int | None = None) -> dict:
    """Starts a server process in the background (its own session, so it outlives the command),
    records it at once and returns its record without waiting: callers that need the API call
    `wait_until_healthy`. Recorded before it answers, so a command that fails meanwhile (a bad
    config) leaves a server the next command uses and `grove server stop` ends, not an orphan.
    Called under the lock only."""
    folder = server_dir()
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _children[process.pid] = process
    record = {"pid": process.pid, "created": _created(process.pid), "url": url, "ui": url[: -len("/api")],
              "started": time.time()}
    _write_record(record)
    return record


def _running_or_launched(port: int | None = None, start_if_missing: bool = True) -> tuple[dict | None, bool]:
    """(record, launched): the server Grove started, else a new one (if asked); one decision at a time."""
    with _locked():
        record = running()
        if record is None and start_if_missing:
            return _launch(port), True
        return record, False


# Servers this process launched: a dead child stays a zombie (its pid still exists) until
# polled, so their liveness is asked of the Popen object.
_children: dict[int, subprocess.Popen] = {}


def _exited(record: dict) -> bool:
    child = _children.get(int(record["pid"]))
    return child.poll() is not None if child is not None else not _is_recorded_process(record)


def _terminate(record: dict) -> None:
    """SIGTERM to the recorded server's process group (it leads its own session), and waits for it
    to end; nothing is signalled unless the pid is still the process Grove recorded."""
    pid = int(record["pid"])
    if _exited(record):
        return
    try:
        os.killpg(pid, signal.SIGTERM) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while not _exited(record) and time.monotonic() < deadline:
        time.sleep(0.2)


def _forget(record: dict) -> None:
    """Removes the record file if it still names this server (another process may have replaced it)."""
    try:
        current = json.loads(_record_file().read_text())
    except (OSError, ValueError):
        return
    if current.get("pid") == record["pid"] and current.get("created") == record.get("created"):
        _record_file().unlink(missing_ok=True)


def wait_until_healthy(record: dict) -> dict:
    """Returns once the recorded server answers /health (at once when it already does)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(record["url"]):
        if _exited(record):
            with _locked():
                _forget(record)
            raise ServerError(f"the local Prefect server did not start; see {server_dir() / 'server.log'}")
        if time.monotonic() > deadline:
            if int(record["pid"]) not in _children:  # another command's server: that command decides
                raise ServerError(f"the local Prefect server (pid {record['pid']}) does not answer; see "
                                  f"{server_dir() / 'server.log'}; `grove server stop` ends it")
            with _locked():
                _terminate(record)
                _forget(record)
            raise ServerError(f"the local Prefect server did not start; see {server_dir() / 'server.log'}")
        time.sleep(0.3)
    return record


def start(port: int | None = None) -> tuple[dict, bool]:
    """(record, started): the running server, or a new one, once it answers /health."""
    record, launched = _running_or_launched(port)
    return wait_until_healthy(record), launched


def stop() -> dict | None:
    """Ends the server Grove started (its whole process group); returns its record, None if none ran."""
    with _locked():
        record = running()
        if record is None:
            return None
        _terminate(record)
        _forget(record)
    return record


# The local server this process points Prefect at, until it has been seen answering.
_pending: list[dict] = []


def use_local_server(start_if_missing: bool) -> str | None:
    """Points this process's Prefect client at the local server when no API is configured.
    A missing one is launched without waiting: the caller does its own start-up work (reading
    the config, the bundled model's one-time conversion) while the server boots, then calls
    `ready()` before using the API. Returns a line to print when a server was launched."""
    if configured_api():
        return None
    record, launched = _running_or_launched(start_if_missing=start_if_missing)
    if record is None:
        return None
    os.environ["PREFECT_API_URL"] = record["url"]
    _pending.append(record)
    return f"starting a local Prefect server for grove runs: UI {record['ui']} (stop it: grove server stop)" \
        if launched else None


def launching() -> bool:
    """Whether the local server this process uses may still be booting (time to fill)."""
    return any(not _healthy(record["url"]) for record in _pending)


def ready() -> None:
    """Returns once the local server this process uses answers; raises ServerError if it died."""
    while _pending:
        wait_until_healthy(_pending[0])
        _pending.pop(0)


def configured_api() -> tuple[str, str] | None:
    """The Prefect API set outside grove, which every grove command uses instead of a local server,
    and where it is set."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    url = _profile_api_url()
    return (url, "the active Prefect profile") if url else None


def _profile_api_url() -> str | None:
    """An API URL set in the active Prefect profile counts as configured too. Read from the
    profiles file, not through prefect: importing prefect fixes its settings for the process,
    before PREFECT_API_URL could be set here."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    return (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")
