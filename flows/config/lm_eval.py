"""grove.evaluate.lm_eval_* -> LmEvalSettings: standard benchmarks through lm-evaluation-harness.

Checked before any work: lm-eval is installed, the include folder exists (its files' digest is
part of the evaluate and build_onnx keys, so an edited task runs again), lm-eval knows every
task named (a YAML file of the folder that does not parse is named with its line: lm-eval skips
it silently), and every task of the folder loads, its data included (a missing data file failed
evaluate, after training). A task's data files should sit in the include folder: files elsewhere
are read, but an edit to them is not seen by the keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import yaml

from flows.config.errors import ConfigError, did_you_mean
from flows.config.grove_section import GroveEval
from grove.settings import LmEvalSettings

WHERE = "grove.evaluate"
LM_EVAL = "lm-eval==0.4.13"  # pinned in pyproject.toml's lm-eval extra


def lm_eval_settings(section: GroveEval, sources) -> LmEvalSettings | None:
    if not section.lm_eval_tasks:
        if section.lm_eval_include is not None:
            raise ConfigError(f"{WHERE}.lm_eval_include", "is set but lm_eval_tasks names no task to run")
        return None
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{WHERE}.lm_eval_tasks", f"needs lm-evaluation-harness, which is not installed: "
                                                    f"pip install '{LM_EVAL}' (or grove[lm-eval])")
    include, digest = None, None
    if section.lm_eval_include is not None:
        folder = sources.existing(section.lm_eval_include)
        if folder is None or not folder.is_dir():
            raise ConfigError(f"{WHERE}.lm_eval_include", f"{section.lm_eval_include} is not a folder (relative "
                                                          f"paths: to the working directory or the config's folder)")
        include, digest = str(folder), folder_digest(folder)
    # the include folder alone first: lm-eval's own index (14,684 tasks) takes ~20-50 s to build
    own = known_tasks(include, builtin=False) if include else set()
    builtin = not set(section.lm_eval_tasks) <= own
    known = known_tasks(include, builtin=True) if builtin else own
    for index, task in enumerate(section.lm_eval_tasks):
        if task not in known:
            unreadable = unreadable_task_files(Path(include)) if include else []
            raise ConfigError(f"{WHERE}.lm_eval_tasks[{index}]", f"lm-eval has no task {task!r}"
                                                                 f"{did_you_mean(task, sorted(known))}"
                                                                 f"{'' if include else '; a task of your own needs lm_eval_include'}"
                                                                 f"{'; lm-eval skipped ' + unreadable[0] if unreadable else ''}")
    for index, task in enumerate(section.lm_eval_tasks):
        if task in own:
            check_loads(task, include, f"{WHERE}.lm_eval_tasks[{index}]")
    return LmEvalSettings(tasks=list(section.lm_eval_tasks), include_path=include, include_sha256=digest,
                          builtin=builtin, limit=section.lm_eval_limit)


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class _AnyTagLoader(yaml.SafeLoader):
    """YAML as lm-eval reads it, its tags (`!function utils.process_docs`) taken as plain values."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def unreadable_task_files(folder: Path) -> list[str]:
    """`file:line: why` for each YAML file of the include folder that does not parse."""
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)  # noqa: S506 - no tag is run
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            found.append(f"{path}{f':{mark.line + 1}' if mark else ''}: not YAML "
                         f"({getattr(exc, 'problem', None) or str(exc).splitlines()[0]})")
    return found


def check_loads(task: str, include: str, where: str) -> None:
    """A task of the include folder is built as evaluate builds it, its documents read (local files:
    a second or so): a missing data file or a bad key is said now, not after training."""
    from lm_eval.tasks import TaskManager

    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on defaults it fills in ("aggregation is not defined") are for the run
    try:
        TaskManager(include_path=include, include_defaults=False).load([task])
    except Exception as exc:  # noqa: BLE001 - lm-eval's and datasets' errors, said in one line
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(where, f"lm-eval task {task!r} (in lm_eval_include) does not load: {said}") from None
    finally:
        quiet.setLevel(level)


def known_tasks(include: str | None, builtin: bool) -> set[str]:
    """Every task and group name lm-eval knows: the include folder's, and its own when builtin."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include, include_defaults=builtin).all_tasks)
