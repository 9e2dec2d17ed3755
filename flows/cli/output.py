"""Tables the way the reader gets them: boxed and fitted to a terminal, plain rows anywhere else.

Off a terminal (a pipe, a log file, CI) rich would wrap at 80 columns, breaking commands and
URIs mid-line; there each row is one line of space-aligned columns, never wrapped, so it can be
read, grepped and cut.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from flows.cli import errors


class Listing:
    """A titled table: `columns` are names, or (name, rich column options) pairs."""

    def __init__(self, title: str | None, columns: list[str | tuple[str, dict]], **table_options):
        self.title, self.table_options = title, table_options
        self.columns = [c if isinstance(c, tuple) else (c, {}) for c in columns]
        self.rows: list[list[str]] = []

    def add_row(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def print(self) -> None:
        console = errors.console
        if console.is_terminal:
            table = Table(title=self.title, **self.table_options)
            for name, options in self.columns:
                table.add_column(name, **options)
            for row in self.rows:
                table.add_row(*row)
            console.print(table)
            return
        print(plain_rows(self.title, [name for name, _ in self.columns], self.rows), flush=True)


def plain_rows(title: str | None, header: list[str], rows: list[list[str]]) -> str:
    """The title, then the header and rows as space-aligned columns (markup taken out)."""
    lines = [[Text.from_markup(cell).plain for cell in row] for row in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(([title] if title else []) + text)
