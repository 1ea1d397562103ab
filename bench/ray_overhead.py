"""Overhead of worldgen's Ray executor (loop fused / unfused) against the local executor and diffusers.

Four sides run text-to-image on the "small" preset (64x64, 20 steps, guidance 7.5), same seed:
  diffusers   StableDiffusionPipeline built from the graph's own model objects (as in graph_overhead.py)
  local       g.run(..., executor="local")
  ray fused   g.run(..., executor="ray"): the denoising loop runs as one call on the UNet's model host actor
  ray unfused g.run(..., executor="ray", fuse_loops=False): one host call + Ray tasks per node per step
Torch threads: Ray starts workers with OMP_NUM_THREADS=1 unless the driver's environment sets it, so by default
(`--threads 1`) the script sets OMP_NUM_THREADS for every process: all sides then run the models on the same
number of threads (`--threads 0` leaves it untouched: driver = all cores, host actors = 1 thread).
Outputs are checked first (local vs diffusers <= 1e-4, Ray vs local <= 1e-5). Runs are interleaved (the order
rotates every round); medians are compared. Ray's own task and actor-call round trips are measured for scale.

    .venv/bin/python bench/ray_overhead.py [--repeats 5] [--steps 20] [--warmup 2] [--threads 1] [--json]
"""

from __future__ import annotations

import os
import sys


def _threads_arg() -> int:  # needed before torch is imported
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--threads"):
            return int(arg.split("=", 1)[1] if "=" in arg else sys.argv[i + 1])
    return 1


if _threads_arg() > 0:
    os.environ["OMP_NUM_THREADS"] = os.environ["WORLDGEN_TORCH_THREADS"] = str(_threads_arg())
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from graph_overhead import GUIDANCE, PRESET, PROMPT, SIZE, runners  # noqa: E402 - this folder
from graph_overhead import build as build_pair  # noqa: E402

TARGET = 1.5
TOL_DIFFUSERS, TOL_RAY = 1e-4, 1e-5
SIDES = ("diffusers", "local", "ray_fused", "ray_unfused")


def build(steps: int) -> dict[str, Any]:
    """The four runners; diffusers runs on the graph's own model objects (built as in graph_overhead.py)."""
    g, pipe = build_pair("ddim", steps)
    run_local, run_diffusers = runners(g, pipe, steps)
    inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "guidance_scale": GUIDANCE}
    return {
        "diffusers": run_diffusers,
        "local": run_local,
        "ray_fused": lambda: g.run(inputs, seed=0, executor="ray", fuse_loops=True)["image"],
        "ray_unfused": lambda: g.run(inputs, seed=0, executor="ray", fuse_loops=False)["image"],
    }


def timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@ray.remote
def _noop() -> None:
    return None


@ray.remote(num_cpus=0)
class _Echo:
    def ping(self) -> None:
        return None

    def torch_threads(self) -> int:
        return torch.get_num_threads()


