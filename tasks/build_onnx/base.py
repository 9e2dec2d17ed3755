"""The int4 base with LoRA slots for grove.ship: adapter, stored once per (base model, build options).

The base is the store entry `build_onnx/base-<key>`, keyed by the base model's digest, the build
settings and the code of this module's import closure only: every fine-tune of one base finds it
there, so a nightly retraining builds and stores only its adapter (tasks/build_onnx/ship.py). That
closure is what builds the base (adapters.py's slots, builder.py, quantization.py, the model
loader) and never the build_onnx stage around it, so an edit to scoring, the search or the
adapter export reruns build_onnx without rebuilding the base. The store and whether the run forces
a rebuild come in as arguments (not through grove.stage) for the same reason.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from grove.cache import code_digest, machine_key, stage_key
from grove.machine_facts import stage_facts
from grove.models import model_folder
from grove.settings import BuildSettings, ModelSettings
from grove.store import ArtifactStore
from tasks.build_onnx import adapters

BASE_PREFIX = "base-"  # build_onnx entries holding a base (key base-<key>)

# the base's code key: this module and every project module it imports (the base builder in adapters.py)
CODE_VERSION = code_digest(__name__)


def base_facts() -> dict:
    """The build_onnx stage's machine facts here (the builder's libraries; no device)."""
    return stage_facts("build_onnx", "cpu", {})


def base_key(build: BuildSettings, model: ModelSettings) -> str:
    # the adapter a run starts from (model.adapter_path) shapes the adapter, never the base;
    # the builder's library versions on this machine do
    settings = stage_key("build_onnx", CODE_VERSION, {"base_model": model.content_sha256,
                                                      "trust_remote_code": model.trust_remote_code, "build": build})
    return machine_key(settings, base_facts())


def onnx_base(build: BuildSettings, model: ModelSettings, store: ArtifactStore,
              forced: bool = False) -> tuple[Path, dict]:
    """The base with LoRA slots: the stored one for this key, or built and stored now. `forced`
    (--from-stage build_onnx or earlier) rebuilds it too and replaces its entry."""
    key = f"{BASE_PREFIX}{base_key(build, model)}"
    entry = None if forced else store.lookup("build_onnx", key)
    reused = entry is not None
    if entry is None:
        staging = Path(tempfile.mkdtemp(prefix="grove-base-"))
        try:
            printed = adapters.build_base(model_folder(model), staging / "model", build, model.trust_remote_code)
            (staging / "builder.log").write_text(printed)
            meta = {"summary": {"base_model": model.name, "base_model_sha256": model.content_sha256},
                    "code_version": CODE_VERSION, "machine": base_facts(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            entry = store.put_dir("build_onnx", key, staging, meta, replace=forced)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    folder = store.materialize(entry) / "model"
    return folder, {"stage": "build_onnx", "key": key, "digest": entry.digest, "reused": reused,
                    "base_model_sha256": model.content_sha256}
