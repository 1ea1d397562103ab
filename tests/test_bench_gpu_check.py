"""bench/gpu_check.py is ready for a GPU: its --smoke run (the same code on the CPU, tiny presets) prints every
part of its table. Nothing is timed here; the figures come from a GPU run (bench/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu_with_smoke():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for part in ("(a) fp32 parity", "(b) per image", "(c) torch.compile", "(d) peak device memory"):
        assert part in out, out
    lines = out.splitlines()
    # the parity of both families, computed (a number, not an error)
    for family in ("sd", "sdxl"):
        (row,) = [line for line in lines if line.split()[:1] == [family] and len(line.split()) == 2]
        assert float(row.split()[1]) == 0.0  # the CPU against itself: the very same image
    # a row per model with both medians and the ratio, and the images equal to diffusers'
    for name in ("sd15", "sdxl"):
        (row,) = [line for line in lines if line.split()[:2] == [name, "float32"]]
        fields = row.split()
        assert float(fields[3]) > 0 and float(fields[4]) > 0 and float(fields[5]) > 0, row
        assert row.endswith("local 0"), row  # worldgen's image is the pipeline's
    assert "speed-up" in out and "model loads" not in out and "the three graphs loaded" in out
