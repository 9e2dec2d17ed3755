"""The `grove` command's conventions: -h and --version, plain flag help, the default store, a store
that does not exist, `runs -c` listing that config's runs, plain unwrapped rows off a terminal, a
models table that fits 80 columns, provider typos naming what Grove builds, no GGUF bar in logs."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from flows.cli import app

runner = CliRunner()


def grove(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def store(named_runs):
    return named_runs


def test_h_version_and_flags_without_type_noise():
    assert "[OPTIONS] COMMAND" in grove("-h") and "Show this message" in grove("-h")
    usage = grove("validate", "-h")
    assert "--resolved" in usage and "<bool>" not in usage and "--help" in usage, usage
    assert "Print each stage's resolved settings" in usage, "help sentences as every other option's"
    assert "show [OPTIONS] {RUN}" in " ".join(grove("show", "-h").split()), "the argument named as diff names it"
    assert grove("--version").strip() == "grove 0.1.0"


def test_models_and_runs_use_the_default_store_and_runs_c_lists_that_configs(store, monkeypatch):
    folder, configs = store
    monkeypatch.chdir(folder)
    listed = grove("runs")
    assert "tiny" in listed and "other" in listed
    assert "tiny" in grove("models") and "other" in grove("models")
    mine = json.loads(grove("runs", "-c", str(configs["tiny"]), "--json"))
    assert [r["name"] for r in mine] == ["tiny"]
    table = grove("runs", "-c", str(configs["tiny"]))
    assert "tiny" in table and "other" not in table.replace(str(folder), "")
    third = folder / "third.json"
    third.write_text(json.dumps({**json.loads(configs["tiny"].read_text()), "grove": {"name": "third"}}))
    assert grove("runs", "-c", str(third)).strip() == f"no runs of third recorded in {folder / '.grove-cache'}"


def test_a_store_that_does_not_exist_is_an_error_not_an_empty_table(tmp_path, monkeypatch):
    for command in ("runs", "models"):
        said = grove(command, "--store", str(tmp_path / "nope"), code=2)
        assert f"no artifact store at {tmp_path / 'nope'}" in said
    monkeypatch.chdir(tmp_path)
    assert "(the default store; name one with --store or --config)" in grove("runs", code=2)
    (tmp_path / "empty" / "entries").mkdir(parents=True)  # a store that holds no run yet
    assert grove("runs", "--store", str(tmp_path / "empty")).strip() == f"no runs recorded in {tmp_path / 'empty'}"


def test_off_a_terminal_tables_are_plain_rows_and_nothing_wraps(store, monkeypatch):
    folder, configs = store
    root = str(folder / ".grove-cache")
    listed = grove("runs", "--store", root)
    assert "│" not in listed and "┃" not in listed
    assert f"Runs in {root}" in listed.splitlines(), "the title with the whole root, on one line"
    header, *rows = listed.splitlines()[1:]
    assert header.split() == ["run", "started", "name", "status", "ran", "tuned", "acc", "loss", "ppl", "MB", "tok/s"]
    assert len(rows) == 2 and all(len(row.split()) == 12 for row in rows), rows  # the date has a space
    ok = grove("validate", "-c", str(configs["tiny"])).strip().splitlines()
    assert ok[0].startswith("ok: ") and ok[0].endswith(root) and ok[1].startswith("build: "), ok


def test_models_at_80_columns_keeps_the_short_columns_whole(store, terminal_80):
    folder, _ = store
    grove("models", "--store", str(folder / ".grove-cache"))
    table = terminal_80.getvalue()
    assert all(len(line) <= 80 for line in table.splitlines()), table
    current = json.loads(grove("models", "--store", str(folder / ".grove-cache"), "--json"))
    for name, body in current.items():
        assert body["current"]["run_id"][:8] in table, table  # the run id, not folded
        assert body["current"]["promoted_at"][:10] in table, table
    for header in ("promoted", "acc", "tuned", "tok/s", "agree"):
        assert header in table, table
    assert "e+" not in table, "numbers as grove runs prints them (16668, not 1.667e+04)"


def test_a_provider_typo_names_only_what_grove_builds(tiny_model, tone_copy, tmp_path, write_config):
    config = write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out"))
    said = " ".join(grove("validate", "-c", str(config), 'engine.execution_providers=["CPUExecutionProvidr"]',
                          code=2).split())
    assert "(did you mean 'CPUExecutionProvider'?); Grove builds for CPUExecutionProvider or " \
           "CUDAExecutionProvider" in said and "Tensorrt" not in said, said


def test_the_gguf_conversion_draws_no_bar_off_a_terminal():
    """The conversion itself takes ~20 s: the check is on the tqdm transformers' GGUF loader uses
    while model_folder converts (grove.models.gguf_bar_only_on_a_terminal)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from grove.models import gguf_bar_only_on_a_terminal

    log = io.StringIO()
    with gguf_bar_only_on_a_terminal():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=log):
            pass
    assert log.getvalue() == ""


