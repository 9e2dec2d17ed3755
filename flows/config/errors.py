"""ConfigError, the one did-you-mean helper, and the warnings a parse collects."""

from __future__ import annotations

import difflib
import json
import logging
import re
import types
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from grove.errors import UserError

log = logging.getLogger("grove.config")


class ConfigError(UserError):
    """A config problem, with the key path (and file) it concerns."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.message, self.source = path, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")


class Strict(BaseModel):
    # JSON's Infinity and NaN read as numbers: an infinite bound (max_kl: Infinity) would pass every build
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 for a number: `max_rows: true` (or the override max_rows=true)
        would evaluate one row, said nowhere."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _admits(annotation, (int, float)) and not _admits(annotation, (bool,)):
            raise PydanticCustomError("bool_for_number", "input should be a number, not true or false")
        return value


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type takes a value of one of `kinds` as it is (Any does, a list does not)."""
    if annotation is Any or annotation in kinds:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return any(type(arg) in kinds for arg in args)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_admits(arg, kinds) for arg in args)
    return False


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), sorted(set(choices)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Warnings:
    """Every warning one parse produced: logged as it happens, kept for `grove validate --resolved`."""

    def __init__(self, into: list[str] | None = None):
        self.messages = into if into is not None else []

    def __call__(self, path: str, message: str) -> None:
        text = f"{path}: {message}"
        if text not in self.messages:
            self.messages.append(text)
            log.warning(text)


def check_keys(raw: dict, valid: Iterable[str], where: str) -> None:
    valid = set(valid)
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{where}.{key}" if where else key, f"unknown key{did_you_mean(key, valid)}")


def validate(model: type[BaseModel], raw: Any, where: str, known: Iterable[str] = (),
             elsewhere: dict[str, type[BaseModel]] | None = None):
    """`raw` validated into `model`; the first problem as a ConfigError naming its key path.
    `known`: other key names of the section (warned/refused ones) offered as suggestions;
    `elsewhere`: sections an unknown key may belong to (`precision` on a LoRA pass), named if so."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be an object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        # pydantic reports each member of a union (`candidates: "ladder" | [...]`): of the first
        # field's errors the deepest is the one inside the value written, not "should be 'ladder'"
        first = exc.errors()[0]
        error = max((e for e in exc.errors() if e["loc"][:1] == first["loc"][:1]), key=lambda e: len(e["loc"]))
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "union[", "literal["))]
        # keep the key path only
        loc = [p for p in loc if p not in ("str", "list[str]", "dict[str,any]", "int", "float", "bool")
               and not re.fullmatch(r"list\[\w+\]", p)]
        items = {str(p) for p in error["loc"] if isinstance(p, int)}  # list items read [0], as elsewhere
        path = "".join(f"[{p}]" if p in items else f".{p}" for p in [where, *loc] if p).lstrip(".")
        if error["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            choices = list(parent.model_fields) if parent else []
            if parent is model:
                choices += list(known)
            owner = next((name for name, other in (elsewhere or {}).items() if loc[-1] in other.model_fields), None)
            hint = (f" here (a {owner} setting; set it on that pass)" if owner and parent is model
                    else did_you_mean(loc[-1], choices))  # the exact name elsewhere beats a near one here
            raise ConfigError(path, f"unknown key{hint}") from None
        if error["type"] == "missing":
            raise ConfigError(path, "is required") from None
        got = error.get("input")
        shown = json.dumps(got) if isinstance(got, (str, int, float, bool)) else type(got).__name__
        raise ConfigError(path, f"{error['msg'].lower()} (got {shown})") from None


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [a for a in typing.get_args(annotation) or [annotation]
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        current = candidates[0] if candidates else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None
