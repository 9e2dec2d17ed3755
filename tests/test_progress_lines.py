"""`grove run` with stdout piped (a log file, CI, a worker): plain lines as each stage starts
and ends and training every N steps, arriving while the run goes on, not at its end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from conftest import ROOT, tiny_config
from grove.stage import STAGES


def test_piped_output_has_a_line_per_stage_start_and_end_and_training_steps(tiny_model, tone_copy, tmp_path):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["passes"]["lora"]["config"]["training_args"]["max_steps"] = 4
    config = tmp_path / "run.json"
    config.write_text(json.dumps(raw))
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--log-every", "2"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.txt", "w"), text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    arrived = [(time.monotonic(), line.rstrip("\n")) for line in process.stdout]
    ended = time.monotonic()
    assert process.wait() == 0, "\n".join(line for _, line in arrived)
    lines = [line for _, line in arrived]
    progress = [re.sub(r"^\d\d:\d\d:\d\d grove ", "", line) for line in lines if re.match(r"^\d\d:\d\d:\d\d grove ", line)]
    events = [p for p in progress if p.endswith(": started") or re.match(r"^\w+: ran in ", p)]
    expected = [e for stage in STAGES for e in (f"{stage}: started", f"{stage}: ran")]
    assert [e.split(" in ")[0] for e in events] == expected, "\n".join(lines)
    assert [p.split(",")[0] for p in progress if p.startswith("train: step")] == ["train: step 2/4", "train: step 4/4"]
    assert re.search(r"^train: step 2/4, loss \d", next(p for p in progress if p.startswith("train: step 2/4")))
    # live: the first stage's line was out long before the run ended (stdout is not buffered to the end)
    first = next(t for t, line in arrived if line.endswith("load_data: started"))
    assert ended - first > 5, "progress lines arrived only at the end"
    assert "\x1b[" not in "\n".join(lines)  # plain text, no terminal control codes
    # no library chatter a user can do nothing about (bitsandbytes' optional CPU kernels)
    assert "bitsandbytes" not in (tmp_path / "stderr.txt").read_text() + "\n".join(lines)
