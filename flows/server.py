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


def start(port: int | None = None) -> tuple[dict, bool]:
    """(record, started): the running server, or a new one once it answers /health."""
    found = running()
    if found:
        return found, False
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
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            raise RuntimeError(f"the local Prefect server did not start; see {folder / 'server.log'}")
        time.sleep(0.3)
    record = {"pid": process.pid, "url": url, "ui": url[: -len("/api")], "started": time.time()}
    (folder / "server.json").write_text(json.dumps(record))
    return record, True


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


def use_local_server(start_if_missing: bool) -> str | None:
    """Points this process's Prefect client at the local server when no API is configured.
    Returns a line to print when a server was started, else None."""
    if os.environ.get("PREFECT_API_URL") or _profile_api_url():
        return None
    record, started = start() if start_if_missing else (running(), False)
    if record is None:
        return None
    os.environ["PREFECT_API_URL"] = record["url"]
    return (f"started a local Prefect server for grove runs: UI {record['ui']} (stop it: grove server stop)"
            if started else None)


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
