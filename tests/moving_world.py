"""configs/worlds/moving.yaml made small for tests (the world and gateway tests run it): each episode a 32x32
picture, then a 5-frame Wan image-to-video clip from it, 2 denoising steps each."""

from __future__ import annotations

from pathlib import Path

from worldgen.config import load_config_file

MOVING = Path(__file__).resolve().parents[1] / "configs" / "worlds" / "moving.yaml"
SIDE, FRAMES, STEPS = (
    32,
    5,
    2,
)  # Wan makes 4k+1 frames; 2 denoising steps tell a fused loop from an unfused one


def small_moving_config(executor: str = "local") -> dict:
    """moving.yaml at SIDE x SIDE, FRAMES frames and STEPS denoising steps (the Architect asks for the
    defaults), on `executor`."""
    config = load_config_file(MOVING)
    config["executor"] = executor
    config["generation_defaults"] |= {"width": SIDE, "height": SIDE, "steps": STEPS, "frames": FRAMES}
    for pipeline in config["stages"]["creator"]["pipelines"].values():
        pipeline["params"]["steps"] = STEPS
    return config
