"""grove.ship: adapter inside build_onnx: one stored base per (base model, build options), one adapter per run.

The base is the store entry `build_onnx/base-<key>`, keyed by the base model's digest, the build
settings and this code only: every fine-tune of one base finds it there, so a nightly retraining
builds and stores only its adapter. The build_onnx artifact then holds `adapter.onnx_adapter` and
`base.json` (which base entry it runs on); grove/served.py opens the pair for every consumer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from grove.models import model_folder
from grove.settings import BuildSettings, ModelSettings
from grove.served import ADAPTER_FILE, BASE_FILE, BASE_PREFIX, META_SUFFIX
from grove.cache import code_digest, stage_key
from grove.stage import current_run
from tasks.build_onnx import adapters

# the base's code key: this module and every project module it imports (the base builder in adapters.py)
CODE_VERSION = code_digest(__name__)


def base_key(build: BuildSettings, model: ModelSettings) -> str:
    # the adapter a run starts from (model.adapter_path) shapes the adapter, never the base
    return stage_key("build_onnx", CODE_VERSION, {"base_model": model.content_sha256,
                                                  "trust_remote_code": model.trust_remote_code, "build": build})


def onnx_base(build: BuildSettings, model: ModelSettings) -> tuple[Path, dict]:
    """The base with LoRA slots: the stored one for this key, or built and stored now."""
    run = current_run()
    store = run.store
    key = f"{BASE_PREFIX}{base_key(build, model)}"
    # --from-stage build_onnx (or earlier) rebuilds the base too and replaces its entry
    forced = run.forced("build_onnx")
    entry = None if forced else store.lookup("build_onnx", key)
    reused = entry is not None
    if entry is None:
        staging = Path(tempfile.mkdtemp(prefix="grove-base-"))
        try:
            printed = adapters.build_base(model_folder(model), staging / "model", build, model.trust_remote_code)
            (staging / "builder.log").write_text(printed)
            meta = {"summary": {"base_model": model.name, "base_model_sha256": model.content_sha256},
                    "code_version": CODE_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            entry = store.put_dir("build_onnx", key, staging, meta, replace=forced)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    folder = store.materialize(entry) / "model"
    return folder, {"stage": "build_onnx", "key": key, "digest": entry.digest, "reused": reused,
                    "base_model_sha256": model.content_sha256}


def ship_adapter(peft_dir: Path, base_dir: Path, base: dict, out: Path) -> dict:
    """Writes the run's adapter file, its metadata (which base it belongs to) and base.json into `out`."""
    info = adapters.export_adapter(peft_dir, base_dir, out / ADAPTER_FILE)
    meta = {"base_digest": base["digest"], "base_model_sha256": base["base_model_sha256"], **info}
    (out / f"{ADAPTER_FILE}{META_SUFFIX}").write_text(json.dumps(meta, indent=1))
    (out / BASE_FILE).write_text(json.dumps({k: v for k, v in base.items() if k != "reused"}, indent=1))
    return meta
