"""Stage 1, load_data: read the dataset, drop exact duplicates, split train/eval by unique text.

The split happens here, on unique rows and BEFORE any packing: Olive cut its eval split
after packing, so duplicated rows leaked eval text into training.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from grove.data_check import check_data
from grove.data_files import content_digest, is_remote, open_data
from grove.credentials import s3_access
from grove.settings import DataSettings
from grove.stage import current_run, grove_stage, output_dir


def fetch(files: list[str], folder: Path) -> list[str]:
    """Local copies of remote data files (datasets refuses URLs when offline); local ones as they are."""
    local = []
    # the artifact root's keys (env or named block), looked up once: a block is an API call
    s3_options = s3_access(current_run().credentials_block).options if any(
        url.startswith("s3://") for url in files) else {}
    for index, url in enumerate(files):
        if not is_remote(url):
            local.append(url)
            continue
        options = s3_options if url.startswith("s3://") else {}
        target = folder / f"{index:05d}-{url.rsplit('/', 1)[-1]}"
        with open_data(url, options) as source, open(target, "wb") as handle:
            shutil.copyfileobj(source, handle, 8 * 1024 * 1024)
        local.append(str(target))
    return local


def check_unchanged(data: DataSettings, local: list[str]) -> None:
    """The files read must be the bytes the cache key was made from (hashed at run start)."""
    digest = hashlib.sha256("".join(content_digest(path) for path in local).encode()).hexdigest()
    if digest != data.content_sha256:
        raise ValueError(f"the data at {data.files[0]} changed after this run listed it; run again "
                         f"to train on the new data")


def read_rows(files: list[str], fmt: str, split: str) -> list[dict]:
    """Rows as dicts, through `datasets` (local files)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(fmt, data_files=files, split=split)
    except Exception as exc:  # noqa: BLE001 - surface the file, not a datasets traceback
        raise ValueError(f"could not read {', '.join(files)} as {fmt}: {exc}") from exc
    return [dict(row) for row in dataset]


def split_rows(rows: list[dict], eval_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split of (already unique) rows; eval_size is a fraction or a row count."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(eval_size) if eval_size >= 1 else round(len(rows) * eval_size)
    n_eval = min(max(n_eval, 1), len(rows) - 1)
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held_out = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held_out


def row_text(row: dict, columns: list[str]) -> str:
    """What makes two rows the same: their text columns."""
    return json.dumps([row.get(c) for c in columns])


def dedupe(rows: list[dict], columns: list[str]) -> tuple[list[dict], int]:
    seen, unique = set(), []
    for row in rows:
        marker = row_text(row, columns)
        if marker not in seen:
            seen.add(marker)
            unique.append(row)
    return unique, len(rows) - len(unique)


@grove_stage("load_data")
def load_data(data: DataSettings) -> dict:
    """Load, deduplicate and split the data; stores train.jsonl and eval.jsonl."""
    download = Path(tempfile.mkdtemp(prefix="grove-data-"))
    try:
        local = fetch(data.files + (data.eval_files or []), download)
        check_unchanged(data, local)
        return _dedupe_split_store(data, local[: len(data.files)], local[len(data.files):])
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _dedupe_split_store(data: DataSettings, files: list[str], eval_files: list[str]) -> dict:
    # Read through first, as local data was at run start (flows/config/checks.py): remote data
    # is read here for the first time, and gets the same one-line errors naming the URL.
    check_data(files, data.format, data.text_cols, data.eval_size, eval_files or None, data.max_samples,
               shown=dict(zip(files + eval_files, data.files + (data.eval_files or []))))
    rows = read_rows(files, data.format, data.split)
    if data.max_samples:
        rows = rows[: data.max_samples]
    unique, duplicates = dedupe(rows, data.text_cols)
    if data.eval_files:
        train = unique
        eval_rows, eval_dups = dedupe(read_rows(eval_files, data.format, data.split), data.text_cols)
        duplicates += eval_dups
        # never evaluate on text that was trained on
        train_text = {row_text(r, data.text_cols) for r in train}
        eval_rows = [r for r in eval_rows if row_text(r, data.text_cols) not in train_text]
    else:
        train, eval_rows = split_rows(unique, data.eval_size, data.seed)
    out = output_dir()
    for name, part in (("train.jsonl", train), ("eval.jsonl", eval_rows)):
        with open(out / name, "w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps({c: row.get(c) for c in data.text_cols}, ensure_ascii=False) + "\n")
    summary = {
        "rows": len(rows),
        "duplicates_removed": duplicates,
        "train_rows": len(train),
        "eval_rows": len(eval_rows),
    }
    if data.label_col:
        summary["train_labels"] = dict(Counter(str(r.get(data.label_col)) for r in train).most_common())
        summary["eval_labels"] = dict(Counter(str(r.get(data.label_col)) for r in eval_rows).most_common())
    (out / "stats.json").write_text(json.dumps(summary, indent=1))
    return summary
