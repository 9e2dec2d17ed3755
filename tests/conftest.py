"""Shared fixtures: a real Prefect server, tiny models, tiny Olive configs.

The Prefect API is real (`prefect server start` on 127.0.0.1 with a fresh SQLite
database, stopped by its pid). Models are tiny random ones made here, except in the
one end-to-end test that runs the bundled SmolLM2 (tests/test_bundled_model.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from processes import stop_group

ROOT = Path(__file__).resolve().parents[1]
TONE_DATA = ROOT / "configs" / "data" / "tone.jsonl"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


ON_REQUEST = ("gpu", "long")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu or long run only when `-m` names their marker (`pytest -m gpu`,
    `pytest -m long`): CI and this kind of machine have no GPU, and a long test (a real-model
    run of a quarter of an hour on 2 cores) does not fit the suite's 30 minutes. Any other run,
    `-m "not slow"` included, deselects them."""
    named = config.getoption("markexpr") or ""
    held = [m for m in ON_REQUEST if m not in named]
    dropped = [item for item in items if any(item.get_closest_marker(m) for m in held)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def grove_home(tmp_path_factory):
    """Converted models and digests go to a per-session GROVE_HOME, except the bundled model's
    conversion, which is shared through GROVE_TEST_MODELS when set (it takes ~40 s)."""
    home = tmp_path_factory.mktemp("grove-home")
    shared = os.environ.get("GROVE_TEST_MODELS")
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(shared)
    os.environ["GROVE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory):
    """A real Prefect server for the whole session (one flow run costs ~1 s against it), with its
    UI (tests/test_nightly.py renders a flow-run page). A task held back by a tag concurrency
    limit asks again every second instead of Prefect's default 30."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        raise RuntimeError(f"Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
        yield url
    stop_group(server)
    log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session, with a bucket `grove-tests`."""
    from seaweedfs import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    server.make_bucket("grove-tests")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and keys in the environment, as a user would set them."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    """Each test using it runs twice: on a local folder and on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://grove-tests/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from grove.models import make_tiny_model

    corpus = [f"### Text: {json.loads(line)['phrase']}\n### The tone is:\n{json.loads(line)['tone']}"
              for line in TONE_DATA.read_text().splitlines()]
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", corpus)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    from grove.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "phi3", "phi3")


def tiny_config(model: Path, data: Path, store: Path, output: Path, rows: int | None = 60,
                precision: str = "int4") -> dict:
    """A small Olive config (new dialect) on a tiny model: every stage in seconds."""
    pre = {"dataset_type": "corpus", "text_cols": ["phrase", "tone"],
           "text_template": "### Text: {phrase}\n### The tone is:\n{tone}",
           "corpus_strategy": "line-by-line", "source_max_len": 64, "pad_to_max_len": False}
    if rows:
        pre["max_samples"] = rows
    return {
        "input_model": {"type": "HfModel", "model_path": str(model)},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": "cpu",
                                                       "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": "tone", "type": "HuggingfaceContainer",
                          "load_dataset_config": {"params": {"data_name": "json", "data_files": str(data),
                                                             "split": "train"}},
                          "pre_process_data_config": {"params": pre}}],
        "passes": {
            "lora": {"type": "LoRA", "config": {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                "train_data_config": "tone",
                                                "training_args": {"seed": 0, "per_device_train_batch_size": 8,
                                                                  "max_steps": 3, "learning_rate": 1e-3,
                                                                  "logging_steps": 1}}},
            "merge": {"type": "MergeAdapterWeights"},
            "builder": {"type": "ModelBuilder", "config": {"precision": precision}},
        },
        "engine": {"cache_dir": str(store), "output_dir": str(output)},
        # the build as written: a tiny model scores at chance, so the default ladder search would
        # build one to three candidates (tests/test_default_search.py turns it back on)
        "grove": {"name": "tiny", "evaluate": {"max_new_tokens": 3, "max_rows": 8},
                  "benchmark": {"prompts": 1, "max_new_tokens": 4, "warmup": 0, "repeats": 1},
                  "quantization_search": {"enabled": False}},
    }


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one_label_rows(start: int, stop: int) -> str:
    rows = [json.loads(line) for line in TONE_DATA.read_text().splitlines()][start:stop]
    return "".join(json.dumps({"phrase": r["phrase"], "tone": "formal"}) + "\n" for r in rows)


