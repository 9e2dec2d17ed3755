"""`grove predict`: one completion from a shipped model folder, with a named adapter active."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def predict(text: str = typer.Argument(..., help="The prompt."),
            model: Path = typer.Option(..., "--model", help="A shipped folder (holding model/ and adapters/) "
                                                            "or an ONNX model folder."),
            adapter: Optional[str] = typer.Option(None, "--adapter",
                                                  help="Name of an adapter in adapters/ (grove.ship: adapter)."),
            max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1)) -> None:
    """Greedy completion of TEXT; with --adapter, that fine-tune's LoRA adapter runs on the base."""
    from grove.served import AdapterMismatch, predict as complete

    try:
        typer.echo(complete(model, text, adapter, max_new_tokens))
    except AdapterMismatch as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
