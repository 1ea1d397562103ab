"""Orchestration cost of one world step on the Ray executor, in Ray task round trips (RT).

The default world (configs/worlds/default.yaml) with stages that do no model work: the text roles keep their
`llm/template` graphs (Jinja only), the Philosopher keeps `vlm/image_stats` (numpy on an 8x8 image), the
Creator is one light block, `image/solid` (bench/solid_image.py: 8x8, coloured by a prompt hash), in a graph named
`text_to_image` (block 2's pipeline). Two copies, executor `ray` and `local`, step in turns after the warm-up
(every step after the first runs all six stages and saves an episode); medians are compared with Ray's own
`ray.get(f.remote())` round trip, sampled between the timed steps. "storage" = time inside WorldStorage's methods,
"rest" = step - storage, per step. One Ray step is counted (tasks submitted; ray.put/get/wait calls by the
driver) and, with `--profile`, profiled. The report is written on demand, not per step.

    .venv/bin/python bench/world_step.py [--repeats 10] [--warmup 2] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import solid_image  # noqa: F401  (registers image/solid)
from ray.actor import ActorMethod
from ray.remote_function import RemoteFunction

from actors import ray_executor as wg_ray
from worldgen.config import load_config_file
from worldgen.storage import WorldStorage
from worldgen.world import World

TARGET = 10.0
SIDES = ("ray", "local")
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "worlds" / "default.yaml"
STORAGE = [(WorldStorage, m) for m in ("save_config", "save_content", "save_progress", "save_artifacts",
           "artifact_path", "discard_artifacts", "save_episode", "write_report")]  # fmt: skip
RAY_CALLS = [(wg_ray._Run, "submit_block"), (RemoteFunction, "_remote"), (ActorMethod, "_remote"), (ray, "put"),
             (ray, "get"), (ray, "wait")]  # fmt: skip


def world_config(executor: str) -> dict[str, Any]:
    config = load_config_file(DEFAULT)
    config["executor"] = executor
    config["generation_defaults"] = {"width": 8, "height": 8, "steps": 1, "guidance": 1.0}
    config["stages"]["creator"] = {
        "name": "text_to_image",
        "nodes": {"n": {"type": "image/solid"}},
        "inputs": {"prompt": "n.prompt"},
        "outputs": {"image": "n.image"},
    }
    return config


class Counter:
    """While active, counts calls of (owner, attribute) pairs and sums the time in the outermost ones."""

    def __init__(self, targets: list[tuple[Any, str]]):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
        self.counts: dict[str, int] = {}
        self.seconds, self.depth = 0.0, 0

    def __enter__(self) -> Counter:
        for owner, name, fn in self.saved:
            setattr(owner, name, self.wrap(name, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)

    def wrap(self, name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            self.depth, start = self.depth + 1, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds += time.perf_counter() - start if self.depth == 0 else 0.0

        return wrapper


@ray.remote
def _noop() -> None:
    return None


def task_round_trips(calls: int, warmup: int = 0, busy_before: float = 0.0) -> list[float]:
    """Seconds of `calls` `ray.get(f.remote())` round trips (after `warmup` untimed ones), back to back or
    each after `busy_before` seconds of driver work (as a world step's tasks are)."""
    times = []
    for i in range(calls + warmup):
        until = time.perf_counter() + busy_before
        while time.perf_counter() < until:
            pass
        start = time.perf_counter()
        ray.get(_noop.remote())
        times += [time.perf_counter() - start] if i >= warmup else []
    return times


def timed_step(world: World) -> float:
    start = time.perf_counter()
    report = world.step()
    elapsed = time.perf_counter() - start
    assert len(report.ran) == 6 and report.episode is not None, f"not a full step: {report.ran}"
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per world first (at least 2)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more Ray step (driver side)")
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout (the table to stderr)")
    args = parser.parse_args(argv)
    real_stdout, started, warmup = sys.stdout, time.perf_counter(), max(args.warmup, 2)
    if args.json:
        sys.stdout = sys.stderr
    tmp = Path(tempfile.mkdtemp(prefix="world_step_"))
    try:
        ray.init(num_cpus=2, logging_level="warning", include_dashboard=False)
        print(f"World step with no model work (default world, image/solid creator): ray {ray.__version__}")
        worlds = {side: World.from_config(world_config(side), tmp / side) for side in SIDES}
        for _ in range(warmup):
            for world in worlds.values():
                world.step()
        with Counter(RAY_CALLS) as calls:
            timed_step(worlds["ray"])
        timed_step(worlds["local"])  # both worlds stay at the same step (same history size)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        stored: dict[str, list[float]] = {side: [] for side in SIDES}
        round_trips, after_work = task_round_trips(20, warmup=20), []
        for i in range(args.repeats):
            for side in SIDES[i % 2 :] + SIDES[: i % 2]:
                with Counter(STORAGE) as storage:
                    times[side].append(timed_step(worlds[side]))
                stored[side].append(storage.seconds)
            # the yardstick is sampled between the steps, so both see the same machine (this one is noisy)
            round_trips += task_round_trips(20)
            after_work += task_round_trips(3, busy_before=0.005)
        rt = statistics.median(round_trips) * 1e3

        def med(values: Any) -> float:
            return statistics.median(values) * 1e3

        step = {k: med(times[k]) for k in SIDES}
        store = {k: med(stored[k]) for k in SIDES}
        rest = {k: med([a - b for a, b in zip(times[k], stored[k], strict=True)]) for k in SIDES}
        tasks, blocks = calls.counts.get("_remote", 0), calls.counts.get("submit_block", 0)
        print(f"\n{args.repeats} interleaved steps per world after {warmup} warm-up steps each (ms; in RT):")
        print(f"  {'executor':9s} {'step':>8s} {'min':>7s} {'max':>7s} {'RT':>6s} {'storage':>8s} {'RT':>6s} "
              f"{'rest':>7s} {'RT':>6s}")  # fmt: skip
        for k, t in times.items():
            print(f"  {k:9s} {step[k]:8.2f} {min(t) * 1e3:7.2f} {max(t) * 1e3:7.2f} {step[k] / rt:6.1f} "
                  f"{store[k]:8.2f} {store[k] / rt:6.1f} {rest[k]:7.2f} {rest[k] / rt:6.1f}")  # fmt: skip
        extra = rest["ray"] - rest["local"]
        print(f"  Ray overhead (rest: ray - local) {extra:.2f} ms = {extra / rt:.1f} RT = "
              f"{extra / rt / max(tasks, 1):.1f} RT per task")  # fmt: skip
        print(f"  Ray task round trip (RT) {rt:.3f} ms (median of {len(round_trips)} back-to-back "
              "ray.get(f.remote()), 20 after each pair of steps)")  # fmt: skip
        print(
            f"  (a round trip after 5 ms of driver work, as in a step: {med(after_work):.3f} ms; not the yardstick)"
        )
        print(f"  one Ray step calls {blocks} blocks: {tasks} as Ray tasks or actor calls, the rest inline "
              "(llm/template); driver calls: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(calls.counts.items()))}")  # fmt: skip
        spread = max(max(t) / min(t) for t in times.values())
        if spread > 1.5:
            print(f"  WARNING: a side's slowest step took {spread:.1f}x its fastest (busy machine?)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(timed_step, worlds["ray"])
            print("\ncProfile of one Ray step (driver), top 15 by own time:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)
        ratio = step["ray"] / rt
        print(f"  total runtime {time.perf_counter() - started:.0f} s")
        print(f"\nround trips per step = {ratio:.1f} (target <= {TARGET:g})")
        if args.json:
            sys.stdout = real_stdout
            figures = {
                "repeats": args.repeats, "warmup": warmup, "step_ms": step, "storage_ms": store,
                "rest_ms": rest,
                "times_ms": {k: [x * 1e3 for x in t] for k, t in times.items()}, "task_round_trip_ms": rt,
                "tasks_per_step": tasks, "driver_calls": calls.counts, "ratio": ratio, "target": TARGET,
            }  # fmt: skip
            print(json.dumps(figures, indent=2))
        return 0
    finally:
        try:
            ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
