"""Data files with a byte-order mark (spreadsheets write one): Grove's checks read the columns the
training loader reads, so such a file is neither refused nor misread."""

from __future__ import annotations

import json

import pytest

from conftest import TONE_DATA
from grove.data_check import first_columns, records

BOM = b"\xef\xbb\xbf"
ROWS = [json.loads(line) for line in TONE_DATA.read_text().splitlines()[:6]]


def with_bom(path, text: str):
    path.write_bytes(BOM + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_bom_file_has_the_columns_the_loader_sees(fmt, tmp_path):
    from datasets import load_dataset

    if fmt == "csv":
        text = "phrase,tone\n" + "".join(f"\"{r['phrase']}\",{r['tone']}\n" for r in ROWS)
        path = with_bom(tmp_path / "rows.csv", text)
    else:
        path = with_bom(tmp_path / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    loaded = load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(first_columns(str(path), fmt)) == sorted(loaded.column_names) == ["phrase", "tone"]
    checked = [record for _, record in records(str(path), fmt)]
    assert checked == [{k: str(v) if fmt == "csv" else v for k, v in r.items()} for r in ROWS]


def test_a_config_saved_with_a_bom_reads(tiny_model, tmp_path):
    from conftest import tiny_config
    from flows.config import load_config

    raw = tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    config = with_bom(tmp_path / "run.json", json.dumps(raw, indent=1))
    assert load_config(config).model.name
