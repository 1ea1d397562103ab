"""The `upscale` template (worldgen/templates/upscale.py) gives exactly the diffusers upscalers' images on the tiny
presets: the x4 `StableDiffusionUpscalePipeline` and the x2 `StableDiffusionLatentUpscalePipeline` (also at
guidance 0, also from latents), found from model_index.json (a save_pretrained directory too), and on Ray;
`generate_and_upscale` chains text to image and the upscaler."""

from __future__ import annotations

import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import preset_pipeline, save_preset_pipeline

STEPS, SEED, NOISE_LEVEL = 2, 0, 30
TOL, RAY_TOL = 1e-4, 1e-5


def low_res(side: int) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(7))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


@pytest.fixture(scope="module")
def x4_pipe():
    pipe = preset_pipeline("upscale-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def x2_pipe():
    pipe = preset_pipeline("latent-upscale-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected(pipe, image, guidance_scale: float, **extra) -> torch.Tensor:
    return pipe(
        PROMPT,
        image=image,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
        **extra,
    ).images


def test_x4_matches_the_upscale_pipeline(x4_pipe, tmp_path):
    image = low_res(8)
    want = expected(x4_pipe, image, 6.0, negative_prompt="a dog", noise_level=NOISE_LEVEL)
    graph = wg.Graph.from_template("upscale", preset="upscale-tiny", steps=STEPS, guidance_scale=6.0)
    inputs = {"prompt": PROMPT, "negative_prompt": "a dog", "image": image, "noise_level": NOISE_LEVEL}
    got = graph.run(inputs, seed=SEED)["image"]
    assert got.shape == (1, 3, 32, 32) and close(got, want)
    # Another noise level is another image: the input reaches the UNet's class labels and the image's noise.
    assert not close(graph.run({**inputs, "noise_level": 200}, seed=SEED)["image"], want, 1e-3)

    graph.save(tmp_path / "saved")  # the low-res noise schedule travels with the graph
    assert (tmp_path / "saved" / "assets" / "low_res" / "scheduler_config.json").is_file()
    assert close(wg.Graph.load(tmp_path / "saved").run(inputs, seed=SEED)["image"], want)

    # From a diffusers directory: the pipeline class in model_index.json picks the family, max_noise_level too.
    path = save_preset_pipeline("upscale-tiny", tmp_path / "x4")
    saved = wg.Graph.from_template("upscale", model=str(path), steps=STEPS, guidance_scale=6.0)
    assert saved.block("low_res").config.max_noise_level == 350
    assert close(saved.run(inputs, seed=SEED)["image"], want)


@pytest.mark.parametrize("guidance_scale", [6.0, 0.0])
def test_x2_matches_the_latent_upscale_pipeline(x2_pipe, guidance_scale):
    image = low_res(16)
    want = expected(x2_pipe, image, guidance_scale)
    graph = wg.Graph.from_template(
        "upscale", preset="latent-upscale-tiny", steps=STEPS, guidance_scale=guidance_scale
    )
    got = graph.run({"prompt": PROMPT, "image": image}, seed=SEED)["image"]
    assert got.shape == (1, 3, 32, 32) and close(got, want)


def test_x2_takes_latents_as_they_are(x2_pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = expected(x2_pipe, latents, 6.0)
    graph = wg.Graph.from_template("upscale", preset="latent-upscale-tiny", steps=STEPS, guidance_scale=6.0)
    assert close(graph.run({"prompt": PROMPT, "image": latents}, seed=SEED)["image"], want)


def test_on_ray_equals_local(clean_hosts):
    from actors.model_host import list_hosts

    graph = wg.Graph.from_template("upscale", preset="latent-upscale-tiny", steps=STEPS, guidance_scale=6.0)
    inputs = {"prompt": PROMPT, "image": low_res(16)}
    local = graph.run(inputs, seed=SEED)["image"]
    assert close(graph.run(inputs, seed=SEED, executor="ray")["image"], local, RAY_TOL)
    unet = next(h for h in list_hosts() if h["class"].endswith("UNet2DConditionModel"))
    assert unet["calls"] == 1  # the whole loop, fused on the UNet's host (the solver state travels with it)


def test_generate_and_upscale_chains_the_graphs():
    pipeline = wg.Pipeline.from_template(
        "generate_and_upscale",
        preset="tiny",
        upscaler_preset="upscale-tiny",
        steps=STEPS,
        upscale_steps=STEPS,
    )
    out = pipeline.run({"prompt": PROMPT}, seed=SEED)
    assert out["draft"].shape == (1, 3, 32, 32) and out["image"].shape == (1, 3, 128, 128)


def test_upscalers_are_their_own_families():
    with pytest.raises(ConfigError, match="the upscale family has no text_to_image graph; it has: upscale"):
        wg.Graph.from_template("text_to_image", preset="upscale-tiny")
    with pytest.raises(ConfigError, match="the sd family has no upscale graph"):
        wg.Graph.from_template("upscale", preset="tiny")
    with pytest.raises(ConfigError, match="has no parameter 'noise_level'") as err:
        wg.Graph.from_template("upscale", preset="latent-upscale-tiny", noise_level=20)
    assert err.value.path == "noise_level"
