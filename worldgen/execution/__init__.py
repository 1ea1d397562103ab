"""The `local` executor (reference semantics, in-process) and run callbacks; the Ray executor lives in the
Ray layer (actors/ray_executor.py). Executors are found by name through worldgen.registry."""

from worldgen.callbacks import ProgressBar, RunCallback, RunOptions
from worldgen.execution.local import run_local

__all__ = ["ProgressBar", "RunCallback", "RunOptions", "run_local"]
