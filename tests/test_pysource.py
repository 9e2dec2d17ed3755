"""Parsing survives CPython 3.11's shared AST-constructor counter (CI failed once on it)."""

from __future__ import annotations

import ast
import gc
import importlib.util
from pathlib import Path

import pytest

from grove.pysource import parse_python

TRAINING_ARGS = Path(importlib.util.find_spec("transformers").submodule_search_locations[0]) / "training_args.py"


class ParsesWhenCollected:
    """Cyclic garbage whose finalizer parses: the collector runs it in the middle of a big parse."""

    def __init__(self):
        self.me = self

    def __del__(self):
        ast.parse("a[1] + b")


def arm_the_trap():
    gc.collect()
    for _ in range(5):
        ParsesWhenCollected()


def test_a_parse_interrupted_by_another_parse_is_retried_and_gives_the_whole_tree():
    source = TRAINING_ARGS.read_text()
    arm_the_trap()
    try:
        ast.parse(source)
    except SystemError as error:
        assert "recursion depth mismatch" in str(error)
    else:
        pytest.skip("this Python's ast.parse does not share its depth counter: nothing to retry")
    arm_the_trap()
    tree = parse_python(source, str(TRAINING_ARGS))
    assert ast.dump(tree) == ast.dump(ast.parse(source))


def test_training_argument_names_survive_the_trap():
    from flows.config import training_argument_names

    training_argument_names.cache_clear()
    arm_the_trap()
    names = training_argument_names()
    assert {"learning_rate", "per_device_train_batch_size", "num_train_epochs"} <= names


def test_other_system_errors_are_not_swallowed(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise SystemError("something else")

    monkeypatch.setattr(ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        parse_python("x = 1")
    assert len(calls) == 1
