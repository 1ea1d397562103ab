"""World templates: functions returning a world config (`World.from_template(name, **params)`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldgen.config import load_config_file
from worldgen.templates import register_template

DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "configs" / "worlds" / "default.yaml"


@register_template("offline_world", kind="world")
def offline_world(
    name: str | None = None,
    title: str | None = None,
    story: str | None = None,
    seed: int = 0,
    preset: str = "small",
    size: int = 64,
    steps: int = 12,
    executor: str = "local",
) -> dict[str, Any]:
    """The default offline world (template LLMs, a tiny SD preset, image statistics), with your story."""
    config = load_config_file(DEFAULT_WORLD)
    config |= {"seed": seed, "executor": executor}
    if name:
        config["name"] = name
    if title:
        config["initial_world"]["title"] = title
    if story:
        config["initial_world"]["story"] = story
    config["generation_defaults"] |= {"width": size, "height": size, "steps": steps}
    config["stages"]["creator"] = {"template": "text_to_image", "params": {"preset": preset, "steps": steps}}
    return config


MOVING_WORLD = DEFAULT_WORLD.with_name("moving.yaml")


@register_template("moving_world", kind="world")
def moving_world(
    name: str | None = None,
    title: str | None = None,
    story: str | None = None,
    seed: int = 0,
    size: int = 64,
    frames: int = 9,
    fps: float = 8.0,
    steps: int = 8,
    executor: str = "local",
) -> dict[str, Any]:
    """The offline world that moves (configs/worlds/moving.yaml): each episode a picture, then a Wan clip of
    `frames` frames (4k+1) from it, with your story. `size` is a multiple of 16 (the video model's)."""
    config = load_config_file(MOVING_WORLD)
    config |= {"seed": seed, "executor": executor}
    if name:
        config["name"] = name
    if title:
        config["initial_world"]["title"] = title
    if story:
        config["initial_world"]["story"] = story
    config["generation_defaults"] |= {
        "width": size,
        "height": size,
        "steps": steps,
        "frames": frames,
        "fps": fps,
    }
    for pipeline in config["stages"]["creator"]["pipelines"].values():
        pipeline["params"]["steps"] = steps
    return config
