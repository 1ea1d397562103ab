"""The upscalers' task nodes (worldgen/nodes/upscale.py) and what they added to the shared blocks: the UNet's
`concat` channels and `class_labels`, the CLIP conditioner's raw last layer; bad inputs (an image of the wrong
channels, a noise level out of range, an image whose upscale is over the size budget) refused before any model
runs, naming the node and the input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.limits import LimitExceeded, Limits
from worldgen.models.presets import build_preset_component
from worldgen.nodes.diffusion import SolverState
from worldgen.preflight import preflight
from worldgen.registry import create_block


@pytest.fixture(scope="module")
def x4():
    return wg.Graph.from_template("upscale", preset="upscale-tiny", steps=2)


@pytest.fixture(scope="module")
def x2():
    return wg.Graph.from_template("upscale", preset="latent-upscale-tiny", steps=2)


def test_unet_concat_and_class_labels_reach_the_model_in_both_branches():
    unet = build_preset_component("upscale-tiny", "unet")
    block = create_block("backbone/unet2d", {"model": {"source": "preset:upscale-tiny", "subfolder": "unet"}})
    g = torch.Generator().manual_seed(0)
    sample, extra = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    level = torch.tensor([30])
    out = block(
        sample=sample,
        timestep=torch.tensor(500),
        condition=cond,
        condition_uncond=uncond,
        concat=extra,
        class_labels=level,
    )
    with torch.no_grad():
        want = unet(
            torch.cat([torch.cat([sample, extra], dim=1)] * 2),
            torch.tensor(500),
            encoder_hidden_states=torch.cat([uncond, cond]),
            class_labels=torch.cat([level] * 2),
        ).sample
    assert torch.allclose(out["pred_uncond"], want[:1], atol=1e-6)
    assert torch.allclose(out["pred"], want[1:], atol=1e-6)


def test_clip_last_raw_is_the_last_hidden_state_before_the_norm():
    encoder = build_preset_component("tiny", "text_encoder")
    block = create_block(
        "conditioner/clip_text",
        {"model": {"source": "preset:tiny", "subfolder": "text_encoder"}, "layer": "last_raw"},
    )
    ids = torch.tensor([[0, 5, 9, 3] + [1] * 73])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(block(token_ids=ids)["embedding"], hidden)


def test_latent_upscale_unet_needs_a_sigma_solver_state():
    block = create_block(
        "backbone/latent_upscale_unet",
        {"model": {"source": "preset:latent-upscale-tiny", "subfolder": "unet"}},
    )
    latent = torch.zeros(1, 4, 8, 8)
    ddim_state = SolverState(
        scheduler={"alphas_cumprod": torch.ones(3)}, timesteps=torch.tensor([999]), step=0
    )
    with pytest.raises(wg.ConfigError, match="sigma-based solver") as err:
        block(
            sample=latent,
            latent=latent,
            state=ddim_state,
            condition=torch.zeros(1, 77, 32),
            pooled=torch.zeros(1, 32),
            concat=latent,
        )
    assert err.value.path == "state"


@pytest.mark.parametrize(
    ("graph", "inputs", "node", "message"),
    [
        (
            "x4",
            {"image": torch.rand(1, 4, 8, 8)},
            "low_res",
            "with 3 channels, got torch.float32 (1, 4, 8, 8)",
        ),
        ("x4", {"image": torch.rand(1, 3, 2, 2)}, "low_res", "at least 4x4 pixels"),
        ("x4", {"image": Image.new("RGBA", (8, 8))}, "low_res", "PIL images must be RGB, got mode RGBA"),
        ("x2", {"image": torch.rand(1, 5, 8, 8)}, "image_in", "with 3 or 4 channels"),
        ("x2", {"image": [Image.new("L", (8, 8))]}, "image_in", "PIL images must be RGB, got mode L"),
        ("x2", {"image": torch.rand(1, 3, 2, 2)}, "image_in", "at least 4x4 pixels"),
    ],
)
def test_a_bad_image_is_refused_naming_the_node(request, graph, inputs, node, message):
    with pytest.raises(wg.ConfigError) as err:
        preflight(request.getfixturevalue(graph), {"prompt": PROMPT, **inputs})
    assert err.value.path == "inputs.image"
    assert message in err.value.detail and f"(node '{node}')" in err.value.detail


@pytest.mark.parametrize("level", [-1, 351, 2.5, True, "20"])
def test_a_noise_level_out_of_range_is_refused(x4, level):
    with pytest.raises(wg.ConfigError, match="noise_level must be") as err:
        preflight(x4, {"prompt": PROMPT, "image": torch.rand(1, 3, 8, 8), "noise_level": level})
    assert err.value.path == "inputs.noise_level" and "(node 'low_res')" in err.value.detail
    preflight(x4, {"prompt": PROMPT, "image": torch.rand(1, 3, 8, 8), "noise_level": 350})


def test_a_bad_image_is_refused_when_run_without_preflight(x4):
    with pytest.raises(wg.ConfigError, match="node 'low_res': at image: image must be"):
        x4.run({"prompt": PROMPT, "image": torch.rand(1, 1, 8, 8)}, seed=0)


@pytest.mark.parametrize(
    ("graph", "image", "width"),
    [
        ("x4", torch.rand(1, 3, 500, 520), 2080),  # the output is 4x the input
        ("x2", torch.rand(1, 3, 1000, 1040), 2080),  # 2x
        ("x2", torch.rand(1, 4, 250, 260), 1040),  # latents: x VAE scale 2, x 2
    ],
)
def test_the_upscaled_size_counts_against_the_budget(request, graph, image, width):
    engine = request.getfixturevalue(graph)
    limits = Limits(max_image_side=width - 1)
    with pytest.raises(LimitExceeded, match=f"width {width} is over {width - 1}") as err:
        preflight(engine, {"prompt": PROMPT, "image": image}, limits=limits)
    assert err.value.limit == "max_image_side"
    preflight(engine, {"prompt": PROMPT, "image": image}, limits=Limits(max_image_side=width))
