"""Inpainting's task node (worldgen/nodes/inpaint.py) and what inpainting added to the shared blocks: `image/mask`
prepares image and mask exactly as the diffusers inpaint pipelines' processors do and refuses what is not an image
and its mask; the UNet's `concat` channels; the solver's inpaint start and per-step blend; the VAE encoder given no
image."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from worldgen.errors import ConfigError
from worldgen.registry import create_block

SIZE = 32


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    pixels[8:24, 4:21] = 255
    pixels[0, 0] = 100  # below half: binarized to keep
    return PIL.Image.fromarray(pixels)


def mask_block(**config):
    return create_block("image/mask", {"scale_factor": 2, "height": SIZE, "width": SIZE, **config})


def test_prepares_image_and_mask_as_the_pipeline(image, mask):
    from diffusers.image_processor import VaeImageProcessor

    out = mask_block()(image=image, mask_image=mask, height=16, width=24)
    # The pipeline's own processors (StableDiffusionInpaintPipeline.__init__) and prepare_mask_latents' resize.
    pipe_image = VaeImageProcessor(vae_scale_factor=2).preprocess(image, height=16, width=24)
    pipe_mask = VaeImageProcessor(
        vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    ).preprocess(mask, height=16, width=24)
    assert torch.equal(out["image"] * 2 - 1, pipe_image)  # the codec normalises [0, 1] as the pipeline does
    assert torch.equal(out["masked_image"] * 2 - 1, pipe_image * (pipe_mask < 0.5))
    assert torch.equal(out["mask"], torch.nn.functional.interpolate(pipe_mask, size=(8, 12)))
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    assert (out["height"], out["width"], out["batch_size"]) == (16, 24, 1)


def test_image_is_encoded_only_when_its_latents_are_used(image, mask):
    inpainting = mask_block(encode_image="below_full_strength")
    assert inpainting(image=image, mask_image=mask)["image"] is None  # strength 1: the pipeline encodes none
    assert inpainting(image=image, mask_image=mask, strength=0.5)["image"] is not None
    assert mask_block()(image=image, mask_image=mask)["image"] is not None  # a base UNet blends them back


def test_masks_as_tensors_arrays_and_grey_rgb_are_one_channel(image, mask):
    expected = mask_block()(image=image, mask_image=mask)["mask"]
    grey = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)
    for given in (grey, grey[None], grey[None, None], grey.numpy(), grey.expand(1, 3, SIZE, SIZE)):
        assert torch.equal(mask_block()(image=image, mask_image=given)["mask"], expected)
    assert torch.equal(mask_block()(image=image, mask_image=mask.convert("RGB"))["mask"], expected)


@pytest.mark.parametrize(
    ("image_value", "mask_value", "path", "match"),
    [
        (
            None,
            PIL.Image.new("L", (SIZE, SIZE + 8)),
            "mask_image",
            "mask_image is 32x40 .* but image is 32x32",
        ),
        (None, torch.rand(1, 3, SIZE, SIZE), "mask_image", "3 channels that differ"),
        (None, PIL.Image.new("RGB", (SIZE, SIZE), (255, 0, 0)), "mask_image", "a colour PIL RGB image"),
        (None, torch.ones(1, 2, SIZE, SIZE), "mask_image", "2 channels"),
        (None, torch.full((SIZE, SIZE), 255.0), "mask_image", r"values must be in \[0, 1\]"),
        (None, torch.ones(2, 1, SIZE, SIZE), "mask_image", "2 masks for 1 images"),
        (torch.rand(1, 4, SIZE, SIZE), None, "image", r"image must be RGB, \(B, 3, H, W\)"),
        (PIL.Image.new("L", (SIZE, SIZE)), None, "image", "PIL mode L"),
        ("a path", None, "image", "got str"),
    ],
)
def test_refuses_what_is_not_an_image_and_its_mask(image, mask, image_value, mask_value, path, match):
    inputs = {"image": image if image_value is None else image_value}
    inputs["mask_image"] = mask if mask_value is None else mask_value
    block = mask_block()
    with pytest.raises(ConfigError, match=match) as err:
        block.check_inputs(inputs)
    assert err.value.path == path
    with pytest.raises(ConfigError, match=match):
        block(**inputs)  # a value fed by another node is checked when it arrives


def test_refuses_sizes_the_vae_cannot_take(image, mask):
    with pytest.raises(ConfigError, match="height must be a positive multiple of 2") as err:
        mask_block().check_inputs({"image": image, "mask_image": mask, "height": 31})
    assert err.value.path == "height"
    with pytest.raises(ConfigError, match="strength must be 0 to 1"):
        mask_block().check_inputs({"strength": 1.5})


def test_unet_takes_the_inpaint_condition_and_refuses_a_wrong_channel_count():
    unet = create_block("backbone/unet2d", {"model": "preset:inpaint-tiny"})
    sample, cond = torch.randn(2, 4, 16, 16), torch.randn(1, 77, 32)
    mask, masked = torch.ones(1, 1, 16, 16), torch.randn(2, 4, 16, 16)
    extra = create_block("latent/inpaint_condition")(mask=mask, masked_latent=masked)["condition"]
    assert torch.equal(
        extra, torch.cat([mask.expand(2, 1, 16, 16), masked], dim=1)
    )  # one mask for both images
    out = unet(sample=sample, timestep=torch.tensor(10), condition=cond, condition_uncond=cond, concat=extra)
    direct = unet.model(
        torch.cat([sample, extra], dim=1), 10, encoder_hidden_states=cond.expand(2, 77, 32)
    ).sample
    assert torch.allclose(out["pred"], direct, atol=1e-5) and torch.allclose(
        out["pred_uncond"], direct, atol=1e-5
    )
    with pytest.raises(ConfigError, match="takes 9 input channels but gets 4 .*the inpaint template") as err:
        unet(sample=sample, timestep=torch.tensor(10), condition=cond)
    assert err.value.path == "concat"
    with pytest.raises(ConfigError, match="both must be at latent size") as err:
        create_block("latent/inpaint_condition")(mask=torch.ones(1, 1, 32, 32), masked_latent=masked)
    assert err.value.path == "mask"


def test_solver_starts_inpainting_from_noise_and_puts_the_kept_area_back():
    from diffusers import DDIMScheduler

    solver = create_block("solver/ddim", {"noise_at_full_strength": True, "num_inference_steps": 4})
    image, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # repaint the left half
    start = solver(latent=image, noise=noise, mask=mask)
    assert torch.equal(start["latent"], noise)  # strength 1: the noise alone (DDIM's init sigma is 1)
    assert torch.equal(solver(latent=None, noise=noise)["latent"], noise)  # no image latents needed then
    step = solver(latent=start["latent"], pred=torch.randn(1, 4, 8, 8), state=start["state"])
    reference = DDIMScheduler.from_config(solver.scheduler.config)
    reference.set_timesteps(4)
    kept = reference.add_noise(image, noise, reference.timesteps[1:2])
    assert torch.equal(step["latent"][..., 4:], kept[..., 4:])  # the kept area: the image, as noisy as x_t
    assert not torch.equal(step["latent"][..., :4], kept[..., :4])
    with pytest.raises(ConfigError, match="needs `latent`") as err:
        solver(latent=None, noise=noise, strength=0.5)
    assert err.value.path == "latent"
    plain = create_block("solver/ddim", {"num_inference_steps": 4})  # image to image is unchanged
    assert not torch.equal(plain(latent=image, noise=noise)["latent"], noise)


def test_vae_encoder_given_no_image_passes_the_generator_on():
    from worldgen.rng import RngState

    vae = create_block("codec/vae", {"model": "preset:tiny", "mode": "encode"})
    rng = RngState.seeded(3)
    assert vae(image=None, rng=rng) == {"latent": None, "rng": rng}
