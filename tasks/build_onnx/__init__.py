"""The build_onnx stage (and the quantization search) with its private helpers."""
from tasks.build_onnx.stage import build_onnx, search_quantization

__all__ = ["build_onnx", "search_quantization"]
