"""SD3 for bench/graph_overhead.py: the sd3 text-to-image graph against `StableDiffusion3Pipeline` on the same
model objects (preset 'sd3-small', 64x64, guidance 7.0), and on its own the ratios local ÷ diffusers and Ray
(fused loop) ÷ diffusers, side by side in one run.

    .venv/bin/python bench/family_sd3.py --steps 20 --repeats 7

`build`, `runners` and `backbone_call_ms` are what graph_overhead's `--family sd3` calls (same roles as its SD
functions). Ray runs use host actors (the same preset weights, in other processes), so only the local side
shares the pipeline's objects.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

PRESET = "sd3-small"
SIZE = 64
GUIDANCE = 7.0
PROMPT = "a photo of an old harbor at dawn"
EQUAL_TOL = 1e-4

# graph node -> StableDiffusion3Pipeline argument
_COMPONENTS = {
    "transformer": "transformer",
    "vae": "vae",
    "te": "text_encoder",
    "te_2": "text_encoder_2",
    "te_3": "text_encoder_3",
    "tok": "tokenizer",
    "tok_2": "tokenizer_2",
    "tok_3": "tokenizer_3",
}


def build(steps: int) -> tuple[Any, Any]:
    """The sd3 template graph and a StableDiffusion3Pipeline built from the graph's own loaded models."""
    from diffusers import StableDiffusion3Pipeline

    import worldgen as wg

    g = wg.Graph.from_template("text_to_image", preset=PRESET, steps=steps, guidance_scale=GUIDANCE)
    template = g.block("schedule").scheduler  # the solver's configured scheduler (never stepped itself)
    parts = {arg: g.block(node).model for node, arg in _COMPONENTS.items()}
    pipe = StableDiffusion3Pipeline(**parts, scheduler=type(template).from_config(template.config))
    pipe.set_progress_bar_config(disable=True)
    return g, pipe


def runners(g: Any, pipe: Any, steps: int, **run_options: Any) -> tuple[Any, Any]:
    """(worldgen run, diffusers run) on the same prompt, size, guidance and seed; `run_options` go to
    `graph.run` (executor="ray", fuse_loops=...)."""
    inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE}

    def run_worldgen() -> torch.Tensor:
        return g.run(inputs, seed=0, **run_options)["image"]

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


def backbone_call_ms(g: Any, calls: int = 10) -> float:
    """Median time of one batched (CFG, batch 2) transformer call at this size, on the graph's transformer."""
    transformer = g.block("transformer").model
    cfg = transformer.config
    latent = SIZE // g.block("vae").scale_factor
    gen = torch.Generator("cpu").manual_seed(1)
    sample = torch.randn(2, cfg.in_channels, latent, latent, generator=gen)
    tokens = 77 + g.block("joint").config.t5_length
    cond = torch.randn(2, tokens, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=gen)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.no_grad():
        for i in range(calls + 2):
            start = time.perf_counter()
            transformer(
                hidden_states=sample, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled
            )
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _timings_ms(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true", help="only worldgen local vs diffusers")
    args = parser.parse_args(argv)

    g, pipe = build(args.steps)
    run_local, run_df = runners(g, pipe, args.steps)
    diff = (run_local() - run_df()).abs().max().item()
    print(f"sd3 '{PRESET}' {SIZE}x{SIZE}, {args.steps} steps, guidance {GUIDANCE}; torch threads "
          f"{torch.get_num_threads()}; max abs diff local vs diffusers {diff:.3g}")  # fmt: skip
    if not diff <= EQUAL_TOL:
        print("FAIL: the graph and the pipeline compute different images")
        return 2
    sides: dict[str, Any] = {"worldgen local": run_local, "diffusers": run_df}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=os.cpu_count() or 2, logging_level="warning", include_dashboard=False)
        run_ray, _ = runners(g, pipe, args.steps, executor="ray", fuse_loops=True)
        ray_diff = (run_ray() - run_df()).abs().max().item()
        print(f"max abs diff Ray (fused) vs diffusers {ray_diff:.3g}")
        sides["worldgen Ray fused"] = run_ray
    for fn in sides.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.repeats):  # interleaved, the order reversed every other round
        order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
        for name, fn in order:
            times[name] += _timings_ms(fn, 1)
    base, floor = statistics.median(times["diffusers"]), min(times["diffusers"])
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"  {name:20s} median {med:8.1f} ms  min {min(values):8.1f} ms  ratio of medians {med / base:.3f}"
            f"  of minima {min(values) / floor:.3f}"
        )
    print(
        f"  load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (minima are the steadier figure on a busy machine)"
    )
    print(f"  transformer call (batch 2): {backbone_call_ms(g):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
