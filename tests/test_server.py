"""`grove server start|stop`: a local Prefect server in the background that grove commands use
when no PREFECT_API_URL is configured (and leave alone when one is)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from typer.testing import CliRunner

from conftest import ROOT


def grove(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


STARTER = """
import json, sys, time
from flows.server import start
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # every starter asks at the same moment
record, started = start()
print(json.dumps({"pid": record["pid"], "url": record["url"], "started": started}))
"""


def test_concurrent_starts_give_one_server_later_commands_use_it_and_stop_ends_it(tmp_path):
    """Three starts at the same instant (as three `grove run`s on a fresh machine): one launches
    the server, the others find it. Then `grove server start` finds it, a command with no API
    configured uses it (a configured one wins), and `grove server stop` ends it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(GROVE_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT))
    at = time.time() + 5
    starters = [subprocess.Popen([sys.executable, "-c", STARTER, str(at)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [starter.communicate(timeout=300) for starter in starters]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, err in outputs if out.strip()]
    try:
        assert len(answers) == 3, [err[-2000:] for _, err in outputs]
        record = json.loads((tmp_path / "home" / "server" / "server.json").read_text())
        assert {a["pid"] for a in answers} == {record["pid"]}, f"several servers started: {answers}"
        assert sorted(a["started"] for a in answers) == [False, False, True]
        with urllib.request.urlopen(f"{record['url']}/health", timeout=10) as response:
            assert response.status == 200
        again = grove(["server", "start"], env)
        assert "already running" in again.stdout and str(record["pid"]) in again.stdout
        # status names the API and the line that points Prefect's own CLI at it: with it, `prefect
        # flow-run ls` asks this server (without it, a fresh PREFECT_HOME's sqlite: a traceback)
        status = grove(["server", "status"], env).stdout
        assert f"API {record['url']}" in status, status
        export = next(line for line in status.splitlines() if line.startswith("export PREFECT_API_URL="))
        listed = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "ls"], cwd=ROOT, capture_output=True,
                                text=True, env={**env, "PREFECT_API_URL": export.split("=", 1)[1]}, timeout=120)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr[-2000:]
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
        for pid in {a["pid"] for a in answers}:  # a server stop left (several launched, or an unrecorded one)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    assert "stopped the local Prefect server" in stopped.stdout
    assert "not running: `grove server start` starts it" in grove(["server", "status"], env).stdout
    try:
        os.kill(record["pid"], 0)
        alive = True
    except OSError:
        alive = False
    assert not alive


def test_a_stale_record_naming_an_unrelated_live_process_is_not_signalled(tmp_path, monkeypatch):
    """After a reboot the recorded pid can belong to anything: here a `sleep` in its own process
    group, as the server was. `grove server stop` (and every start) must leave it alone."""
    from flows.cli import app
    from flows.server import running, stop

    monkeypatch.setenv("GROVE_HOME", str(tmp_path / "home"))
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        folder = tmp_path / "home" / "server"
        folder.mkdir(parents=True)
        before_reboot = time.time() - 86400
        (folder / "server.json").write_text(json.dumps(
            {"pid": unrelated.pid, "created": before_reboot, "url": "http://127.0.0.1:9/api",
             "ui": "http://127.0.0.1:9", "started": before_reboot}))
        assert stop() is None
        assert running() is None and not (folder / "server.json").exists(), "the stale record is dropped"
        (folder / "server.json").write_text(json.dumps({"pid": unrelated.pid, "url": "http://127.0.0.1:9/api",
                                                        "ui": "http://127.0.0.1:9", "started": before_reboot}))
        result = CliRunner().invoke(app, ["server", "stop"])
        assert "no local Prefect server is running" in result.output, result.output
        time.sleep(0.5)
        assert unrelated.poll() is None, f"an unrelated process was signalled: {unrelated.returncode}"
    finally:
        unrelated.kill()
        unrelated.wait()


def test_prefect_server_stop_signals_whatever_its_pid_file_names(tmp_path):
    """Why Grove does not use `prefect server start --background` / `prefect server stop`: Prefect's
    stop sends SIGTERM to the pid in PREFECT_HOME/server.pid without checking it is a server. If a
    Prefect release makes this test fail, its stop has become safe to use."""
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "server.pid").write_text(str(unrelated.pid))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], env={**env, "PREFECT_HOME": str(home)},
                   capture_output=True, timeout=120)
    try:
        assert unrelated.wait(timeout=10) == -signal.SIGTERM
    finally:
        unrelated.kill()
        unrelated.wait()


def test_status_says_a_configured_api_is_the_one_grove_uses(prefect_api):
    from flows.cli import app

    said = CliRunner().invoke(app, ["server", "status"])
    assert said.exit_code == 0 and said.output.startswith(
        f"grove commands use the Prefect API at {prefect_api} (PREFECT_API_URL), not a local server"), said.output
