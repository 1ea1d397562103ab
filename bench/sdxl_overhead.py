"""SDXL side of the graph-overhead benchmark: the `text_to_image` graph on the `sdxl-small` preset against
`StableDiffusionXLPipeline` built from the graph's own loaded models (same objects), same seed and settings.

`build(solver, steps)` and `runners(graph, pipe, steps)` have the shapes of bench/graph_overhead.py's, so its
`--family sdxl` can call them; run alone, this script times local and Ray-fused worldgen against diffusers,
interleaved, after checking the outputs equal:

    .venv/bin/python bench/sdxl_overhead.py [--steps 20] [--repeats 5] [--warmup 2] [--threads=1] [--no-ray]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Every process (this one and Ray's workers, which start on 1 thread otherwise) runs the models on as many torch
# threads; set before torch is imported, as bench/ray_overhead.py does.
_THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
os.environ["OMP_NUM_THREADS"] = os.environ["WORLDGEN_TORCH_THREADS"] = _THREADS

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

PRESET = "sdxl-small"
SIZE = 64
GUIDANCE = 5.0
PROMPT = "a photo of an old harbor at dawn"
EQUAL_TOL = 1e-4

# graph node -> the pipeline component it holds (the negative-prompt nodes share te/te_2's blocks)
_SAME = {"unet": "unet", "vae": "vae", "te": "text_encoder", "te_2": "text_encoder_2", "tok": "tokenizer"}


def build(solver: str | None, steps: int) -> tuple[Any, Any]:
    """The SDXL template graph and a StableDiffusionXLPipeline built from the graph's own loaded models."""
    from diffusers import StableDiffusionXLPipeline

    import worldgen as wg

    options = {"solver": solver} if solver else {}
    g = wg.Graph.from_template("text_to_image", preset=PRESET, steps=steps, **options)
    template = g.block("schedule").scheduler  # the solver's configured scheduler (never stepped)
    pipe = StableDiffusionXLPipeline(
        vae=g.block("vae").model,
        text_encoder=g.block("te").model,
        text_encoder_2=g.block("te_2").model,
        tokenizer=g.block("tok").model,
        tokenizer_2=g.block("tok_2").model,
        unet=g.block("unet").model,
        scheduler=type(template).from_config(template.config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for node, name in _SAME.items():  # same objects, not equal copies: only the executor differs
        if g.block(node).model is not getattr(pipe, name):
            raise RuntimeError(f"graph node {node!r} and the pipeline's {name} are different objects")
    return g, pipe


def runners(g: Any, pipe: Any, steps: int, executor: str = "local") -> tuple[Any, Any]:
    inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "guidance_scale": GUIDANCE}

    def run_worldgen() -> torch.Tensor:
        return g.run(inputs, seed=0, executor=executor)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        ).images

    return run_worldgen, run_diffusers


def _timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true", help="time the local executor only")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process (--threads=N)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    g, pipe = build(None, args.steps)
    sides = {"diffusers": runners(g, pipe, args.steps)[1], "local": runners(g, pipe, args.steps)[0]}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, logging_level="error")
        sides["ray_fused"] = runners(g, pipe, args.steps, executor="ray")[0]
    reference = sides["diffusers"]()
    for name, run in sides.items():  # equal outputs first (this also warms every side up)
        diff = (run() - reference).abs().max().item()
        if diff > EQUAL_TOL:
            print(f"{name} differs from diffusers by {diff:.2e}")
            return 2
    for _ in range(args.warmup):
        for run in sides.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(args.repeats):  # interleaved, the order rotating every round
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(_timed(sides[name]))
    base = statistics.median(times["diffusers"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:10s} median {median * 1e3:8.1f} ms  ratio {median / base:.3f}  (min {min(values) * 1e3:.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
