"""`grove server start|stop`: a local Prefect server in the background that grove commands use
when no PREFECT_API_URL is configured (and leave alone when one is)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from conftest import ROOT


def grove(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_server_start_is_used_by_later_commands_and_stop_ends_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(GROVE_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT))
    started = grove(["server", "start"], env)
    assert started.returncode == 0 and "started: UI http://127.0.0.1:" in started.stdout, started.stdout + started.stderr
    import json

    record = json.loads((tmp_path / "home" / "server" / "server.json").read_text())
    try:
        with urllib.request.urlopen(f"{record['url']}/health", timeout=10) as response:
            assert response.status == 200
        again = grove(["server", "start"], env)
        assert "already running" in again.stdout and str(record["pid"]) in again.stdout
        probe = ("import sys; sys.argv = ['grove', 'validate', '--help']\n"
                 "from flows.server import use_local_server; use_local_server(False)\n"
                 "from prefect.settings import get_current_settings; print(get_current_settings().api.url)")
        used = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
        assert used.stdout.strip() == record["url"], used.stderr
        configured = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                                    env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
        assert configured.stdout.strip() == "http://127.0.0.1:9/api"  # a configured API wins
    finally:
        stopped = grove(["server", "stop"], env)
    assert "stopped the local Prefect server" in stopped.stdout
    assert "not running" in grove(["server", "status"], env).stdout
    try:
        os.kill(record["pid"], 0)
        alive = True
    except OSError:
        alive = False
    assert not alive