def learnable_config(model: Path, data: str, store: str, output: Path) -> dict:
    """Tiny model, one label, enough steps to learn it (~30 s of training on 2 cores)."""
    raw = tiny_config(model, TONE_DATA, store, output, rows=None, precision="fp32")
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = data
    lora = raw["passes"]["lora"]["config"]
    lora["target_modules"] = ALL_LINEAR
    lora["training_args"].update(max_steps=30, learning_rate=2e-2)
    raw["grove"]["evaluate"]["max_new_tokens"] = 6
    raw["grove"]["promotion"] = {"metric": "onnx_accuracy", "min": 0.5, "max_drop": 0.1}
    return raw


@pytest.fixture(scope="session")
def trained_store(tiny_model, prefect_api, tmp_path_factory) -> Path:
    """A local store holding one whole run of `tiny_config` on the bundled tone data, made once
    per session. A test whose first run only sets the scene (the stages it asserts on come
    after) seeds its own store from it (`seed_store`) instead of training and building again:
    keys depend on contents and settings, not paths, so a config with the same data, model and
    settings takes those stages from the cache."""
    from flows.optimize import optimize

    folder = tmp_path_factory.mktemp("trained")
    config = folder / "run.json"
    config.write_text(json.dumps(tiny_config(tiny_model, TONE_DATA, folder / "store", folder / "out")))
    result = optimize(str(config))
    assert [s["status"] for s in result["stages"]] == ["ran"] * 7, result["stages"]
    return folder / "store"


@pytest.fixture(scope="session")
def learned_run(tiny_model, prefect_api, tmp_path_factory) -> dict:
    """`learnable_config` with the default promotion gate, run once per session into a local
    store: tests/test_gate.py asserts on this run and goes on from a copy of its store;
    tests/test_default_search.py seeds its store from it (training, evaluation, merge cached)."""
    from flows.optimize import optimize

    folder = tmp_path_factory.mktemp("learned")
    data = folder / "tone.jsonl"
    data.write_text(one_label_rows(0, 80))
    raw = learnable_config(tiny_model, str(data), str(folder / "store"), folder / "out")
    raw["grove"].pop("promotion")  # the defaults
    (folder / "trained.json").write_text(json.dumps(raw))
    result = optimize(str(folder / "trained.json"))
    assert [s["status"] for s in result["stages"]] == ["ran"] * 7, result["stages"]
    return {"result": result, "raw": raw, "store": folder / "store"}


@pytest.fixture(scope="session")
def named_runs(tiny_model, prefect_api, tmp_path_factory):
    """One promoted run of `tiny` and one of `other` through `grove run`, in ./.grove-cache of a
    folder (the default store): (folder, {name: config path}). tests/test_cli_conventions.py lists,
    exports and predicts from them; tests/test_compare_runs.py lists and compares them."""
    from typer.testing import CliRunner

    from flows.cli import app

    folder = tmp_path_factory.mktemp("conventions")
    data = folder / "tone.jsonl"
    shutil.copyfile(TONE_DATA, data)
    configs = {}
    for name in ("tiny", "other"):
        raw = tiny_config(tiny_model, data, folder / ".grove-cache", folder / "out")
        raw["grove"]["name"] = name
        raw["grove"]["promotion"] = {"min_gain_over_base": 0}  # a tiny model scores 0 like its base
        configs[name] = folder / f"{name}.json"
        configs[name].write_text(json.dumps(raw))
        result = CliRunner().invoke(app, ["run", "-c", str(configs[name])])
        assert result.exit_code == 0, result.output
    return folder, configs


def seed_store(source: Path, root: Path) -> Path:
    """Copies a store's entries (manifests and blobs) into a local root; its run records and
    promoted models stay behind, so the new store has stored stages and no history."""
    for part in ("entries", "manifests", "blobs"):
        shutil.copytree(source / part, root / part)
    return root


@pytest.fixture
def tone_copy(tmp_path) -> Path:
    target = tmp_path / "tone.jsonl"
    shutil.copyfile(TONE_DATA, target)
    return target


@pytest.fixture
def folder(tmp_path) -> Path:
    """A small folder to store: a text file and a random binary one in a subfolder."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    return src


@pytest.fixture
def write_config(tmp_path):
    def write(raw: dict, name: str = "run.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(raw, indent=1))
        return path

    return write


@pytest.fixture
def terminal_80(monkeypatch):
    """The CLI's console as an 80-column terminal; what the commands print lands in the returned
    StringIO (tables as a user sees them at that width)."""
    import io

    from flows.cli.errors import console

    out = io.StringIO()
    monkeypatch.setattr(console, "_force_terminal", True)
    monkeypatch.setattr(console, "_width", 80)
    monkeypatch.setattr(console, "_file", out)
    return out
