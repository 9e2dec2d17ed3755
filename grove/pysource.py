"""Parse Python source with `ast`, surviving CPython 3.11's shared AST-constructor counter.

CPython 3.11 keeps the recursion counter that ast.parse uses to build Python objects in one place
per interpreter. Any other parse that runs while a big tree is being built (another thread, or a
finalizer the garbage collector runs mid-build; Python 3.11's traceback module parses source lines
to underline errors) leaves the counter off, and the finished parse fails with "SystemError: AST
constructor recursion depth mismatch". CI met it once, in config validation. The source is fine, so
the parse is tried again.
"""

from __future__ import annotations

import ast

ATTEMPTS = 3


def parse_python(source: str, filename: str = "<unknown>") -> ast.Module:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return ast.parse(source, filename=filename)
        except SystemError as error:
            if "AST constructor recursion depth mismatch" not in str(error) or attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")
