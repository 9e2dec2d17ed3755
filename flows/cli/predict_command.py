"""`grove predict`: a shipped model answers texts given as arguments, on standard input (`-`) or
in a file (`--input`: one text a line, or JSONL rows carrying the template's fields)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from flows.cli.app import app
from flows.cli.errors import clean_errors

STDIN = "-"


@app.command()
def predict(model: Path = typer.Option(..., "--model", help="A shipped folder: <output_dir>/<name> or its model/."),
            texts: Optional[list[str]] = typer.Argument(None, metavar="TEXT", show_default=False,
                                                        help="Texts to answer, one answer line each (a free-text "
                                                             "answer: as many lines as it has); - reads standard "
                                                             "input, one text a line."),
            input_file: Optional[str] = typer.Option(None, "--input", "-i", show_default=False,
                                                     help="A file of texts, one a line, or .jsonl (.json) rows with "
                                                          "the template's fields (other keys ignored); - for stdin."),
            field: Optional[list[str]] = typer.Option(None, "--field", help="NAME=VALUE for a template with "
                                                                           "several fields."),
            adapter: Optional[str] = typer.Option(None, "--adapter", help="A named adapter in adapters/ "
                                                                          "(grove.ship: adapter), active on the base."),
            max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                         help="Default: as the evaluation scored it.")) -> None:
    """Answer with a shipped ONNX model exactly as the evaluation scored it (its README.md snippet)."""
    from grove.errors import UserError

    with clean_errors():
        inputs = gather_inputs(texts or [], input_file, field or [])  # the user's mistakes before the model loads
        if not inputs:
            raise UserError("give a text to answer, - to read them from standard input, --input FILE "
                            "or --field NAME=VALUE")
        shipped = _shipped(model, adapter)
        if max_new_tokens:
            shipped.spec = {**shipped.spec, "max_new_tokens": max_new_tokens}
        rows = [row_of(shipped, value, where) for value, where in inputs]  # every row checked before answering
        for row in rows:
            print(shipped.answer(row), flush=True)


def gather_inputs(texts: list[str], input_file: str | None, fields: list[str]) -> list[tuple[Any, str]]:
    """(a text or a row of fields, where it came from), in the order given; an empty text is refused."""
    from grove.errors import UserError

    found: list[tuple[Any, str]] = []
    for number, text in enumerate(texts, 1):
        if text == STDIN:
            found += _lines(_standard_input(), "standard input", jsonl=False)
        elif not text.strip():
            raise UserError(f"text {number} is empty: nothing to answer")
        else:
            found.append((text, f"text {number}"))
    if input_file is not None:
        if input_file == STDIN:
            found += _lines(_standard_input(), "standard input", jsonl=False)
        else:
            path = Path(input_file)
            if not path.is_file():
                raise UserError(f"--input {input_file}: no such file")
            # .json too: Grove's data_name json reads JSON Lines; each line taken as a text would be answered
            found += _lines(_text(path.read_bytes(), str(path)), str(path), jsonl=path.suffix in (".jsonl", ".json"))
    if fields:
        pairs = [f.split("=", 1) for f in fields]
        if any(len(p) != 2 for p in pairs):
            raise UserError("--field takes NAME=VALUE")
        found.append((dict(pairs), "--field"))
    return found


def _standard_input() -> str:
    stream = getattr(sys.stdin, "buffer", None)  # bytes: undecodable input is said, not passed on as surrogates
    return _text(stream.read(), "standard input") if stream is not None else sys.stdin.read()


def _text(data: bytes, source: str) -> str:
    from grove.errors import UserError

    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{source}:{line}: not UTF-8 text (byte {exc.start}); give texts one a line, "
                        f"or .jsonl rows") from None


def _lines(text: str, source: str, jsonl: bool) -> list[tuple[Any, str]]:
    """Each non-blank line a text (or a JSON row); nothing at all is a mistake, not zero answers."""
    from grove.errors import UserError

    found = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: a text may hold \x1c or \x0b
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{source}:{number}"
        if jsonl:
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{where}: not a JSON object: {exc}") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: not a JSON object (a row of the template's fields)")
            found.append((row, where))
        else:
            found.append((line, where))
    if not found:
        raise UserError(f"{source}: no text to answer")
    return found


def row_of(shipped, value: Any, where: str) -> dict[str, Any]:
    """The template's fields for one input: a text fills the only field; a row must carry them all."""
    from grove.errors import UserError

    if isinstance(value, str):
        try:
            return shipped.row_from_text(value)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    fields = shipped.spec["fields"]
    missing = [name for name in fields if name not in value]
    if missing:
        raise UserError(f"{where}: no {', '.join(map(repr, missing))} (the prompt template's fields: "
                        f"{', '.join(fields)})")
    empty = [name for name in fields if value[name] is None or not str(value[name]).strip()]
    if empty:
        raise UserError(f"{where}: {', '.join(map(repr, empty))} is empty: nothing to answer")
    return {name: value[name] for name in fields}


def _shipped(model: Path, adapter: str | None):
    from grove.errors import UserError
    from grove.served import adapter_file, adapter_prompt
    from grove.shipped import ShippedModel

    if not model.is_dir():
        raise UserError(f"--model {model}: no such folder (a shipped <output_dir>/<name>, its model/, or a "
                        f"grove export folder)")
    folder = model / "model" if (model / "model").is_dir() else model
    if not adapter:
        return ShippedModel(folder)
    from grove.engines import OnnxEngine

    file = adapter_file(model, adapter)
    spec = adapter_prompt(file)
    if spec is None:
        raise UserError(f"{file}: no prompt template shipped with it (adapters/{adapter}.grove_prompt.json)")
    return ShippedModel(folder, OnnxEngine(folder, set(spec["eos_token_ids"]), adapter=file), spec)
