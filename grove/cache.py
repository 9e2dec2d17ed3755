"""The one place a stage's cache key is built.

    settings key = sha256({"stage": name, "code": code_digest(stage module), "params": canonical(params)})[:32]
    key          = sha256({"settings": settings key, "machine": facts})[:32]

The facts are the machine's that runs the stage (grove/machine_facts.py): library versions,
device and dtype, what `auto` resolved to; the settings key is the same on every machine.

The code digest is complete by construction: it covers the source of the stage's module and
of every project module (under grove/, tasks/, flows/) that module imports, transitively. The
imports are read with `ast` from the source files, never by importing them, so a module imported
only inside a function counts as much as one imported at the top, and so does every package
`__init__.py` Python runs on the way (`import tasks.train.fit` runs tasks/__init__.py and
tasks/train/__init__.py). Third-party modules are left out of the code digest: the versions of
those a stage's numerics depend on enter its key as machine facts.

A module a stage runs in a subprocess (`python -m tasks.benchmark.worker`) is code the stage's
results depend on too. The stage imports that module and builds the command from its
`__name__` (`[sys.executable, "-m", worker.__name__]`): the walker sees a real import, a
renamed module fails at import rather than mid-run, and any import tool sees the dependency.
A module name spelled out in a string would be invisible here; tests/test_cache_keys.py
fails on any string literal in grove/ or tasks/ that names a project module the file does
not import.

grove/stage.py computes each key once per call through `stage_key` and hands Prefect the same
key as the task's `cache_key_fn` (which Prefect 3 wraps in a CachePolicy itself). A CachePolicy
subclass here would gain nothing and would import Prefect (~1.5 s) into every process that
imports grove.stage, each data-parallel training process included.

Digests are cached per process: every module is parsed once, so all seven stages cost a cached
rerun about 0.06 s of CPU (parsing ~30 files), paid once when the stages are imported.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from grove.pysource import parse_python

from pydantic import BaseModel

PROJECT_PACKAGES = ("grove", "tasks", "flows")


# ---- code digest ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _package_dir(top: str) -> Path | None:
    """Where Python would import a top-level project package from (the first on sys.path)."""
    spec = importlib.util.find_spec(top)
    locations = spec.submodule_search_locations if spec else None
    return Path(locations[0]) if locations else None


@functools.lru_cache(maxsize=None)
def source_file(module: str) -> Path | None:
    """The file of a project module (a package's `__init__.py`), or None for anything else."""
    top, _, rest = module.partition(".")
    base = _package_dir(top) if top in PROJECT_PACKAGES else None
    if base is None:
        return None
    path = base.joinpath(*rest.split(".")) if rest else base
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if rest and path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _statements(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """Every statement, however deeply nested (in functions, classes, if/try/with blocks):
    imports are statements, so expressions need not be visited (a tenth of the nodes)."""
    for node in nodes:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, block, None)
            if isinstance(inner, list):
                yield from _statements(inner)


@functools.lru_cache(maxsize=None)
def direct_imports(module: str) -> tuple[str, ...]:
    """The project modules `module`'s source imports, anywhere in the file."""
    path = source_file(module)
    source = path.read_text(encoding="utf-8")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(parse_python(source, str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..grove import y`
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(_with_parents(base))
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return tuple(sorted(name for name in found if name and source_file(name) is not None))


@functools.lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    """`module`, its packages, and every project module they import, transitively; sorted."""
    if source_file(module) is None:
        raise ValueError(f"{module!r} is not a module of the project packages {', '.join(PROJECT_PACKAGES)}")
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name not in seen and source_file(name) is not None:
            seen.add(name)
            todo.extend(direct_imports(name))
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def code_digest(module: str) -> str:
    """sha256 (16 hex digits) over the names and sources of `import_closure(module)`."""
    digest = hashlib.sha256()
    for name in import_closure(module):
        source = source_file(name).read_bytes()
        digest.update(f"{name}\n{len(source)}\n".encode())
        digest.update(source)
    return digest.hexdigest()[:16]


# ---- parameters ----------------------------------------------------------------------------------
@runtime_checkable
class KeyedByContent(Protocol):
    """A value that enters keys by what it holds, not where it lies (an upstream ArtifactRef)."""

    def key_form(self) -> dict[str, Any]: ...


def canonical(value: Any) -> Any:
    """JSON-ready, order-independent form of a stage's parameters: settings dumped, upstream
    artifacts as {artifact, content} (never their paths or timestamps)."""
    if isinstance(value, KeyedByContent):
        return value.key_form()
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, code: str, params: dict[str, Any]) -> str:
    """The settings key: everything but the machine (the same on every machine)."""
    body = json.dumps({"stage": stage, "code": code, "params": canonical(params)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def machine_key(settings_key: str, facts: dict[str, Any]) -> str:
    """A stage's cache key: its settings key and the facts of the machine that runs it
    (grove/machine_facts.py: library versions, device and dtype, what `auto` resolved to)."""
    body = json.dumps({"settings": settings_key, "machine": facts}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def settings_record(params: dict[str, Any]) -> dict[str, Any]:
    """The canonical parameters as stored in an entry's manifest. Settings hold no secrets
    (keys come from the environment or a Prefect block), but a data location may be a URL
    with a password or a signed query; those parts are left out of the record (the key
    still covers them)."""
    return _public(canonical(params))


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        if parts.password is None and not parts.query:
            return value
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # not a URL after all: keep nothing that might be one
        return "<redacted>"
    return urlunsplit((parts.scheme, netloc, parts.path, "<redacted>" if parts.query else "", ""))
