"""Run callbacks: hooks per node call and per loop iteration (progress bars, logging, tracing)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from worldgen.plan import Loop


class RunCallback:
    """Override what you need; every hook is optional."""

    def on_node_end(self, node_id: str, iteration: int | None, outputs: dict[str, Any]) -> None: ...

    def on_loop_start(self, loop: Loop, iterations: int) -> None: ...

    def on_loop_iteration(self, loop: Loop, iteration: int, iterations: int) -> None: ...


class ProgressBar(RunCallback):
    """A tqdm bar per loop (e.g. the denoising steps) on stderr."""

    def __init__(self, desc: str = "steps"):
        self.desc = desc
        self._bar = None

    def on_loop_start(self, loop: Loop, iterations: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=iterations, desc=self.desc, file=sys.stderr, leave=False)

    def on_loop_iteration(self, loop: Loop, iteration: int, iterations: int) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if iteration + 1 == iterations:
                self._bar.close()
                self._bar = None


def with_progress(callbacks: Iterable[RunCallback], progress: bool, name: str) -> list[RunCallback]:
    """The run's callbacks, plus a progress bar named `name` when `progress` is asked for."""
    return [*callbacks, *([ProgressBar(name)] if progress else [])]
