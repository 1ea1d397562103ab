"""A tiny video episode's Creator on Ray (each denoising loop fused on its backbone's host) against diffusers.

What configs/worlds/moving.yaml's Creator makes each episode, at its settings (64x64, 9 frames, 8 steps,
guidance 7.5 for the picture and 5 for the clip): a picture drawn from the prompt, then a clip from it.
  diffusers  StableDiffusionPipeline ("small" preset) -> WanImageToVideoPipeline ("wan-i2v-tiny"), chained
  local      the `text_to_image_to_video` pipeline template, local executor
  ray_fused  the same pipeline on the Ray executor: each graph's denoising loop is one call on its host actor
Outputs are checked first (local vs diffusers <= 1e-4, Ray vs local <= 1e-5). Runs are interleaved (the order
rotates every round); medians are compared. `--threads N` (default 1) sets OMP_NUM_THREADS for the driver and
every Ray worker, so every side runs torch on the same number of threads.

    .venv/bin/python bench/video_episode.py [--repeats 5] [--warmup 1] [--threads 1] [--json]
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

import worldgen as wg  # noqa: E402
from worldgen.models.presets import preset_pipeline  # noqa: E402

TARGET = 1.10
TOL_DIFFUSERS, TOL_RAY = 1e-4, 1e-5
SIDES = ("diffusers", "local", "ray_fused")
PROMPT, NEGATIVE, SEED = "a lighthouse keeper's harbor at dusk, fog rolling in", "blurry, watermark", 0
SIZE, FRAMES, STEPS, GUIDANCE, VIDEO_GUIDANCE = 64, 9, 8, 7.5, 5.0


def build() -> dict[str, Any]:
    """The three sides; each returns (picture, clip) tensors."""
    pipeline = wg.Pipeline.from_template(
        "text_to_image_to_video",
        preset="small",
        video_preset="wan-i2v-tiny",
        steps=STEPS,
        video_steps=STEPS,
        guidance_scale=GUIDANCE,
        video_guidance_scale=VIDEO_GUIDANCE,
    )
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIZE, "height": SIZE, "frames": FRAMES}
    sd, wan = preset_pipeline("small"), preset_pipeline("wan-i2v-tiny")
    wan.image_processor.do_rescale = False  # the picture is handed over as a [0, 1] tensor, not 8-bit pixels
    for pipe in (sd, wan):
        pipe.set_progress_bar_config(disable=True)

    def diffusers() -> tuple[torch.Tensor, torch.Tensor]:
        common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": SIZE, "width": SIZE}
        common |= {"num_inference_steps": STEPS, "output_type": "pt"}
        picture = sd(**common, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED)).images
        clip = wan(
            image=picture,
            **common,
            num_frames=FRAMES,
            guidance_scale=VIDEO_GUIDANCE,
            generator=torch.Generator().manual_seed(SEED),
        ).frames
        return picture, clip

    def run(executor: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = pipeline.run(inputs, seed=SEED, executor=executor)
        return out["image"], out["video"]

    return {"diffusers": diffusers, "local": lambda: run("local"), "ray_fused": lambda: run("ray")}


def timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
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
    address = ray.get_runtime_context().gcs_address
    try:
        print(
            f"A video episode's Creator (picture + clip): {SIZE}x{SIZE}, {FRAMES} frames, {STEPS} steps; "
            f"ray {ray.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads or 'all'} thread(s)"
        )
        run = build()
        out = {name: fn() for name, fn in run.items()}  # also the cold Ray run: hosts start and load
        diffs = {
            "local_vs_diffusers": max(
                (a - b).abs().max().item() for a, b in zip(out["local"], out["diffusers"], strict=True)
            ),
            "ray_fused_vs_local": max(
                (a - b).abs().max().item() for a, b in zip(out["ray_fused"], out["local"], strict=True)
            ),
        }
        for name, d in diffs.items():
            print(
                f"  max abs diff {name:20s} {d:.3g} (tolerance {TOL_DIFFUSERS if 'diffusers' in name else TOL_RAY:g})"
            )
        if diffs["local_vs_diffusers"] > TOL_DIFFUSERS or diffs["ray_fused_vs_local"] > TOL_RAY:
            print("FAIL: the sides compute different episodes; timings would be meaningless")
            return 2
        hosts = list_hosts(address)
        print(
            f"  model hosts (name, loads, calls): {[(h['name'], h.get('loads'), h.get('calls')) for h in hosts]}"
        )

        for _ in range(args.warmup):
            for fn in run.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in SIDES}
        for i in range(args.repeats):
            k = i % len(SIDES)
            for name in SIDES[k:] + SIDES[:k]:  # rotate the order every round
                times[name].append(timed(run[name]))
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up run(s) each:")
        print(f"  {'side':10s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'/diffusers':>11s}")
        for name in SIDES:
            t = times[name]
            print(
                f"  {name:10s} {med[name]:10.1f} {min(t) * 1e3:9.1f} {max(t) * 1e3:9.1f} "
                f"{med[name] / med['diffusers']:11.3f}"
            )
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
                "size": SIZE, "frames": FRAMES, "steps": STEPS, "repeats": args.repeats, "threads": args.threads,
                "max_abs_diff": diffs, "median_ms": med,
                "ratio_to_diffusers": {n: med[n] / med["diffusers"] for n in SIDES},
                "times_ms": {n: [x * 1e3 for x in t] for n, t in times.items()}, "ratio": ratio, "target": TARGET,
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
