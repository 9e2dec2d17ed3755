"""Comparing runs: `grove runs` and `grove show` show each run's key metrics, `grove diff RUN RUN` puts two runs
side by side (the settings that differ by the key paths config errors name, the stored entries
that differ, every metric), all read from the run records a real `grove run` wrote."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from flows.compare import number, short

runner = CliRunner()


def grove(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_runs_show_each_runs_key_metrics_as_its_stages_measured_them(named_runs):
    from grove.store import ArtifactStore

    folder, configs = named_runs
    root = str(folder / ".grove-cache")
    records = json.loads(grove("runs", "--store", root, "--json"))
    header, *rows = grove("runs", "--store", root).splitlines()[1:]
    columns = header.split()
    assert columns[-6:] == ["tuned", "acc", "loss", "ppl", "MB", "tok/s"], header
    store = ArtifactStore(root)
    for record in records:
        cells = next(r for r in rows if r.startswith(record["run_id"][:8])).split()
        shown = dict(zip(columns[-6:], cells[-6:]))
        measured = record["metrics"]
        summary = {s["stage"]: store.by_digest(s["digest"]).manifest["meta"]["summary"] for s in record["stages"]}
        assert measured["fine_tuned.eval_loss"] == summary["evaluate"]["fine_tuned"]["eval_loss"]
        assert measured["fine_tuned.perplexity"] == summary["evaluate"]["fine_tuned"]["perplexity"]
        assert measured["onnx.accuracy"] == summary["build_onnx"]["accuracy"]
        assert measured["shipped.size_mb"] == round(summary["build_onnx"]["size_bytes"] / 2**20, 2)
        assert measured["bench.onnx.decode_tokens_per_s"] == summary["benchmark"]["onnx"]["decode_tokens_per_s"]
        assert shown == {"tuned": short(measured["fine_tuned.accuracy"]), "acc": short(measured["onnx.accuracy"]),
                         "loss": short(measured["fine_tuned.eval_loss"]),
                         "ppl": short(measured["fine_tuned.perplexity"]), "MB": short(measured["shipped.size_mb"]),
                         "tok/s": short(measured["bench.onnx.decode_tokens_per_s"])}, (header, cells)
        assert record["shipped"] == f"{summary['build_onnx']['precision']} cpu"  # a single build, no search
        assert cells[5] == f"{sum(s['status'] == 'ran' for s in record['stages'])}/7"  # the date has a space
        shows = grove("show", record["run_id"][:8], "--store", root)
        assert "\nmetrics: " + ", ".join(f"{k} {number(measured[n])}" for k, n in (
            ("tuned", "fine_tuned.accuracy"), ("acc", "onnx.accuracy"), ("loss", "fine_tuned.eval_loss"),
            ("ppl", "fine_tuned.perplexity"), ("MB", "shipped.size_mb"),
            ("tok/s", "bench.onnx.decode_tokens_per_s"))) + "\n" in shows, shows
    only_tiny = grove("runs", "-c", str(configs["tiny"]))
    assert "Runs of tiny in" in only_tiny and len(only_tiny.splitlines()) == 3, only_tiny


def test_diff_puts_two_runs_side_by_side_settings_by_key_path_and_metrics(named_runs):
    folder, _ = named_runs
    root = str(folder / ".grove-cache")
    records = {r["name"]: r for r in json.loads(grove("runs", "--store", root, "--json"))}
    tiny, other = records["tiny"]["run_id"], records["other"]["run_id"]
    compared = json.loads(grove("diff", tiny[:8], other[:8], "--store", root, "--json"))
    # the two configs differ in grove.name alone; `other` took every stage from `tiny`'s entries
    assert compared["settings"] == {"grove.name": ['"tiny"', '"other"']}, compared["settings"]
    assert compared["entries"] == {}
    for key in ("fine_tuned.eval_loss", "base.perplexity", "onnx.accuracy", "shipped.size_mb"):
        assert compared["metrics"][key] == [records["tiny"]["metrics"][key], records["other"]["metrics"][key]]
    said = grove("diff", tiny[:8], other[:8], "--store", root)
    assert said.splitlines()[0].startswith(f"{tiny[:8]}: tiny (")
    assert f"key         {tiny[:8]}  {other[:8]}" in said and 'grove.name  "tiny"    "other"' in said, said
    loss = number(records["tiny"]["metrics"]["fine_tuned.eval_loss"])
    assert any(line.split() == ["fine_tuned.eval_loss", loss, loss] for line in said.splitlines()), said
    assert "no run with id 'nope'" in grove("diff", "nope", tiny[:8], "--store", root, code=2)
    twice = grove("diff", tiny[:8], tiny[:6], "--store", root)
    assert f"{tiny[:8]} and {tiny[:6]} are the same run: nothing differs" in twice and "Metrics" not in twice, twice


def test_runs_at_80_columns_keeps_every_column_whole(named_runs, terminal_80):
    folder, _ = named_runs
    grove("runs", "--store", str(folder / ".grove-cache"))
    table = terminal_80.getvalue()
    assert all(len(line) <= 80 for line in table.splitlines()), table
    header = next(line for line in table.splitlines() if line.startswith("run "))
    assert header.split() == ["run", "started", "name", "status", "ran", "tuned", "acc", "loss", "ppl", "MB", "tok/s"]
    assert "…" not in table, table
