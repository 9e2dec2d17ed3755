"""What a shipped model is, as the runtime serves it: a whole model, or one base and named adapters.

An output folder (or promoted model) shipped with grove.ship: adapter looks like

    model/                          the int4 base with LoRA slots (genai_config.json, model.onnx, ...)
    model/base.json                 which stored base it is (its store digest)
    adapters/<name>.onnx_adapter    one per fine-tune, onnxruntime's adapter format
    adapters/<name>.onnx_adapter.json   the base digest it was exported for, ranks, modules

An adapter runs only on the base it was exported for: the digests must match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from grove.errors import UserError
from grove.shipped import PROMPT_FILE

ADAPTER_FILE = "adapter.onnx_adapter"  # inside a build_onnx artifact
ADAPTER_SUFFIX = ".onnx_adapter"
BASE_FILE = "base.json"
META_SUFFIX = ".json"


class AdapterMismatch(UserError):
    """An adapter exported for another base than the one it is asked to run on."""


def served_model(store, artifact: Path) -> tuple[Path, Path | None]:
    """(model folder, adapter file or None) of a materialized build_onnx artifact."""
    pointer = artifact / BASE_FILE
    if not pointer.is_file():
        return artifact / "model", None
    base = json.loads(pointer.read_text())
    entry = store.by_digest(base["digest"], base["stage"], base["key"])
    if entry is None:
        raise RuntimeError(f"the base {base['stage']}/{base['key']} this adapter runs on is missing from "
                           f"{store.root}; rerun with --from-stage build_onnx")
    return store.materialize(entry) / "model", artifact / ADAPTER_FILE


def publish_served(store, artifact: Path, out: Path, name: str) -> Path:
    """Copies the base (once: kept when the folder holds the same base) and this run's adapter as
    adapters/<name>.onnx_adapter into the output folder `out`; returns out/model."""
    model_dir, adapter = served_model(store, artifact)
    target = out / "model"
    base = json.loads((artifact / BASE_FILE).read_text())
    current = target / BASE_FILE
    same = current.is_file() and json.loads(current.read_text()).get("digest") == base["digest"]
    if not same:  # another base: adapters of the old one cannot run on it
        staging = out / ".model-staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(".complete"))
        (staging / BASE_FILE).write_text(json.dumps(base, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(out / "adapters", ignore_errors=True)
        staging.rename(target)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter, out / "adapters" / f"{name}{ADAPTER_SUFFIX}")
    shutil.copyfile(artifact / f"{ADAPTER_FILE}{META_SUFFIX}", out / "adapters" / f"{name}{ADAPTER_SUFFIX}{META_SUFFIX}")
    prompt = artifact / PROMPT_FILE  # the template this adapter was trained and scored with
    if prompt.is_file():
        shutil.copyfile(prompt, out / "adapters" / f"{name}.{PROMPT_FILE}")
    return target


def adapter_prompt(adapter: Path) -> dict | None:
    """The prompt spec shipped next to an adapter (adapters/<name>.grove_prompt.json), if any."""
    name = adapter.name.removesuffix(ADAPTER_SUFFIX)
    spec = adapter.with_name(f"{name}.{PROMPT_FILE}")
    return json.loads(spec.read_text()) if spec.is_file() else None


def adapter_file(folder: Path, name: str) -> Path:
    """The named adapter of an output folder, checked against the folder's base."""
    folder = Path(folder)
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    adapters_dir = (model_dir.parent if model_dir != folder else folder) / "adapters"
    file = adapters_dir / f"{name}{ADAPTER_SUFFIX}"
    if not file.is_file():
        have = sorted(p.name.removesuffix(ADAPTER_SUFFIX) for p in adapters_dir.glob(f"*{ADAPTER_SUFFIX}"))
        raise AdapterMismatch(f"{folder}: no adapter {name!r} (have: {', '.join(have) or 'none'})")
    check_same_base(file, model_dir)
    return file


def check_same_base(adapter: Path, model_dir: Path) -> None:
    meta_file = adapter.with_name(adapter.name + META_SUFFIX)
    base_file = model_dir / BASE_FILE
    if not meta_file.is_file() or not base_file.is_file():
        raise AdapterMismatch(f"{adapter}: cannot tell which base it belongs to ({meta_file.name} or "
                              f"{base_file} missing); fix: ship it again with grove.ship: adapter")
    wanted, have = json.loads(meta_file.read_text())["base_digest"], json.loads(base_file.read_text())["digest"]
    if wanted != have:
        raise AdapterMismatch(f"{adapter.name} was exported for base {wanted[:12]}, but {model_dir} holds base "
                              f"{have[:12]} (another base model or other ModelBuilder options); fix: rerun its "
                              f"fine-tune with this base's model and build options, or ship it merged")
