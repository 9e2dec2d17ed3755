"""The one error class for a user's mistake (a config value, a data file, a folder, a missing runtime).

The `grove` command prints it as one line, `error: <where>: <what>`, and exits with code 2;
any other exception is a bug or a failure of the machine and keeps its traceback. It is a
ValueError, so a stage raising it is never retried (grove/stage.py worth_retrying).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; its message starts with where (key path, file:line)."""
