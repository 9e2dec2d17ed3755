"""A user's mistake ends `grove` with one line naming the culprit (key path or file:line), exit
code 2 and no traceback, before any compute; `grove run` leaves the artifact store untouched.

Each case runs the real command as a subprocess (as a user would) on the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config

LINES = (ROOT / "configs" / "data" / "tone.jsonl").read_text().splitlines()


def lora(raw):
    return raw["passes"]["lora"]["config"]


def data_params(raw):
    return raw["data_configs"][0]["load_dataset_config"]["params"]


def write_data(raw, path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    data_params(raw)["data_files"] = str(path)
    return path


# ---- the cases: each edits the good config (and may write files), returns what stderr must name ----
def new_tokens_beyond_the_model_context(raw, tmp):
    """onnxruntime-genai refuses max_length above the context: build_onnx failed after training."""
    raw["grove"]["evaluate"]["max_new_tokens"] = 4096  # the tiny model's context is 512
    return "grove.evaluate.max_new_tokens: 4096 new tokens do not fit the model's context of 512 tokens"


def infinite_tolerance(raw, tmp):
    """JSON's Infinity read as a number: a search whose every candidate is within tolerance."""
    raw["grove"]["quantization_search"] = {**raw["grove"].get("quantization_search", {}), "max_kl": float("inf")}
    return "grove.quantization_search.max_kl: input should be a finite number"


def negative_learning_rate(raw, tmp):
    lora(raw)["training_args"]["learning_rate"] = -1e-4
    return "passes.lora.config.training_args.learning_rate"


def learning_rate_no_fine_tuning_uses(raw, tmp):
    lora(raw)["training_args"]["learning_rate"] = 5
    return "passes.lora.config.training_args.learning_rate: 5 is not a fine-tuning learning rate"


def batch_size_zero(raw, tmp):
    lora(raw)["training_args"]["per_device_train_batch_size"] = 0
    return "passes.lora.config.training_args.per_device_train_batch_size"


def target_module_not_in_model(raw, tmp):
    lora(raw)["target_modules"] = ["q_proj", "qkv_proj"]  # Phi-3's name; the tiny model is a Llama
    return "passes.lora.config.target_modules[1]: 'qkv_proj' is not a module"


def typo_of_a_sibling_pass_key(raw, tmp):
    """A key real in no pass type is a typo (Olive would ignore it): an error naming the closest key
    of any pass type of the family, here QLoRA's, which a LoRA pass would warn about and ignore."""
    lora(raw)["double_quantt"] = True
    return "passes.lora.config.double_quantt: unknown key (did you mean 'double_quant'?)"


def typo_in_a_model_builder_pass(raw, tmp):
    raw["passes"]["builder"]["config"]["int4_blok_size"] = 64
    return "passes.builder.config.int4_blok_size: unknown key (did you mean 'int4_block_size'?)"


