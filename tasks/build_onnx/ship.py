"""grove.ship: adapter inside build_onnx: one run's adapter, exported for the shared base.

The base itself (tasks/build_onnx/base.py) is stored once per base model and build options; the
build_onnx artifact then holds `adapter.onnx_adapter` and `base.json` (which base entry it runs
on); grove/served.py opens the pair for every consumer.
"""

from __future__ import annotations

import json
from pathlib import Path

from grove.served import ADAPTER_FILE, BASE_FILE, META_SUFFIX
from tasks.build_onnx import adapters


def ship_adapter(peft_dir: Path, base_dir: Path, base: dict, out: Path) -> dict:
    """Writes the run's adapter file, its metadata (which base it belongs to) and base.json into `out`."""
    info = adapters.export_adapter(peft_dir, base_dir, out / ADAPTER_FILE)
    meta = {"base_digest": base["digest"], "base_model_sha256": base["base_model_sha256"], **info}
    (out / f"{ADAPTER_FILE}{META_SUFFIX}").write_text(json.dumps(meta, indent=1))
    (out / BASE_FILE).write_text(json.dumps({k: v for k, v in base.items() if k != "reused"}, indent=1))
    return meta
