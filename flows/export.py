"""`grove export`: a run's, a promoted model's or one stage entry's files out of the store into a
plain folder a user can take anywhere, with a README saying what is where.

    model/     the ONNX model as shipped (onnxruntime-genai; `grove predict --model FOLDER`)
    adapter/   the LoRA adapter in peft format (PeftModel.from_pretrained(base, "adapter"))
    merged/    the merged Hugging Face model (AutoModelForCausalLM.from_pretrained("merged"))
    metrics/   the stages' metrics and logs (metrics.json, train_log.json, onnx_eval.json, ...)

Files are copied by the digest the run recorded, so a later run that reused the keys does not
change what is exported.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grove.errors import UserError
from grove.served import ADAPTER_FILE, BASE_FILE, META_SUFFIX, publish_served
from grove.shipped import PROMPT_FILE
from grove.stage import STAGES
from grove.store import ArtifactStore, Entry

# An adapter-shipped build's files that publish_served lays out in model/ and adapters/
SERVED = {BASE_FILE, ADAPTER_FILE, f"{ADAPTER_FILE}{META_SUFFIX}", PROMPT_FILE}
# Stages whose files a user takes away; load_data/template_corpus hold the data, already theirs.
EXPORTED = ("train", "evaluate", "merge_adapters", "build_onnx", "benchmark")
WHAT = {"model": "the ONNX model as shipped (onnxruntime-genai): `grove predict --model {folder}`; its README.md "
                 "has the Python snippet that answers as the evaluation scored",
        "adapter": "the LoRA adapter in peft format: `PeftModel.from_pretrained(base_model, \"{folder}/adapter\")`",
        "merged": "the merged Hugging Face model: `AutoModelForCausalLM.from_pretrained(\"{folder}/merged\")`",
        "metrics": "each stage's metrics and logs (see the list below)",
        "adapters": "the fine-tune as an onnxruntime adapter on the base in model/ (grove.ship: adapter): "
                    "`grove predict --model {folder} --adapter NAME`"}


@dataclass
class Export:
    source: str  # what was exported, in words
    entries: list[Entry]
    placed: dict[str, list[str]] = field(default_factory=dict)  # folder -> files written there
    adapter: str | None = None  # grove.ship: adapter: the name under adapters/ (predict --adapter)


def resolve(store: ArtifactStore, what: str) -> tuple[str, list[Entry], str | None]:
    """A promoted model's name, a run id (a unique prefix) or STAGE/KEY (a key prefix) -> its
    entries and the model's name (None for one entry)."""
    from flows.runs import find_run
    from tasks.promote import current_model

    if "/" in what:
        stage, key = what.split("/", 1)
        if stage not in STAGES:
            raise UserError(f"{what}: unknown stage {stage!r}; stages are: {', '.join(STAGES)}")
        matches = [e for e in store.entries(stage) if e.key.startswith(key)]
        if len(matches) != 1:
            raise UserError(f"{what}: {'no' if not matches else len(matches)} {stage} entries with key {key!r} "
                            f"in {store.root}")
        return f"stage entry {stage}/{matches[0].key}", matches, None
    current = current_model(store, what)
    if current is not None:
        return (f"model {what} (current, promoted {current['promoted_at'][:19]} from run {current['run_id'][:8]})",
                _by_digest(store, current["entries"], f"model {what}"), what)
    try:
        run = find_run(store, what)
    except LookupError:
        from flows.runs import list_runs
        from tasks.promote import current_models, model_history

        # a past model `grove models` lists, whose run record gc dropped: its promotion record
        # names its entries by digest (gone too once gc removed them: _by_digest says so)
        past = [m for current in current_models(store) for m in model_history(store, current["name"])
                if m["run_id"].startswith(what)]
        if len({m["run_id"] for m in past}) == 1:
            return (f"model {past[0]['name']} (promoted {past[0]['promoted_at'][:19]} from run {past[0]['run_id'][:8]})",
                    _by_digest(store, past[0]["entries"], f"model {past[0]['name']} of run {what}"), past[0]["name"])
        names = ", ".join(m["name"] for m in current_models(store)) or "none"
        runs = ", ".join(r["run_id"][:8] for r in list_runs(store)[:5]) or "none"
        raise UserError(f"{what}: no promoted model, run id or STAGE/KEY by that name in {store.root} "
                        f"(models: {names}; recent runs: {runs})") from None
    return (f"run {run['run_id']} ({run['name']}, {run['status']})", _by_digest(store, run["stages"], f"run {what}"),
            run["name"])


