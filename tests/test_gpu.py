"""The CUDA path, on a GPU: QLoRA with bitsandbytes, a cuda ONNX build, the benchmark on the GPU.

Marked `gpu` and deselected unless asked for (`pytest -m gpu`, see conftest.py): CI has no
GPU. Asked for on a machine without CUDA they fail, never pass silently. They need the CUDA
builds of the runtimes (onnxruntime-gpu, onnxruntime-genai-cuda) and bitsandbytes.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from flows.cli import app

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda")


def test_qlora_loads_nf4_double_quant_with_bf16_compute_and_trains_on_the_gpu(tiny_model):
    import torch

    from grove.settings import ModelSettings, TrainSettings
    from tasks.train.fit import add_lora, load_base_for_training, quantization_of

    settings = TrainSettings(method="qlora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = ModelSettings(name=str(tiny_model), path=str(tiny_model), content_sha256="x")
    torch.manual_seed(0)
    peft_model = add_lora(load_base_for_training(model, settings, "cuda"), settings)
    # every linear layer of the 2 decoder layers is 4-bit (7 each); LoRA sits on q_proj and v_proj
    assert quantization_of(peft_model) == {"layers_4bit": 14, "quant_type": "nf4", "double_quant": True,
                                           "compute_dtype": "bfloat16", "device": "cuda"}
    ids = torch.randint(5, 300, (4, 24), device="cuda")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora and all(p.device.type == "cuda" and torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora)


def test_grove_training_setup_on_cuda_liger_kernels_and_packing_keep_the_plain_loss(tiny_model):
    """grove.train on CUDA: Liger kernels applied, packed rows; the loss is the plain padded one."""
    import torch

    from grove.models import load_causal_lm
    from grove.settings import TrainSettings
    from tasks.train.fit import _Collator, apply_gpu_setup
    from tasks.train.cuda_setup import PackingCollator

    generator = torch.Generator().manual_seed(0)
    batch = []
    for n in (7, 19, 4, 12, 30, 9):
        ids = torch.randint(5, 300, (n,), generator=generator).tolist()
        batch.append({"input_ids": ids, "labels": list(ids)})
    plain = load_causal_lm(tiny_model, "cuda").train()
    padded = {k: v.cuda() for k, v in _Collator(0)(batch).items()}
    grove = load_causal_lm(tiny_model, "cuda").train()
    setup = apply_gpu_setup(grove, TrainSettings(method="lora"), "cuda")
    assert setup == {"kernels": "liger", "packing": True, "compile": False, "fp32_upcast": False}
    assert type(grove.model.norm).forward is not grove.model.norm.forward.__func__, "RMSNorm not patched"
    packed = {k: v.cuda() for k, v in PackingCollator(0, 32)(batch).items()}
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss_plain = plain(**padded).loss
    loss_grove = grove(**packed).loss
    loss_grove.backward()  # Liger's fused linear cross-entropy computes the gradients in its forward
    assert torch.isfinite(loss_grove) and abs(loss_plain.item() - loss_grove.item()) < 2e-2 * loss_plain.item(), \
        (loss_plain.item(), loss_grove.item())


def test_a_cuda_build_runs_in_onnxruntime_genai_cuda(tiny_model, tmp_path):
    import onnxruntime_genai as og

    from tasks.build_onnx.builder import run_builder
    from grove.engines import OnnxEngine, onnx_providers
    from grove.settings import BuildSettings

    assert getattr(og, "__id__", "") == "onnxruntime-genai-cuda", "the CPU build of onnxruntime-genai is installed"
    run_builder(tiny_model, tmp_path / "model", BuildSettings(execution_provider="cuda"), False)
    assert onnx_providers(tmp_path / "model") == ["cuda"]
    engine = OnnxEngine(tmp_path / "model", set())
    assert engine.device_type == "cuda"
    assert len(engine.generate_timed([1, 20, 30, 40], 6).tokens) == 6


def test_the_flow_on_cuda_qlora_then_a_cuda_onnx_model_benchmarked_on_the_gpu(tiny_model, tone_copy, tmp_path,
                                                                              write_config):
    """The same flow and config as on a CPU; device auto picks the GPU, CUDA EP targets it."""
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out", rows=120)
    lora = raw["passes"].pop("lora")
    raw["passes"] = {"qlora": {**lora, "type": "QLoRA"}, **raw["passes"]}
    raw["passes"]["qlora"]["config"].update(double_quant=True, quant_type="nf4", target_modules=None)
    raw["passes"]["qlora"]["config"]["training_args"].update(max_steps=24, learning_rate=5e-3)
    raw["systems"]["local_system"]["accelerators"] = [{"device": "gpu",
                                                       "execution_providers": ["CUDAExecutionProvider"]}]
    assert raw["grove"].get("device", "auto") == "auto"
    result = CliRunner().invoke(app, ["run", "--config", str(write_config(raw))], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    summary = {s["stage"]: s["summary"] for s in report["stages"]}
    assert all(s["status"] == "ran" for s in report["stages"])

    train = summary["train"]
    assert train["device"] == "cuda" and train["method"] == "qlora" and train["steps"] == 24
    assert train["quantization"]["quant_type"] == "nf4" and train["quantization"]["double_quant"]
    assert train["quantization"]["compute_dtype"] == "bfloat16" and train["peak_gpu_mb"] > 0
    assert train["setup"] == {"kernels": "liger", "packing": True, "compile": False, "fp32_upcast": False}
    losses = [row["loss"] for row in train_log(tmp_path / "store")]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    adapter = adapter_tensors(tmp_path / "store")
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n), "the adapter did not train"

    tuned = summary["evaluate"]["fine_tuned"]
    assert tuned["eval_loss"] is not None and math.isfinite(tuned["eval_loss"])
    assert tuned["eval_loss"] < summary["evaluate"]["base"]["eval_loss"]

    onnx = summary["build_onnx"]
    assert onnx["execution_provider"] == "cuda" and onnx["device_type"] == "cuda"
    assert onnx["accuracy"] is not None and len(onnx["sample"]) > 0
    genai = json.loads((tmp_path / "out" / "tiny" / "model" / "genai_config.json").read_text())
    providers = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert any("cuda" in entry for entry in providers), providers
    cuda_options = next(entry["cuda"] for entry in providers if "cuda" in entry)
    assert cuda_options.get("enable_cuda_graph") == "1", cuda_options  # grove.build.cuda_graph default
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "tiny" / "model" / "model.onnx"), load_external_data=False).graph
    blocks = {attr.i for node in graph.node if node.op_type == "MatMulNBits"
              for attr in node.attribute if attr.name == "block_size"}
    assert blocks == {128}, blocks  # grove.build.cuda_block_size default (the tiny model: hidden 128)

    bench = summary["benchmark"]
    assert bench["device"] == "cuda"
    assert bench["pytorch"]["device"] == "cuda" and bench["pytorch"]["dtype"] == "bfloat16"
    assert bench["onnx"]["device"] == "cuda"
    assert bench["pytorch"]["decode_tokens_per_s"] > 0 and bench["onnx"]["decode_tokens_per_s"] > 0
    from tasks.benchmark.stage import peak_bandwidth

    if peak_bandwidth(bench["onnx"].get("gpu")):  # a GPU in the bandwidth table (the H200 is)
        for engine in ("pytorch", "onnx"):
            bound = bench[engine]["bandwidth"]
            assert bound["weight_bytes_per_token"] > 0 and 0 < bound["fraction"] < 1, bound

    from grove.engines import OnnxEngine

    engine = OnnxEngine(tmp_path / "out" / "tiny" / "model", set())
    assert engine.device_type == "cuda" and len(engine.generate_timed([1, 20, 30], 5).tokens) == 5


def _train_entry(store):
    from grove.store import ArtifactStore

    artifacts = ArtifactStore(str(store))
    entries = artifacts.entries("train")
    assert len(entries) == 1, entries
    return artifacts.materialize(entries[0])


def train_log(store) -> list[dict]:
    return [row for row in json.loads((_train_entry(store) / "train_log.json").read_text()) if "loss" in row]


def adapter_tensors(store) -> dict:
    from safetensors.torch import load_file

    return load_file(str(_train_entry(store) / "adapter" / "adapter_model.safetensors"))
