"""The ONNX builder at run time: BuildSettings -> the builder's KEY=VALUE options, and Grove's
post-build quantizers (hqq: data-free; gptq: calibrated on training rows) that the builder
lacks. The rules that check a config's choices live in flows/config/build_rules.py."""

from __future__ import annotations

from pathlib import Path

from grove.settings import BuildSettings

POST_BUILD = ("hqq", "gptq")  # Grove's: an fp32 build quantized afterwards by onnxruntime
# GPTQ calibrates on this many training rows (prompt and answer), never on the eval split.
CALIBRATION_ROWS = 32


# ---- BuildSettings -> the builder ---------------------------------------------------------------
def builder_precision(build: BuildSettings) -> str:
    """hqq and gptq build fp32 and quantize afterwards."""
    return "fp32" if build.algo in POST_BUILD else build.precision


def builder_options(build: BuildSettings, trust_remote_code: bool) -> list[str]:
    """KEY=VALUE options for the builder's parse_extra_options."""
    options: dict[str, str] = {}
    if build.algo not in POST_BUILD and build.precision in ("int4", "int8"):
        options["block_size"] = str(build.block_size)
        if build.accuracy_level is not None:
            options["accuracy_level"] = str(build.accuracy_level)
        if not build.is_symmetric:
            options["is_symmetric"] = "false"
        if build.algo != "default":
            options["algo_config"] = build.algo
        if build.mixed_precision:
            options["matmul_mixed_precision"] = ",".join(f"{s}:{t}" for s, t in build.mixed_precision.items())
        if build.nodes_to_exclude:
            options["nodes_to_exclude"] = ",".join(build.nodes_to_exclude)
        if build.op_types_to_quantize:
            options["op_types_to_quantize"] = "/".join(build.op_types_to_quantize)
    if build.shared_embeddings is not None:
        options["shared_embeddings"] = str(build.shared_embeddings).lower()
    options.update(build.extra_options)
    options["hf_token"] = "false"  # never reach for a hub
    options["hf_remote"] = "true" if trust_remote_code else "false"
    return [f"{k}={v}" for k, v in options.items()]


def calibration_quantize(folder: Path, build: BuildSettings, calibration: list[list[int]] | None = None) -> None:
    """Quantizes the fp32 model in `folder` to int4 MatMulNBits with onnxruntime's
    MatMulNBitsQuantizer, in place: HQQ (data-free) or GPTQ (on the `calibration` token ids)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    path = folder / "model.onnx"
    model = onnx.load(str(path))  # with its external data
    ops = tuple(build.op_types_to_quantize or ["MatMul"])
    if build.algo == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=build.block_size, bits=4, op_types_to_quantize=ops)
        symmetric = False
    else:
        if not calibration:
            raise ValueError("gptq needs calibration rows (the training split is empty)")
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=_Calibration(model, folder, calibration))
        symmetric = build.is_symmetric
    quantizer = MatMulNBitsQuantizer(model, block_size=build.block_size, is_symmetric=symmetric,
                                     accuracy_level=build.accuracy_level, nodes_to_exclude=build.nodes_to_exclude,
                                     op_types_to_quantize=ops, algo_config=config)
    quantizer.process()
    for old in folder.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


class _Calibration:
    """onnxruntime's CalibrationDataReader over token ids: one sequence per sample, empty KV cache."""

    def __init__(self, model, folder: Path, sequences: list[list[int]]):
        import json

        self.sequences, self.index = sequences, 0
        head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        self.past = {i.name: (i.type.tensor_type.shape.dim[1].dim_value, head_size) for i in model.graph.input
                     if i.name.startswith("past_key_values")}

    def get_next(self):
        import numpy as np

        if self.index >= len(self.sequences):
            return None
        ids = np.array([self.sequences[self.index]], dtype=np.int64)
        self.index += 1
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for name, (heads, head_size) in self.past.items():
            feed[name] = np.zeros((1, heads, 0, head_size), dtype=np.float32)
        return feed

    def __iter__(self):
        self.index = 0
        while (feed := self.get_next()) is not None:
            yield feed

    def __deepcopy__(self, memo):  # the quantizer deep-copies its reader
        copy = _Calibration.__new__(_Calibration)
        copy.sequences, copy.index, copy.past = self.sequences, 0, self.past
        return copy
