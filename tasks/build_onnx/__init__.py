"""The build_onnx stage (and the quantization search) with its private helpers."""

# Imported on first use (PEP 562), not here: the processes this package starts (a benchmark
# worker, a data-parallel training process) import its helper modules and must not pay for
# the stage's imports (Prefect), which would also inflate the worker's measured memory.
__all__ = ["build_onnx", "search_quantization"]


def __getattr__(name: str):
    if name in __all__:
        from tasks.build_onnx import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
