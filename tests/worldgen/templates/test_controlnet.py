"""The `controlnet:` attachment and the `controlled` template (worldgen/templates/controlnet.py) give exactly the
diffusers ControlNet pipelines' images on the tiny presets: one ControlNet, two (multi-ControlNet), guess mode,
control start/end, Canny preprocessing, image to image, and SDXL (text and image to image); bad specs and ControlNets that do not fit the
UNet are clear errors naming the field, before any weights load."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component, preset_pipeline

STEPS, SEED, TOL = 2, 0, 1e-4
CN, CN_B, CN_XL = "preset:controlnet-tiny", "preset:controlnet-tiny-b", "preset:sdxl-controlnet-tiny"


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def control(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def sd_pipe():
    return quiet(preset_pipeline("controlnet-tiny"))


def run(graph: wg.Graph, **inputs) -> torch.Tensor:
    return graph.run({"prompt": PROMPT, **inputs}, seed=SEED)["image"]


def test_controlled_matches_the_controlnet_pipeline_and_the_control_matters(sd_pipe):
    image = control(1)
    expected = sd_pipe(
        PROMPT, image=image, num_inference_steps=STEPS, generator=generator(), output_type="pt"
    ).images
    graph = wg.Graph.from_template("controlled", preset="tiny", steps=STEPS, controlnet={"model": CN})
    assert graph.name == "controlled"
    assert {"control_image", "controlnet_scale"} <= set(graph.input_spec())
    assert max_diff(run(graph, control_image=image), expected) <= TOL
    # The same graph without control (scale 0) is the plain text-to-image graph's image, which differs.
    plain = wg.Graph.from_template("text_to_image", preset="tiny", steps=STEPS)
    unscaled = run(graph, control_image=image, controlnet_scale=0.0)
    assert max_diff(unscaled, run(plain)) <= TOL
    assert max_diff(unscaled, expected) > 1e-2


def test_multi_controlnet_guess_mode_and_start_end_match_the_pipeline(sd_pipe):
    """Two ControlNets chained (MultiControlNetModel), each with its scale and window (with 2 steps: the first
    runs only step 0, the second only step 1), with and without guess mode."""
    second = build_preset_component("controlnet-tiny-b", "controlnet")
    multi = quiet(
        diffusers.StableDiffusionControlNetPipeline(
            **{**sd_pipe.components, "controlnet": [sd_pipe.controlnet, second]}
        )
    )
    images = [control(1), control(2)]
    scales, starts, ends = [0.7, 1.3], [0.0, 0.2], [0.7, 1.0]
    nets = [
        {"model": CN, "scale": scales[0], "start": starts[0], "end": ends[0]},
        {"model": CN_B, "scale": scales[1], "start": starts[1], "end": ends[1]},
    ]
    for guess in (False, True):
        expected = multi(
            PROMPT,
            image=images,
            controlnet_conditioning_scale=scales,
            control_guidance_start=starts,
            control_guidance_end=ends,
            guess_mode=guess,
            num_inference_steps=STEPS,
            generator=generator(),
            output_type="pt",
        ).images
        spec = {"nets": nets, "guess_mode": guess} if guess else nets
        graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=STEPS, controlnet=spec)
        got = run(graph, control_image=images[0], control_image_2=images[1])
        assert max_diff(got, expected) <= TOL, guess
    assert graph.block("controlnet_2").config.guess_mode


def test_canny_preprocessing_matches_the_pipeline_given_the_docs_canny_image(sd_pipe):
    import cv2

    picture = PIL.Image.fromarray(
        (np.random.default_rng(4).random((32, 32, 3)) * 255).astype("uint8")
    ).resize((32, 32))
    edges = cv2.Canny(np.array(picture), 50, 150)  # as diffusers' ControlNet docs make a control image
    canny = PIL.Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))
    expected = sd_pipe(
        PROMPT, image=canny, num_inference_steps=STEPS, generator=generator(), output_type="pt"
    ).images
    spec = {"model": CN, "preprocess": {"type": "canny", "low_threshold": 50, "high_threshold": 150}}
    graph = wg.Graph.from_template("controlled", preset="tiny", steps=STEPS, controlnet=spec)
    assert max_diff(run(graph, control_image=picture), expected) <= TOL


def test_image_to_image_matches_the_controlnet_img2img_pipeline(sd_pipe, init_image):
    pipe = quiet(diffusers.StableDiffusionControlNetImg2ImgPipeline(**sd_pipe.components))
    expected = pipe(
        PROMPT,
        image=init_image,
        control_image=control(1),
        controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.8
        strength=0.6,
        num_inference_steps=4,
        generator=generator(),
        output_type="pt",
    ).images
    graph = wg.Graph.from_template("image_to_image", preset="tiny", steps=4, controlnet={"model": CN})
    got = graph.run(
        {"prompt": PROMPT, "image": init_image, "strength": 0.6, "control_image": control(1)}, seed=SEED
    )["image"]
    assert max_diff(got, expected) <= TOL


def test_sdxl_controlled_matches_the_sdxl_controlnet_pipelines(init_image):
    pipe = quiet(preset_pipeline("sdxl-controlnet-tiny"))
    expected = pipe(
        PROMPT,
        image=control(1),
        controlnet_conditioning_scale=0.8,
        num_inference_steps=STEPS,
        generator=generator(),
        output_type="pt",
    ).images
    graph = wg.Graph.from_template(
        "controlled", preset="tiny", family="sdxl", steps=STEPS, controlnet={"model": CN_XL, "scale": 0.8}
    )
    assert max_diff(run(graph, control_image=control(1)), expected) <= TOL

    img2img = quiet(diffusers.StableDiffusionXLControlNetImg2ImgPipeline(**pipe.components))
    expected = img2img(
        PROMPT,
        image=init_image,
        control_image=control(1),
        controlnet_conditioning_scale=1.0,
        strength=0.5,
        num_inference_steps=4,
        generator=generator(),
        output_type="pt",
    ).images
    graph = wg.Graph.from_template(
        "image_to_image", preset="tiny", family="sdxl", steps=4, strength=0.5, controlnet={"model": CN_XL}
    )
    got = graph.run({"prompt": PROMPT, "image": init_image, "control_image": control(1)}, seed=SEED)["image"]
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        ({"model": CN, "scale": -1}, "controlnet.scale", "greater than or equal to 0"),
        ({"model": CN, "start": 0.8, "end": 0.5}, "controlnet", "must be below end"),
        ({"model": CN, "preprocess": "sobel"}, "controlnet.preprocess", "preprocess"),
        ([{"model": CN}, {"model": CN, "scael": 1}], "controlnet.1.scael", "Extra inputs"),
        ([{"model": CN, "guess_mode": True}], "controlnet.0.guess_mode", "every ControlNet"),
        ("preset:controlnet-tiny", "controlnet", "mapping with `model`"),
    ],
)
def test_a_bad_spec_is_a_config_error_naming_the_field(spec, path, message):
    with pytest.raises(ConfigError, match=message) as err:
        wg.Graph.from_template("text_to_image", preset="tiny", controlnet=spec)
    assert err.value.path == path


def test_a_controlnet_that_does_not_fit_the_unet_is_refused_before_loading():
    with pytest.raises(
        ConfigError, match=r"node 'controlnet' .*cross_attention_dim is 64 but the UNet's is 32"
    ):
        wg.Graph.from_template("controlled", preset="tiny", controlnet={"model": CN_XL})
    with pytest.raises(ConfigError, match=r"node 'controlnet_2' .*cross_attention_dim is 32") as err:
        wg.Graph.from_template(
            "controlled", preset="tiny", family="sdxl", controlnet=[{"model": CN_XL}, {"model": CN}]
        )
    assert err.value.path == "controlnet.1.model"


def test_a_family_without_controlnet_support_says_not_yet():
    with pytest.raises(ConfigError, match="not yet for the sd3 family.*sd, sdxl, flux") as err:
        wg.Graph.from_template("controlled", preset="tiny", family="sd3", controlnet={"model": CN})
    assert err.value.path == "controlnet"