def test_mistakes_end_as_one_line_from_the_real_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "runs", "--store", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [f"error: no artifact store at {tmp_path / 'nope'}: "
                                                f"nothing was ever stored there"]
    version = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("grove "), version


def test_export_takes_a_promoted_model_a_run_or_an_entry_out_and_predict_answers_from_it(store, tmp_path):
    folder, _ = store
    root = str(folder / ".grove-cache")
    listing = grove("models", "--store", root)
    assert "grove export NAME (or a past RUN id) --to FOLDER" in listing and "grove predict --model FOLDER" in listing
    grove("export", "tiny", "--to", str(tmp_path / "tiny"), "--store", root)
    out = tmp_path / "tiny"
    for file in ("model/genai_config.json", "model/grove_prompt.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "merged/config.json", "merged/model.safetensors",
                 "metrics/metrics.json", "metrics/train_log.json", "metrics/benchmark.json", "README.md"):
        assert (out / file).is_file(), file
    readme = (out / "README.md").read_text()
    assert "`adapter/` | the LoRA adapter in peft format" in readme and "metrics/train_log.json" in readme
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 4  # peft reads it as written
    answered = runner.invoke(app, ["predict", "--model", str(out), "Could you kindly advise?"])
    assert answered.exit_code == 0 and answered.stdout.strip(), answered.output

    other = json.loads(grove("runs", "--store", root, "--json"))
    run = next(r for r in other if r["name"] == "other")
    grove("export", run["run_id"][:8], "-o", str(tmp_path / "run"), "--store", root)
    assert json.loads((tmp_path / "run" / "export.json").read_text())["source"].startswith(f"run {run['run_id']}")
    train = next(s for s in run["stages"] if s["stage"] == "train")
    grove("export", f"train/{train['key'][:10]}", "-o", str(tmp_path / "entry"), "--store", root)
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["README.md", "adapter", "export.json", "metrics"]
    rows = next(s for s in run["stages"] if s["stage"] == "load_data")
    grove("export", f"load_data/{rows['key'][:10]}", "-o", str(tmp_path / "rows"), "--store", root)
    assert sorted(p.relative_to(tmp_path / "rows").as_posix() for p in (tmp_path / "rows").rglob("*.json*")) == \
        ["export.json", "load_data/eval.jsonl", "load_data/stats.json", "load_data/train.jsonl"], "data, not metrics/"

    said = " ".join(grove("export", "nope", "-o", str(tmp_path / "x"), "--store", root, code=2).split())
    assert said.startswith("error: nope: no promoted model, run id or STAGE/KEY by that name") and "tiny" in said
    assert "exists and is not empty" in grove("export", "tiny", "-o", str(out), "--store", root, code=2)
    config = folder / "tiny.json"
    said = grove("export", "tiny", "-o", str(config), "--store", root, code=2)
    assert said.startswith(f"error: {config}: is a file; export into a new folder"), said


def test_an_export_that_fails_half_way_leaves_no_half_folder(store, tmp_path, monkeypatch):
    """A full disk cannot be made here: the copy fails (ENOSPC) after the adapter's and evaluate's
    files, as it would on a merged model of a few GB."""
    import errno
    import shutil

    folder, _ = store
    copy, copied = shutil.copyfile, []

    def fills_the_disk(source, destination):
        if len(copied) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
        copied.append(destination)
        return copy(source, destination)

    monkeypatch.setattr(shutil, "copyfile", fills_the_disk)
    said = grove("export", "tiny", "-o", str(tmp_path / "half"), "--store", str(folder / ".grove-cache"), code=2)
    assert said.startswith(f"error: {tmp_path / 'half'}: export failed, nothing written: No space left on device")
    assert len(copied) == 4 and list(tmp_path.iterdir()) == [], "no half folder a second try would call not empty"
