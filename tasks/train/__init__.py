"""The train stage (LoRA/QLoRA) and its private helpers: fit, CUDA setup, data-parallel job."""
from tasks.train.stage import train

__all__ = ["train"]
