"""A local Prefect server that `grove` starts once and reuses, for machines with no Prefect API set.

Without PREFECT_API_URL, every `grove run` would start Prefect's temporary server in its own
process (10-20 s here, more than a whole cached rerun should take) and lose its runs when it
exits. Instead `grove run` uses the server recorded in GROVE_HOME/server/server.json if its
process is alive, and otherwise starts one in the background (its own session, so it
outlives the command), records it, and prints the UI address. `grove server stop` ends it.
Every run stays in Prefect's API, in the server's database under GROVE_HOME/server/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from grove.machine import grove_home

STARTUP_TIMEOUT_S = 120  # a busy 2-core machine took ~30 s


class ServerError(RuntimeError):
    """The local server could not be started."""


def server_dir() -> Path:
    return grove_home() / "server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running() -> dict | None:
    """The recorded server, if its process is alive; a stale record is removed."""
    record_file = server_dir() / "server.json"
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(record["pid"])):
        record_file.unlink(missing_ok=True)
        return None
    return record


def launch(port: int | None = None) -> dict:
    """Starts a server process in the background (its own session, so it outlives the command),
    records it at once and returns its record without waiting: callers that need the API call
    `wait_until_healthy`. Recorded before it answers, so a command that fails meanwhile (a bad
    config) leaves a server the next command uses and `grove server stop` ends, not an orphan."""
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True)
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
    record = {"pid": process.pid, "url": url, "ui": url[: -len("/api")], "started": time.time()}
    (folder / "server.json").write_text(json.dumps(record))
    return record


# Servers this process launched: a dead child stays a zombie (os.kill(pid, 0) still succeeds)
# until polled, so their liveness is asked of the Popen object.
_children: dict[int, subprocess.Popen] = {}


def _exited(pid: int) -> bool:
    child = _children.get(pid)
    return child.poll() is not None if child is not None else not _alive(pid)


def wait_until_healthy(record: dict) -> dict:
    """Returns once the recorded server answers /health (at once when it already does)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(record["url"]):
        pid = int(record["pid"])
        if _exited(pid) or time.monotonic() > deadline:
            if not _exited(pid):
                os.killpg(pid, signal.SIGTERM)
            (server_dir() / "server.json").unlink(missing_ok=True)
            raise ServerError(f"the local Prefect server did not start; see {server_dir() / 'server.log'}")
        time.sleep(0.3)
    return record


def start(port: int | None = None) -> tuple[dict, bool]:
    """(record, started): the running server, or a new one once it answers /health."""
    found = running()
    if found:
        return wait_until_healthy(found), False
    return wait_until_healthy(launch(port)), True


def stop() -> dict | None:
    """Ends the recorded server (its whole process group); returns its record, None if none ran."""
    record = running()
    if record is None:
        return None
    try:
        os.killpg(int(record["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while _alive(int(record["pid"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    (server_dir() / "server.json").unlink(missing_ok=True)
    return record


# The local server this process points Prefect at, until it has been seen answering.
_pending: list[dict] = []


def use_local_server(start_if_missing: bool) -> str | None:
    """Points this process's Prefect client at the local server when no API is configured.
    A missing one is launched without waiting: the caller does its own start-up work (reading
    the config, the bundled model's one-time conversion) while the server boots, then calls
    `ready()` before using the API. Returns a line to print when a server was launched."""
    if os.environ.get("PREFECT_API_URL") or _profile_api_url():
        return None
    record, launched = running(), False
    if record is None and start_if_missing:
        record, launched = launch(), True
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