def corrupt_json_line(raw, tmp):
    lines = list(LINES)
    lines[41] = lines[41][: len(lines[41]) // 2]  # line 42 cut in half
    path = write_data(raw, tmp / "cut.jsonl", "\n".join(lines) + "\n")
    return f"{path}:42: not valid JSON"


def binary_data_file(raw, tmp):
    path = write_data(raw, tmp / "model.jsonl", bytes(range(256)) * 64)
    return f"{path}:1:"


def one_row_dataset(raw, tmp):
    path = write_data(raw, tmp / "one.jsonl", "\n".join([LINES[0]] * 3) + "\n")
    return f"{path}: 1 distinct row"


def row_without_a_template_column(raw, tmp):
    lines = list(LINES)
    lines[9] = json.dumps({"phrase": "no label here"})
    path = write_data(raw, tmp / "nolabel.jsonl", "\n".join(lines) + "\n")
    return f"{path}:10: no value for column 'tone'"


def answer_stored_as_a_json_object(raw, tmp):
    """It was rendered as Python's repr ({'tone': 'joy'}): the model learned Python's quotes, not JSON."""
    lines = list(LINES)
    lines[4] = json.dumps({"phrase": json.loads(lines[4])["phrase"], "tone": {"tone": "joy", "score": 1}})
    path = write_data(raw, tmp / "object.jsonl", "\n".join(lines) + "\n")
    return f"{path}:5: column 'tone' holds a JSON object, which the template writes as Python shows it"


def csv_row_with_missing_field(raw, tmp):
    path = tmp / "tone.csv"
    path.write_text("phrase,tone\nI froze on the trail,fear\nwe won the prize\nso tired today,sadness\n")
    data_params(raw).update(data_name="csv", data_files=str(path))
    return f"{path}:3: 1 fields, the header has 2"


def duplicate_data_config_names(raw, tmp):
    raw["data_configs"].append(json.loads(json.dumps(raw["data_configs"][0])))
    return "data_configs[1].name: 'tone' is already the name of data_configs[0]"


def output_dir_is_a_file(raw, tmp):
    (tmp / "taken").write_text("a file")
    raw["engine"]["output_dir"] = str(tmp / "taken")
    return "engine.output_dir"


def unwritable_cache_dir(raw, tmp):
    """As root, permissions deny nothing: a folder under a file can never be made, root or not."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        raw["engine"]["cache_dir"] = str(locked / "store")
        return "engine.cache_dir: cannot make folder"
    (tmp / "plain-file").write_text("x")
    raw["engine"]["cache_dir"] = str(tmp / "plain-file" / "store")
    return "engine.cache_dir: cannot make folder"


def unknown_execution_provider(raw, tmp):
    raw["systems"]["local_system"]["accelerators"][0]["execution_providers"] = ["CUDAExecutionProvder"]
    return "systems.local_system.accelerators[0].execution_providers[0]: unknown execution provider"


def cuda_build_without_cuda_runtimes(raw, tmp):
    from flows.config.checks import cuda_onnx_problem

    if cuda_onnx_problem() is None:
        pytest.skip("this machine has the CUDA builds of onnxruntime and onnxruntime-genai")
    raw["systems"]["local_system"]["accelerators"][0].update(device="gpu", execution_providers=["CUDAExecutionProvider"])
    return "pip install onnxruntime-gpu=="


def gpu_device_without_cuda_runtimes(raw, tmp):
    """Olive builds a gpu accelerator that names no execution provider for CUDA: so does Grove."""
    from flows.config.checks import cuda_onnx_problem

    if cuda_onnx_problem() is None:
        pytest.skip("this machine has the CUDA builds of onnxruntime and onnxruntime-genai")
    raw["systems"]["local_system"]["accelerators"][0] = {"device": "gpu"}
    return "systems.local_system.accelerators[0].device: CUDAExecutionProvider builds need"


def accelerator_device_grove_cannot_build_for(raw, tmp):
    raw["systems"]["local_system"]["accelerators"][0]["device"] = "npu"
    return "systems.local_system.accelerators[0].device: 'npu': Grove builds for CPU or CUDA"


def empty_data_file(raw, tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    data_params(raw)["data_files"] = str(empty)
    return "text_cols: " + str(empty) + " holds no records"


def empty_target_modules(raw, tmp):
    lora(raw)["target_modules"] = []
    return "passes.lora.config.target_modules: is empty: it would train no module"


def accelerator_naming_nothing(raw, tmp):
    raw["systems"]["local_system"]["accelerators"][0] = {}
    return "systems.local_system.accelerators[0]: names neither a device nor execution_providers"


def cuda_device_without_cuda_torch(raw, tmp):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine trains on CUDA")  # the test process has torch already (tiny_model)
    raw["grove"]["device"] = "cuda"
    return "grove.device: cuda, but torch"


def missing_config_file(raw, tmp):
    return "config file not found"


def config_is_a_folder(raw, tmp):
    (tmp / "run.json").mkdir()
    return "run.json is a folder; --config takes a run config file"


def config_not_utf8(raw, tmp):
    raw = {"$comment": "caf\xe9", **raw}  # written in Latin-1 below: 0xe9 on line 2
    (tmp / "run.json").write_bytes(json.dumps(raw, indent=1, ensure_ascii=False).encode("latin-1"))
    return "run.json:2: not UTF-8 text (byte 0xe9)"


CASES = [
    # (case, command): `run` where the run-start path matters (the store must stay as it was)
    (negative_learning_rate, "validate"),
    (learning_rate_no_fine_tuning_uses, "validate"),
    (batch_size_zero, "run"),
    (target_module_not_in_model, "validate"),
    (typo_of_a_sibling_pass_key, "validate"),
    (typo_in_a_model_builder_pass, "validate"),
    (corrupt_json_line, "run"),
    (binary_data_file, "validate"),
    (one_row_dataset, "validate"),
    (row_without_a_template_column, "validate"),
    (answer_stored_as_a_json_object, "validate"),
    (csv_row_with_missing_field, "validate"),
    (duplicate_data_config_names, "validate"),
    (output_dir_is_a_file, "run"),
    (unwritable_cache_dir, "validate"),
    (unknown_execution_provider, "validate"),
    (cuda_build_without_cuda_runtimes, "run"),
    (gpu_device_without_cuda_runtimes, "validate"),
    (accelerator_device_grove_cannot_build_for, "validate"),
    (accelerator_naming_nothing, "validate"),
    (empty_target_modules, "validate"),
    (empty_data_file, "validate"),
    (cuda_device_without_cuda_torch, "validate"),
    (missing_config_file, "validate"),
    (config_is_a_folder, "validate"),
    (config_not_utf8, "validate"),
    (new_tokens_beyond_the_model_context, "validate"),
    (infinite_tolerance, "validate"),
]


def grove(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def populated_store(root: Path) -> None:
    """A store with an entry in it, written through the store itself."""
    from grove.store import ArtifactStore

    source = root.parent / "entry-src"
    source.mkdir()
    (source / "train.jsonl").write_text(LINES[0] + "\n")
    ArtifactStore(str(root)).put_dir("load_data", "0" * 64, source, {"note": "earlier run"})


@pytest.mark.parametrize("case, command", CASES, ids=[case.__name__ for case, _ in CASES])
def test_a_bad_input_is_one_line_naming_the_culprit_exit_2(case, command, tiny_model, tone_copy, tmp_path):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    culprit = case(raw, tmp_path)
    config = tmp_path / "run.json"
    if case is not missing_config_file and not config.exists():  # some cases write it themselves
        config.write_text(json.dumps(raw, indent=1))
    store = Path(raw["engine"]["cache_dir"])
    if command == "run":
        populated_store(store)
        before = snapshot(store)
    done = grove(command, "--config", str(config), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and culprit in errors[0], output
    assert "Traceback" not in output
    if command == "run":
        assert snapshot(store) == before, "the artifact store changed"
        assert not (tmp_path / "out").exists()


def test_keys_written_into_a_store_or_data_url_are_never_printed(tiny_model, tone_copy, tmp_path):
    """s3://KEY:SECRET@bucket as the store was echoed whole in s3fs's "Invalid bucket name" error
    (and would be in every run record); a data URL's password or signed query in its listing error."""
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"]["artifact_root"] = "s3://AKIAEXAMPLE:store-secret-1@grove-tests/runs"
    (tmp_path / "root.json").write_text(json.dumps(raw))
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    data_params(raw)["data_files"] = "http://user:data-secret-2@127.0.0.1:1/tone.jsonl?X-Amz-Signature=sig-secret-3"
    (tmp_path / "data.json").write_text(json.dumps(raw))
    said = {name: grove("validate", "--config", str(tmp_path / f"{name}.json"), cwd=tmp_path)
            for name in ("root", "data")}
    assert [done.returncode for done in said.values()] == [2, 2]
    assert said["root"].stderr.startswith("error: ") and "grove.artifact_root: holds keys in the URL" in said["root"].stderr
    assert "data_files: " in said["data"].stderr and "127.0.0.1:1/tone.jsonl" in said["data"].stderr
    # the store commands' --store, as the config's root
    said["runs"] = grove("runs", "--store", "s3://AKIAEXAMPLE:store-secret-1@grove-tests/runs", cwd=tmp_path)
    assert said["runs"].returncode == 2 and "--store: holds keys in the URL" in said["runs"].stderr, said["runs"]
    printed = "".join(done.stdout + done.stderr for done in said.values())
    assert not any(secret in printed for secret in ("store-secret-1", "data-secret-2", "sig-secret-3")), printed


def test_debug_shows_the_traceback_of_the_same_mistake(tiny_model, tone_copy, tmp_path):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    culprit = negative_learning_rate(raw, tmp_path)
    (tmp_path / "run.json").write_text(json.dumps(raw))
    done = grove("--debug", "validate", "--config", str(tmp_path / "run.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and culprit in done.stderr.splitlines()[-1]


def test_remote_data_read_by_load_data_fails_the_same_way(tiny_model, tmp_path):
    """Remote data is not read at run start (only hashed); load_data reads it first thing and
    names the URL and line the same way. A file:// URL goes through the same fsspec path as s3://."""
    lines = list(LINES)
    lines[6] = '{"phrase": "cut short", "tone'
    data = tmp_path / "remote.jsonl"
    data.write_text("\n".join(lines) + "\n")
    raw = tiny_config(tiny_model, data, tmp_path / "store", tmp_path / "out")
    data_params(raw)["data_files"] = f"file://{data}"
    (tmp_path / "run.json").write_text(json.dumps(raw))
    done = grove("run", "--config", str(tmp_path / "run.json"), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"error: file://{data}:7: not valid JSON" in done.stderr, output
    assert "Traceback" not in output
    assert not list((tmp_path / "store").glob("entries/load_data/*/MANIFEST.json"))
