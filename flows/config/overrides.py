"""Command-line overrides: `key.path=value` applied to the raw config before it is validated.

Key paths are the ones config errors name (`passes.lora.config.training_args.max_steps`,
`grove.device`, `data_configs[0].name` or `data_configs.tone....` by the data config's name), so an
override goes through the same validation, and a mistake in one gets the same one-line error,
marked as coming from the command line. A value is JSON when it parses as JSON (`20`, `true`,
`[1, 2]`, `null`), else the text as written (`cpu`, `q_proj`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from flows.config.errors import ConfigError, did_you_mean

COMMAND_LINE = "command line"
_INDEX = re.compile(r"^(?P<key>[^\[\]]*)(?P<indexes>(\[\d+\])*)$")


@dataclass
class Override:
    text: str  # as the user wrote it, for errors and the run record
    path: str  # the key path, normalised: list indexes as `[n]`
    value: Any
    named: str = ""  # the same path with list items by their `name`, as data config errors say it


@dataclass
class Applied:
    """The overridden raw config, and which mappings an override had to create (a typo'd
    section name, say): an error there offers the section names that do exist."""
    raw: Any
    overrides: list[Override]
    created: dict[str, list[str]] = field(default_factory=dict)  # created path -> its siblings


def parse_override(text: str) -> Override:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"override {text!r}: write KEY.PATH=VALUE "
                              f"(e.g. passes.lora.config.training_args.max_steps=20)", COMMAND_LINE)
    _segments(key, text)  # refuse an unreadable path before anything is read
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return Override(text, key, parsed)


def _segments(path: str, text: str) -> list[str | int]:
    """`a.b[0].c` -> ['a', 'b', 0, 'c']."""
    found: list[str | int] = []
    for part in path.split("."):
        match = _INDEX.match(part)
        if not match or (not match["key"] and (not found or not match["indexes"])):
            raise ConfigError("", f"override {text!r}: {path!r} is not a key path "
                                  f"(keys joined by dots, list items as [0])", COMMAND_LINE)
        if match["key"]:
            found.append(match["key"])
        found.extend(int(i) for i in re.findall(r"\d+", match["indexes"]))
    return found


def apply_overrides(raw: Any, overrides: list[Override]) -> Applied:
    """A copy of `raw` with each override set, in order (a later one wins)."""
    applied = Applied(copy.deepcopy(raw), overrides)
    for override in overrides:
        _set(applied, override)
    return applied


def _set(applied: Applied, override: Override) -> None:
    if not isinstance(applied.raw, dict):
        return  # parse_config says what is wrong with the file itself
    segments = _segments(override.path, override.text)
    node: Any = applied.raw
    walked = named = ""
    for position, segment in enumerate(segments):
        here = f"{walked}[{segment}]" if isinstance(segment, int) else f"{walked}.{segment}".lstrip(".")
        if isinstance(node, list):
            segment = _list_position(node, segment, here, override)
            name = node[segment].get("name") if isinstance(node[segment], dict) else None
            named = f"{named}.{name}" if isinstance(name, str) else f"{named}[{segment}]"
        elif isinstance(segment, int):
            raise ConfigError(walked, f"is a section, not a list (from the command line: {override.text})")
        else:
            named = f"{named}.{segment}".lstrip(".")
        if position == len(segments) - 1:
            node[segment] = override.value
            break
        if isinstance(node, dict) and segment not in node:  # a section the file leaves out
            applied.created[here] = [k for k in node if isinstance(k, str)]
            node[segment] = {}
        if not isinstance(node[segment], (dict, list)):
            raise ConfigError(here, f"is {json.dumps(node[segment])}, not a section with keys "
                                    f"(from the command line: {override.text})")
        node, walked = node[segment], here
    override.named = named


def _list_position(items: list, segment: str | int, here: str, override: Override) -> int:
    """A list item by index, or a named item (data_configs.<name>) by its `name`."""
    if isinstance(segment, int):
        if segment >= len(items):
            raise ConfigError(here, f"no such item: the list has {len(items)} "
                                    f"(from the command line: {override.text})")
        return segment
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if segment not in names:
        raise ConfigError(here, f"no item named {segment!r}{did_you_mean(segment, [n for n in names if n])} "
                                f"(from the command line: {override.text})")
    return names.index(segment)


def blame(error: ConfigError, applied: Applied | None) -> ConfigError:
    """The config error marked as coming from an override when its key path is one an override
    set (or lies inside or above one); otherwise the error as it was (it is the file's)."""
    if applied is None or not applied.overrides:
        return error
    path = _normal(error.path)
    for override in reversed(applied.overrides):  # the last override of a key is the one in effect
        if any(_related(path, _normal(mine)) for mine in (override.path, override.named) if mine):
            hint = ""
            for created, siblings in applied.created.items():
                if _normal(created) == path and "(did you mean" not in error.message:  # said once
                    hint = did_you_mean(path.rsplit(".", 1)[-1], siblings)
            return ConfigError(error.path, f"{error.message}{hint} (from the command line: {override.text})",
                               error.source)
    return error


def _related(path: str, mine: str) -> bool:
    """The same key, or one inside the other."""
    return bool(path) and (path == mine or any(a.startswith(b + sep) for a, b in ((path, mine), (mine, path))
                                               for sep in (".", "[")))


def _normal(path: str) -> str:
    return path.strip(".")
