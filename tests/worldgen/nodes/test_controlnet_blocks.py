"""The ControlNet nodes (worldgen/nodes/controlnet.py): control images prepared as diffusers prepares them, Canny
edges as cv2 draws them, ControlNet residuals batched as the UNet's guided call (guess mode, start/end), and
bad control images refused with errors naming the node and the port."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component
from worldgen.nodes.controlnet import CannyBlock, ControlImageBlock, ControlNetBlock, ControlResiduals
from worldgen.nodes.diffusion import SolverState, UNet2DBackboneBlock

CN = {"source": "preset:controlnet-tiny", "subfolder": "controlnet"}


def picture(seed: int, size: int = 48) -> PIL.Image.Image:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    return PIL.Image.fromarray(pixels)


def test_control_image_is_resized_to_the_latent_and_repeated_as_the_pipeline_prepares_it():
    block = ControlImageBlock(scale_factor=2)
    latent = torch.zeros(2, 4, 16, 16)
    got = block(image=picture(0), latent=latent)["image"]
    processor = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False)
    expected = processor.preprocess(picture(0), height=32, width=32).repeat_interleave(2, dim=0)
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, expected)
    # A grayscale map (a depth map) becomes RGB; without a latent the size is the one asked for.
    depth = torch.rand(1, 1, 40, 40)
    gray = block(image=depth, height=32, width=24)["image"]
    assert gray.shape == (1, 3, 32, 24) and torch.equal(gray[:, 0], gray[:, 2])


@pytest.mark.parametrize("channels", [2, 5])
def test_a_control_image_of_wrong_channels_is_refused_naming_the_node_and_port(channels):
    graph = wg.Graph.from_template(
        "controlled", preset="tiny", steps=2, controlnet={"model": "preset:controlnet-tiny"}
    )
    with pytest.raises(ConfigError, match=rf"node 'control'.*3 channels \(RGB\).*got {channels}") as err:
        graph.run({"prompt": PROMPT, "control_image": torch.rand(1, channels, 32, 32)}, seed=0)
    assert err.value.path.endswith("image")
    with pytest.raises(ConfigError, match=r"values are in \[0, 1\]"):
        ControlImageBlock(scale_factor=2)(image=torch.rand(1, 3, 32, 32) * 2 - 1, height=32, width=32)


def test_canny_edges_are_cv2s_on_the_rgb_image_for_pil_and_tensor_inputs():
    import cv2

    block = CannyBlock(low_threshold=60, high_threshold=120)
    image = picture(1, 32)
    edges = cv2.Canny(np.array(image), 60, 120)
    got = np.array(block(image=image)["image"])
    assert (
        got.shape == (32, 32, 3) and np.array_equal(got[..., 0], edges) and np.array_equal(got[..., 2], edges)
    )
    assert edges.any()  # the picture has edges to find
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    assert np.array_equal(np.array(block(image=tensor)["image"]), got)
    with pytest.raises(ConfigError, match="above high_threshold"):
        CannyBlock(low_threshold=200, high_threshold=100)


@pytest.fixture(scope="module")
def net():
    return build_preset_component("controlnet-tiny", "controlnet")


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "condition": torch.randn(1, 77, 32, generator=g),
        "condition_uncond": torch.randn(1, 77, 32, generator=g),
        "image": torch.rand(1, 3, 32, 32, generator=g),
    }


def block(net, **config) -> ControlNetBlock:
    b = ControlNetBlock(model=CN, **config)
    b.set_model(net)
    return b


def test_residuals_are_the_controlnets_batched_as_the_guided_unet_call(net):
    x = inputs()
    got = block(net, scale=0.5)(**x)["residuals"]
    down, mid = net(
        torch.cat([x["sample"]] * 2),
        x["timestep"],
        encoder_hidden_states=torch.cat([x["condition_uncond"], x["condition"]]),
        controlnet_cond=torch.cat([x["image"]] * 2),
        conditioning_scale=0.5,
        return_dict=False,
    )
    assert len(got.down) == len(down) and all(torch.equal(a, b) for a, b in zip(got.down, down, strict=True))
    assert torch.equal(got.mid, mid) and mid.abs().max() > 0
    # Chained: a second ControlNet adds its residuals to these (MultiControlNetModel's sum).
    chained = block(net, scale=0.5)(**x, residuals=got)["residuals"]
    assert torch.equal(chained.mid, mid + mid)


def test_guess_mode_controls_the_conditional_half_only_and_start_end_switch_control_off(net):
    x = inputs()
    guessed = block(net, guess_mode=True)(**x)["residuals"]
    assert guessed.mid.shape[0] == 2 and not guessed.mid[0].any() and guessed.mid[1].abs().max() > 0
    _, mid = net(x["sample"], x["timestep"], x["condition"], x["image"], guess_mode=True, return_dict=False)
    assert torch.equal(guessed.mid[1:], mid)
    # Step 3 of 4 is past end=0.5: no control (the pipelines' controlnet_keep), step 0 is inside.
    windowed = block(net, start=0.0, end=0.5)
    late = SolverState({}, torch.arange(4), 3)
    assert not windowed(**x, state=late)["residuals"].mid.any()
    assert windowed(**x, state=SolverState({}, torch.arange(4), 0))["residuals"].mid.abs().max() > 0


def test_a_control_image_that_does_not_fit_the_latent_is_refused(net):
    x = inputs()
    with pytest.raises(ConfigError, match=r"48x48 pixels but the latent needs 32x32") as err:
        block(net)(**{**x, "image": torch.rand(1, 3, 48, 48)})
    assert err.value.path == "image"
    with pytest.raises(ConfigError, match="takes 3-channel control images") as err:
        block(net)(**{**x, "image": torch.rand(1, 1, 32, 32)})
    assert err.value.path == "image"


def test_the_unet_refuses_residuals_batched_for_another_call(net):
    x = inputs()
    residuals = block(net)(**x)["residuals"]  # batched for guidance: 2
    unet = UNet2DBackboneBlock(model={"source": "preset:tiny", "subfolder": "unet"})
    with pytest.raises(ConfigError, match="batched for 2 but this call runs 1") as err:
        unet(sample=x["sample"], timestep=x["timestep"], condition=x["condition"], control=residuals)
    assert err.value.path == "control"
    assert isinstance(residuals, ControlResiduals)
