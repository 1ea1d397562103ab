"""LoRA training throughput with Ray Train: samples/s with 1 and 2 workers, and the adapter/base size ratio.

Records a tiny offline world (tiny SD preset, 32x32, 2 denoising steps; its Creator is the trainable stage),
then trains the same adapters (rank 8 on the UNet's attention and the text encoder's projections) with 1 and
with 2 CPU workers (gloo, one CPU and one torch thread each) on its episodes. Samples/s counts the training
steps of the last epoch only (the first pays for warm-up), as examples x workers / seconds. The size ratio is
the adapter checkpoint's safetensors bytes over every weight of the base world.

    .venv/bin/python bench/lora_train.py [--episodes 9] [--steps 8] [--batch-size 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

from train_jobs.lora_world import train
from worldgen.lora import adapter_bytes, world_weight_bytes
from worldgen.world import World


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=9, help="episodes to record first")
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per worker per step")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout (the rest to stderr)")
    args = parser.parse_args(argv)
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    tmp = Path(tempfile.mkdtemp(prefix="lora_train_"))
    try:
        ray.init(num_cpus=2, logging_level="warning")  # Train needs the state API (the dashboard)
        world = World.from_template("offline_world", tmp / "base", preset="tiny", size=32, steps=2)
        started = time.perf_counter()
        world.run(args.episodes + 1)  # the first step saves no episode
        print(
            f"recorded {args.episodes} episodes in {time.perf_counter() - started:.1f} s (ray {ray.__version__})"
        )
        figures: dict[str, float] = {}
        for workers in (1, 2):
            state = train(
                {
                    "world": str(world.storage.root),
                    "out": str(tmp / f"custom-{workers}"),
                    "workers": workers,
                    "epochs": 2,
                    "steps_per_epoch": args.steps,
                    "batch_size": args.batch_size,
                    "held_out": 1,
                    "lora": {"rank": args.rank, "alpha": 2 * args.rank},
                }
            )
            last = state["history"][-1]
            figures[f"samples_per_s_{workers}"] = last["samples"] / last["seconds"]
            print(
                f"{workers} worker(s): {last['samples']} samples in {last['seconds']:.2f} s = "
                f"{figures[f'samples_per_s_{workers}']:.2f} samples/s; held-out loss "
                f"{state['initial_held_out_loss']:.4f} -> {last['held_out_loss']:.4f}"
            )
        adapters, base = adapter_bytes(tmp / "custom-2" / "adapters"), world_weight_bytes(world)
        figures |= {"adapter_bytes": adapters, "base_bytes": base, "size_ratio": adapters / base}
        figures["speedup_2_vs_1"] = figures["samples_per_s_2"] / figures["samples_per_s_1"]
        print(f"2 workers / 1 worker: {figures['speedup_2_vs_1']:.2f}x samples/s")
        print(
            f"adapter checkpoint {adapters / 1024:.0f} KiB / base world {base / 2**20:.1f} MiB = {adapters / base:.2%}"
        )
        if args.json:
            sys.stdout = real_stdout
            print(json.dumps(figures, indent=2))
        return 0
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