def round_trips(calls: int = 200) -> tuple[float, float, int]:
    """Median ms of `ray.get(task.remote())` and of `ray.get(actor.method.remote())`; torch threads in an actor."""
    actor = _Echo.remote()
    result = []
    for fn in (_noop.remote, actor.ping.remote):
        times = []
        for i in range(calls + 20):
            start = time.perf_counter()
            ray.get(fn())
            if i >= 20:
                times.append(time.perf_counter() - start)
        result.append(statistics.median(times) * 1e3)
    threads = ray.get(actor.torch_threads.remote())
    ray.kill(actor)
    return result[0], result[1], threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process (0: untouched)"
    )
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout (the table to stderr)")
    args = parser.parse_args(argv)
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from actors.model_host import list_hosts, unload_hosts

    started = time.perf_counter()
    ray.init(num_cpus=2, logging_level="warning")
    # Explicit address: list_hosts() with none fails when another Ray instance runs on this machine.
    address = ray.get_runtime_context().gcs_address
    try:
        print(
            f"Ray executor vs local vs diffusers: preset '{PRESET}', {SIZE}x{SIZE}, {args.steps} steps, "
            f"guidance {GUIDANCE}; ray {ray.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs"
        )
        run = build(args.steps)
        out = {name: fn() for name, fn in run.items()}  # also the first (cold) Ray runs: hosts start and load
        diffs = {
            "local_vs_diffusers": (out["local"] - out["diffusers"]).abs().max().item(),
            "ray_fused_vs_local": (out["ray_fused"] - out["local"]).abs().max().item(),
            "ray_unfused_vs_local": (out["ray_unfused"] - out["local"]).abs().max().item(),
        }
        for name, d in diffs.items():
            tol = TOL_DIFFUSERS if name.endswith("diffusers") else TOL_RAY
            print(f"  max abs diff {name:22s} {d:.3g} (tolerance {tol:g})")
        if not all(d <= (TOL_DIFFUSERS if k.endswith("diffusers") else TOL_RAY) for k, d in diffs.items()):
            print("FAIL: the sides compute different images; timings would be meaningless")
            return 2
        hosts = list_hosts(address)
        print(f"  model hosts: {[(h['name'], h.get('loads'), h.get('calls')) for h in hosts]}")

        for _ in range(args.warmup):
            for fn in run.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in SIDES}
        for i in range(args.repeats):
            for name in SIDES[i % 4 :] + SIDES[: i % 4]:  # rotate the order every round
                times[name].append(timed(run[name]))
        task_ms, actor_ms, actor_threads = round_trips()

        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        per_step = {name: (med[name] - med["diffusers"]) / args.steps for name in SIDES}
        print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up runs each:")
        print(
            f"  {'side':12s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'/diffusers':>11s} {'overhead ms/step':>17s}"
        )
        for name in SIDES:
            t = times[name]
            print(
                f"  {name:12s} {med[name]:10.1f} {min(t) * 1e3:9.1f} {max(t) * 1e3:9.1f} "
                f"{med[name] / med['diffusers']:11.3f} {per_step[name]:+17.2f}"
            )
        print(f"  Ray round trip: task {task_ms:.2f} ms, actor call {actor_ms:.2f} ms (medians of 200)")
        print(
            f"  unfused per-step overhead {per_step['ray_unfused']:.2f} ms = {per_step['ray_unfused'] / task_ms:.1f} "
            f"task round trips = {per_step['ray_unfused'] / actor_ms:.1f} actor round trips "
            f"(vs fused: {(per_step['ray_unfused'] - per_step['ray_fused']) / actor_ms:.1f} actor round trips)"
        )
        print(
            f"  torch threads: driver {torch.get_num_threads()}, inside a Ray actor {actor_threads} "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} in the driver)"
        )
        if actor_threads != torch.get_num_threads():
            print("  WARNING: the driver and the host actors run torch on different numbers of threads")
        spread = max(max(t) / min(t) for t in times.values())
        if spread > 1.25:
            print(
                f"  WARNING: a side's slowest run took {spread:.1f}x its fastest (busy machine?); rerun with more --repeats"
            )
        ratio = med["ray_fused"] / med["diffusers"]
        print(f"  total runtime {time.perf_counter() - started:.0f} s")
        print(f"\nratio ray_fused/diffusers = {ratio:.3f} (target <= {TARGET})")
        if args.json:
            sys.stdout = real_stdout
            figures = {
                "preset": PRESET, "size": SIZE, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                "max_abs_diff": diffs, "median_ms": med, "overhead_ms_per_step": per_step,
                "ratio_to_diffusers": {n: med[n] / med["diffusers"] for n in SIDES},
                "times_ms": {n: [x * 1e3 for x in t] for n, t in times.items()},
                "task_round_trip_ms": task_ms, "actor_round_trip_ms": actor_ms,
                "torch_threads_driver": torch.get_num_threads(), "torch_threads_actor": actor_threads,
                "ratio": ratio, "target": TARGET,
            }  # fmt: skip
            print(json.dumps(figures, indent=2))
        return 0
    finally:
        try:
            unload_hosts([h["name"] for h in list_hosts(address)])
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
