"""The inpaint template (worldgen/templates/inpaint.py, the SD and SDXL families' builders) gives exactly the diffusers
inpaint pipelines' images: an inpainting UNet (9 channels) at full and partial strength, masked image to image on a
base UNet (the kept area put back after each step, a stochastic solver checking the generator's order), SDXL with
an inpainting UNet, and on Ray as locally; an inpainting model given to text_to_image and a mask that does not fit
the image are clear errors naming where."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import get_preset, preset_pipeline_components

STEPS, SEED, TOL, RAY_TOL = 2, 0, 1e-4, 1e-5


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[6:22, 10:30] = 255
    return PIL.Image.fromarray(pixels)


def pipeline(cls: type, preset: str, scheduler: str | None = None):
    components = preset_pipeline_components(preset)
    if scheduler is not None:
        components["scheduler"] = getattr(diffusers, scheduler).from_config(components["scheduler"].config)
    pipe = cls(**components, **get_preset(preset).pipeline_extra)  # no safety checker; SDXL's flags
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected(pipe, image, mask, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        PROMPT,
        image=image,
        mask_image=mask,
        num_inference_steps=STEPS,
        generator=generator,
        output_type="pt",
        **kwargs,
    ).images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def sd_inpainting():
    return pipeline(diffusers.StableDiffusionInpaintPipeline, "inpaint-tiny")


@pytest.fixture(scope="module")
def sd_inpainting_graph():
    return wg.Graph.from_template("inpaint", preset="inpaint-tiny", steps=STEPS)


def test_inpainting_unet_matches_diffusers_at_full_and_partial_strength_and_after_save_load(
    sd_inpainting, sd_inpainting_graph, image, mask, tmp_path
):
    inputs = {"prompt": PROMPT, "image": image, "mask_image": mask}
    # strength 1: no image latents drawn (the noise comes first), from noise alone
    got = sd_inpainting_graph.run(inputs, seed=SEED)["image"]
    assert max_diff(got, expected(sd_inpainting, image, mask)) <= TOL
    # strength 0.6: the image's latents first, then from the noised image; the graph saved and loaded
    sd_inpainting_graph.save(tmp_path / "saved")
    got = wg.Graph.load(tmp_path / "saved").run({**inputs, "strength": 0.6}, seed=SEED)["image"]
    assert max_diff(got, expected(sd_inpainting, image, mask, strength=0.6)) <= TOL


def test_masked_image_to_image_on_a_base_unet_matches_diffusers(image, mask):
    # Euler ancestral draws from the generator at every step: after the image, the noise and the masked image.
    pipe = pipeline(diffusers.StableDiffusionInpaintPipeline, "tiny", "EulerAncestralDiscreteScheduler")
    graph = wg.Graph.from_template(
        "inpaint", preset="tiny", solver="euler_ancestral", steps=STEPS, strength=0.7
    )
    got = graph.run(
        {"prompt": PROMPT, "negative_prompt": "a dog", "image": image, "mask_image": mask}, seed=SEED
    )
    want = expected(pipe, image, mask, strength=0.7, negative_prompt="a dog")
    assert max_diff(got["image"], want) <= TOL
    # The kept area is the image's (up to what the VAE makes of it), the masked area is repainted.
    unmasked = wg.Graph.from_template("image_to_image", preset="tiny", solver="euler_ancestral", steps=STEPS)
    plain = unmasked.run({"prompt": PROMPT, "image": image, "strength": 0.7}, seed=SEED)["image"]
    assert max_diff(got["image"], plain) > 1e-3


def test_sdxl_inpainting_unet_matches_diffusers(image, mask):
    pipe = pipeline(diffusers.StableDiffusionXLInpaintPipeline, "sdxl-inpaint-tiny")
    graph = wg.Graph.from_template("inpaint", preset="inpaint-tiny", family="sdxl", steps=STEPS)
    assert graph.exposed_inputs["strength"].default == 0.9999  # the SDXL pipeline's default
    got = graph.run({"prompt": PROMPT, "image": image, "mask_image": mask}, seed=SEED)["image"]
    assert max_diff(got, expected(pipe, image, mask)) <= TOL


def test_on_ray_equal_local(clean_hosts, sd_inpainting_graph, image, mask):
    inputs = {"prompt": PROMPT, "image": image, "mask_image": mask, "strength": 0.6}
    local = sd_inpainting_graph.run(inputs, seed=SEED)["image"]
    remote = sd_inpainting_graph.run(inputs, seed=SEED, executor="ray")["image"]
    assert max_diff(remote, local) <= RAY_TOL


def test_a_mask_that_does_not_fit_the_image_is_refused_naming_the_node(sd_inpainting_graph, image):
    wrong = PIL.Image.new("L", (32, 40))
    with pytest.raises(ConfigError, match=r"node 'mask'.*mask_image is 32x40") as err:
        sd_inpainting_graph.run({"prompt": PROMPT, "image": image, "mask_image": wrong}, seed=SEED)
    assert "mask_image" in str(err.value.path)


def test_an_inpainting_model_elsewhere_says_to_use_the_inpaint_template():
    for task, family in (("text_to_image", None), ("image_to_image", None), ("text_to_image", "sdxl")):
        with pytest.raises(ConfigError, match="inpainting model .*use the inpaint template"):
            wg.Graph.from_template(task, preset="inpaint-tiny", family=family)
    with pytest.raises(ConfigError, match="the sd3 family has no inpaint graph"):
        wg.Graph.from_template("inpaint", preset="tiny", family="sd3")
