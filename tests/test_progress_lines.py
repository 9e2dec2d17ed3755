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
    # each line's loss is the loss logged at that step (the Trainer logs it after the step's end)
    logged = {row["step"]: row["loss"] for row in json.loads((_entry(tmp_path / "store", "train") /
                                                               "train_log.json").read_text()) if "loss" in row}
    for step in (2, 4):
        line = next(p for p in progress if p.startswith(f"train: step {step}/4"))
        assert line == f"train: step {step}/4, loss {logged[step]:.4f}", (line, logged)
    _the_summary_says_what_ships_how_it_scored_and_where_the_run_is(lines, tmp_path)
    # live: the first stage's line was out long before the run ended (stdout is not buffered to the end)
    first = next(t for t, line in arrived if line.endswith("load_data: started"))
    assert ended - first > 5, "progress lines arrived only at the end"
    assert "\x1b[" not in "\n".join(lines)  # plain text, no terminal control codes
    # no library chatter a user can do nothing about (bitsandbytes' optional CPU kernels)
    assert "bitsandbytes" not in (tmp_path / "stderr.txt").read_text() + "\n".join(lines)


def _entry(root, stage: str):
    from grove.store import ArtifactStore

    store = ArtifactStore(str(root))
    entries = store.entries(stage)
    assert len(entries) == 1, entries
    return store.materialize(entries[0])


def _the_summary_says_what_ships_how_it_scored_and_where_the_run_is(lines: list[str], tmp_path) -> None:
    """The end of the run: the shipped build, each model's eval loss and perplexity (as report.md's
    quality table), and the flow run's page, which serves, named and tagged for the model."""
    import urllib.request

    from prefect.client.orchestration import get_client

    from flows.compare import number

    scores = json.loads((_entry(tmp_path / "store", "evaluate") / "metrics.json").read_text())
    said = "\n".join(lines)
    assert "\nshipped:     int4 cpu\n" in said, said
    for model, label in (("base", "base"), ("fine_tuned", "fine-tuned")):
        loss, perplexity = number(scores[model]["eval_loss"]), number(scores[model]["perplexity"])
        assert re.search(rf"^eval: +{label} +accuracy [\d.]+, eval_loss {loss}, perplexity {perplexity}$", said,
                         re.M), said
        assert re.search(rf"^\| {label} \| [\d.]+ \| {loss} \| {perplexity} \|",
                         (tmp_path / "out" / "tiny" / "report.md").read_text(), re.M)
    markdown = (tmp_path / "out" / "tiny" / "report.md").read_text()
    assert markdown.count("eval_loss |") == 1, "one quality table, not two overlapping ones"
    quality = markdown.split("## Quality on the eval split")[1].split("\n## ")[0]
    assert "token_agreement" in quality and "teacher_forced_seconds" not in quality, quality
    assert re.search(r"^\| shipped \(int4[^)]*\) \| .*\| -?[\d.]+(e-?\d+)? \|", quality, re.M), quality
    report = next(line.split()[1] for line in lines if line.startswith("report:"))
    assert report == str(tmp_path / "out" / "tiny" / "report.md"), report  # the one to read; .json beside it
    url = next(line.split()[1] for line in lines if line.startswith("prefect:"))
    opened = urllib.request.Request(url, headers={"Accept": "text/html"})  # as a browser asks for it
    with urllib.request.urlopen(opened, timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read()
    run_id = url.rsplit("/", 1)[1]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    assert flow_run.name == f"tiny-{run_id[:8]}" and {"grove", "model:tiny"} <= set(flow_run.tags), flow_run
