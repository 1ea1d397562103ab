"""Overhead of worldgen's Flux graphs against FluxPipeline on the same model objects (preset `flux-small`).

Three sides run Flux text-to-image (64x64, 4 steps: schnell's default) with the same seed, interleaved:
  diffusers   FluxPipeline built from the graph's own model objects
  local       g.run(..., executor="local")
  ray fused   g.run(..., executor="ray"): the denoising loop as one call on the transformer's model host
Outputs are checked first (local vs diffusers <= 1e-4, Ray vs local <= 1e-5); medians are compared.
Like ray_overhead.py, every process runs torch on `--threads` threads (default 1), so the sides compare
executors, not thread counts. `build` and `runners` are what graph_overhead.py's `--family flux` calls.

    .venv/bin/python bench/flux_overhead.py [--repeats 7] [--steps 4] [--warmup 2] [--threads 1] [--no-ray]
"""

from __future__ import annotations

import os
import sys


def _threads_arg() -> int:  # needed before torch is imported
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--threads"):
            return int(arg.split("=", 1)[1] if "=" in arg else sys.argv[i + 1])
    return 1


if __name__ == "__main__" and _threads_arg() > 0:
    os.environ["OMP_NUM_THREADS"] = os.environ["WORLDGEN_TORCH_THREADS"] = str(_threads_arg())
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

PRESET = "flux-small"
SIZE = 64
PROMPT = "a photo of an old harbor at dawn"
TOL_DIFFUSERS, TOL_RAY = 1e-4, 1e-5
TARGETS = {"local": 1.05, "ray_fused": 1.10}


def build(steps: int, preset: str = PRESET) -> tuple[Any, Any]:
    """The text_to_image graph and a FluxPipeline holding the very model objects the graph's nodes hold."""
    from diffusers import FluxPipeline

    import worldgen as wg

    g = wg.Graph.from_template("text_to_image", preset=preset, steps=steps)
    template = g.block("schedule").scheduler
    pipe = FluxPipeline(
        scheduler=type(template).from_config(template.config),
        vae=g.block("vae").model,
        text_encoder=g.block("te").model,
        tokenizer=g.block("tok").model,
        text_encoder_2=g.block("te_2").model,
        tokenizer_2=g.block("tok_2").model,
        transformer=g.block("flux").model,
    )
    pipe.set_progress_bar_config(disable=True)
    return g, pipe


def runners(g: Any, pipe: Any, steps: int) -> tuple[Any, Any]:
    """(worldgen local run, diffusers run), each returning the image tensor."""
    inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE}
    tokens = g.block("tok_2").config.max_length

    def run_worldgen() -> torch.Tensor:
        return g.run(inputs, seed=0)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=g.exposed_inputs["guidance_scale"].default,
            max_sequence_length=tokens,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        ).images

    return run_worldgen, run_diffusers


def timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process (0: untouched)"
    )
    parser.add_argument("--no-ray", action="store_true", help="compare the local executor only")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    g, pipe = build(args.steps)
    run_local, run_diffusers = runners(g, pipe, args.steps)
    sides: dict[str, Any] = {"diffusers": run_diffusers, "local": run_local}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, logging_level="warning")
        inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE}
        sides["ray_fused"] = lambda: g.run(inputs, seed=0, executor="ray")["image"]
    try:
        images = {name: fn() for name, fn in sides.items()}
        local_diff = (images["local"] - images["diffusers"]).abs().max().item()
        print(f"Flux {PRESET}, {SIZE}x{SIZE}, {args.steps} steps, torch threads {torch.get_num_threads()}")
        print(f"max abs diff local vs diffusers {local_diff:.3g} (<= {TOL_DIFFUSERS:g})")
        if local_diff > TOL_DIFFUSERS:
            return 2
        if "ray_fused" in images:
            ray_diff = (images["ray_fused"] - images["local"]).abs().max().item()
            print(f"max abs diff ray fused vs local {ray_diff:.3g} (<= {TOL_RAY:g})")
            if ray_diff > TOL_RAY:
                return 2
        for _ in range(args.warmup):
            for fn in sides.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for i in range(args.repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order every round
                times[name].append(timed(sides[name]))
        base = statistics.median(times["diffusers"])
        print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up runs:")
        print(f"  {'side':12s} {'median ms':>10s} {'min ms':>9s} {'+ms vs diffusers':>17s} {'ratio':>7s}")
        for name, values in times.items():
            med = statistics.median(values)
            target = f" (target <= {TARGETS[name]})" if name in TARGETS else ""
            print(
                f"  {name:12s} {med * 1e3:10.1f} {min(values) * 1e3:9.1f} {(med - base) * 1e3:+17.1f} "
                f"{med / base:7.3f}{target}"
            )
    finally:
        if not args.no_ray:
            from actors.model_host import unload_hosts

            unload_hosts()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
