"""Progress for a stdout that is not a terminal (a log file, a CI job, a Prefect worker).

Rich's live bars draw nothing there until the run ends, so `grove run` prints plain lines
instead: one when a stage starts, one when it ends (cached or ran, seconds, key result),
training every `every` steps (and its last step), and other stages' progress at each
quarter. Each line is flushed at once, so a tail -f or a worker's log shows it live.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

DEFAULT_EVERY = 10  # training steps between two progress lines


class ProgressLines:
    def __init__(self, out: TextIO | None = None, every: int = DEFAULT_EVERY):
        self.out, self.every = out or sys.stdout, max(1, every)
        self.started: dict[str, float] = {}
        self.quarter: dict[str, int] = {}

    def _line(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} grove {text}", file=self.out, flush=True)

    def start(self, stage: str) -> None:
        self.started[stage] = time.monotonic()
        self._line(f"{stage}: started")

    def step(self, stage: str, done: int, total: int, info: dict[str, Any]) -> None:
        detail = "".join(f", {k} {v:.4f}" if isinstance(v, float) else f", {k} {v}"
                         for k, v in info.items() if v is not None)
        if stage == "train":
            if done % self.every == 0 or done == total:
                self._line(f"train: step {done}/{total}{detail}")
            return
        quarter = 4 * done // total if total else 0
        key = f"{stage}:{info.get('model', '')}"
        if quarter > self.quarter.get(key, 0):
            self.quarter[key] = quarter
            self._line(f"{stage}: {done}/{total}{detail}")

    def end(self, record) -> None:
        from flows.report import key_result  # not at import: `grove --help` stays fast

        seconds = time.monotonic() - self.started.get(record.stage, time.monotonic())
        result = key_result(record.stage, record.ref.summary if record.ref else {})
        self._line(f"{record.stage}: {record.status} in {seconds:.1f}s: {result}")

    def hooks(self) -> dict[str, Any]:
        return {"on_stage_start": self.start, "on_progress": self.step, "on_stage_end": self.end}
