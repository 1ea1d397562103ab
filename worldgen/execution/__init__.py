"""Executors: `local` (reference semantics, in-process); the Ray executor arrives with the Ray runtime."""

from worldgen.execution.callbacks import ProgressBar, RunCallback
from worldgen.execution.local import run_local

__all__ = ["ProgressBar", "RunCallback", "run_local"]
