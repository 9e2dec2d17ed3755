"""The benchmark stage and the worker process that measures one engine."""

# Imported on first use (PEP 562), not here: the processes this package starts (a benchmark
# worker, a data-parallel training process) import its helper modules and must not pay for
# the stage's imports (Prefect), which would also inflate the worker's measured memory.
__all__ = ["benchmark"]


def __getattr__(name: str):
    if name in __all__:
        from tasks.benchmark import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
