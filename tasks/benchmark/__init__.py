"""The benchmark stage and the worker process that measures one engine."""
from tasks.benchmark.stage import benchmark

__all__ = ["benchmark"]
