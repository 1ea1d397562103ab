"""The canon's text -> image -> video (templates/diffusion.py `text_to_image_to_video`): the picture is what the
Stable Diffusion pipeline draws, and the clip what Wan's image-to-video pipeline makes from that picture, on the
same components and seed; the same on Ray (each denoising loop fused on its backbone's host)."""

from __future__ import annotations

import pytest
import torch

import worldgen as wg
from worldgen.errors import ConfigError
from worldgen.models.presets import preset_pipeline
from worldgen.preflight import preflight

PROMPT, NEGATIVE, SEED, STEPS = "a lighthouse in the fog", "blurry", 3, 2
SIZE = {"width": 32, "height": 32, "frames": 5}


@pytest.fixture(scope="module")
def pipeline() -> wg.Pipeline:
    return wg.Pipeline.from_template(
        "text_to_image_to_video", preset="tiny", video_preset="wan-i2v-tiny", steps=STEPS, video_steps=STEPS
    )


@pytest.fixture(scope="module")
def local(pipeline) -> dict:
    return pipeline.run({"prompt": PROMPT, "negative_prompt": NEGATIVE, **SIZE}, seed=SEED)


def test_text_to_image_to_video_matches_the_two_pipelines_chained(local):
    generator = torch.Generator().manual_seed(SEED)
    picture = preset_pipeline("tiny")(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        generator=generator,
        output_type="pt",
    ).images
    wan = preset_pipeline("wan-i2v-tiny")
    wan.image_processor.do_rescale = False  # the picture is a [0, 1] tensor, not 8-bit pixels
    clip = wan(
        image=picture,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
    ).frames
    assert local["video"].shape == (1, 5, 3, 32, 32)
    assert (local["image"] - picture).abs().max() <= 1e-4
    assert (local["video"] - clip).abs().max() <= 1e-4
    assert (local["video"][:, 0] - local["image"]).abs().mean() < 0.25  # the clip starts from the picture


def test_text_to_image_to_video_on_ray_matches_local(ray_session, pipeline, local):
    remote = pipeline.run({"prompt": PROMPT, "negative_prompt": NEGATIVE, **SIZE}, seed=SEED, executor="ray")
    for name in ("image", "video"):
        assert (remote[name] - local[name]).abs().max() <= 1e-5, name


def test_a_size_the_video_model_cannot_make_is_refused_before_anything_runs(pipeline):
    with pytest.raises(ConfigError, match="multiple of 16"):
        preflight(pipeline, {"prompt": PROMPT, "width": 40, "height": 32, "frames": 5})
