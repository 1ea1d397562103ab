"""Run options and callbacks: hooks per node call and per loop iteration (progress bars, logging, tracing)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class RunOptions:
    """How one run goes, whatever executes it: `Engine.run` builds it, an executor reads what applies to it.

    seed        seeds every random draw (same seed, same result on any executor)
    iterations  overrides every loop's count (else a block in the loop, a solver, says)
    callbacks   hooks per node call and loop iteration
    progress    a progress bar per loop
    fuse_loops  an executor that can (Ray) runs a loop whose models share one host as a single call there
    """

    seed: int | None = None
    iterations: int | None = None
    callbacks: tuple[RunCallback, ...] = ()
    progress: bool = False
    fuse_loops: bool = True

    def run_callbacks(self, name: str) -> list[RunCallback]:
        """The run's callbacks, plus a progress bar named `name` when `progress` is asked for."""
        return [*self.callbacks, *([ProgressBar(name)] if self.progress else [])]

    def nested(self, callbacks: Iterable[RunCallback]) -> RunOptions:
        """The options of a run inside this one (a graph in a pipeline): the same draws and loop counts, the
        outer run's callbacks (its progress bars included), no bar of its own."""
        return replace(self, callbacks=tuple(callbacks), progress=False)