def _by_digest(store: ArtifactStore, recorded: list[dict[str, Any]], what: str) -> list[Entry]:
    entries = []
    for item in recorded:
        if item.get("stage") not in EXPORTED or not item.get("digest"):
            continue
        entry = store.by_digest(item["digest"], item.get("stage"), item.get("key"))
        if entry is None:
            raise UserError(f"{what}: its {item['stage']} entry {item['key'][:12]} is no longer in {store.root} "
                            f"(removed by grove gc?)")
        entries.append(entry)
    if not entries:
        raise UserError(f"{what}: no stage produced files to export")
    return entries


def _destination(entry: Entry, rel: str) -> str:
    """Where a stage's file goes in the export."""
    if entry.stage == "merge_adapters":
        return f"merged/{rel}"
    if entry.stage not in EXPORTED:  # load_data's or template_corpus's rows (STAGE/KEY): data, not metrics
        return f"{entry.stage}/{rel}"
    top, _, rest = rel.partition("/")
    if not rest:
        return f"metrics/{rel}"
    if (entry.stage, top) in (("build_onnx", "model"), ("train", "adapter")):
        return rel
    return f"{entry.stage}/{rel}"  # anything else keeps its stage's folder


def export(store: ArtifactStore, what: str, target: Path) -> Export:
    source, entries, name = resolve(store, what)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        what_is_there = "is a file" if not target.is_dir() else "exists and is not empty"
        raise UserError(f"{target}: {what_is_there}; export into a new folder")
    result = Export(source, entries)
    # written beside the target and renamed at the end: an export that fails half way (a blob gc
    # removed, a full disk) leaves no half folder that a second try would call "not empty"
    staging = target.parent / f".{target.name}.grove-export"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for entry in entries:
            local = store.materialize(entry)
            if entry.stage == "build_onnx" and BASE_FILE in entry.files:
                # grove.ship: adapter: laid out as a run's output folder (model/ the base, adapters/),
                # which `grove predict --model FOLDER --adapter NAME` answers with
                result.adapter = name or "adapter"
                publish_served(store, local, staging, result.adapter)
                result.placed["model"] = sorted(f"model/{p.relative_to(staging / 'model')}"
                                                for p in (staging / "model").rglob("*") if p.is_file())
                result.placed["adapters"] = sorted(f"adapters/{p.name}" for p in (staging / "adapters").iterdir())
            for rel in sorted(entry.files):
                if (entry.key.startswith("base-") and rel.startswith("model/")) or \
                        (result.adapter and entry.stage == "build_onnx" and rel in SERVED):
                    continue  # the base and the adapter files are in model/ and adapters/ already
                destination = _destination(entry, rel)
                (staging / destination).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local / rel, staging / destination)  # a copy: the export owes nothing to the store
                result.placed.setdefault(destination.split("/", 1)[0], []).append(destination)
        (staging / "README.md").write_text(readme(result, store, target))
        (staging / "export.json").write_text(json.dumps({
            "source": source, "store": store.root,
            "entries": [{"stage": e.stage, "key": e.key, "digest": e.digest} for e in entries],
            "files": result.placed}, indent=1))
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except OSError as exc:  # the disk (not the store: StoreError) said no
        raise UserError(f"{target}: export failed, nothing written: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def readme(result: Export, store: ArtifactStore, target: Path) -> str:
    lines = [f"# Exported by grove: {result.source}", "", f"From the artifact store {store.root}.", "",
             "| folder | what |", "|---|---|"]
    for folder in ("model", "adapters", "adapter", "merged", "metrics"):
        if folder in result.placed:
            lines.append(f"| `{folder}/` | {WHAT[folder].format(folder=target)} |")
    for folder in sorted(set(result.placed) - set(WHAT)):
        lines.append(f"| `{folder}/` | the {folder} stage's {'other ' if folder in EXPORTED else ''}files |")
    if "metrics" in result.placed:
        lines += ["", "Metrics and logs: " + ", ".join(f"`{p}`" for p in result.placed["metrics"]) + "."]
    lines += ["", "Stage entries (stage, key, manifest digest), also in export.json:", ""]
    lines += [f"- {e.stage} {e.key} {e.digest[:16]}" for e in result.entries]
    return "\n".join(lines) + "\n"
