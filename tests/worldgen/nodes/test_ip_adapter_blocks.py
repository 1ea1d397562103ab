"""IP-Adapter blocks (worldgen/nodes/ip_adapter.py): one UNet call with image prompts equals diffusers' UNet after
`_load_ip_adapter_weights` (two adapters at once too), adapters switch per call without a trace on the shared
UNet, and bad values (not an image, a backbone without cross-attention, weights with other keys) are refused
naming the field."""

from __future__ import annotations

import copy

import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component, preset_config
from worldgen.models.tiny_ip_adapter import WEIGHT_NAME, build_ip_adapter_weights
from worldgen.nodes.diffusion import UNet2DBackboneBlock
from worldgen.nodes.ip_adapter import ImagePrompt, IPAdapterBlock, IPAdapterWeights, read_weights

PRESET = "preset:ip-adapter-tiny"
ENCODER = {"source": PRESET, "subfolder": "image_encoder"}


def encoder_block(weights: IPAdapterWeights | None = None) -> IPAdapterBlock:
    weights = weights or IPAdapterWeights(source=PRESET, weight_name=WEIGHT_NAME)
    return IPAdapterBlock({"model": ENCODER, "weights": weights.model_dump()})


@pytest.fixture(scope="module")
def second_weights(tmp_path_factory):
    """Another adapter for the tiny UNet: the same shapes, other weights, in a folder of its own."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("second")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        save_file(build_ip_adapter_weights(preset_config("tiny", "unet"), 32), str(folder / "b.safetensors"))
    return IPAdapterWeights(source=str(folder), weight_name="b.safetensors")


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "condition": torch.randn(1, 77, 32, generator=g),
        "condition_uncond": torch.randn(1, 77, 32, generator=g),
    }


def reference(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def diffusers_prediction(unet, weights, prompts, inputs):
    """diffusers' own path: a copy of the UNet with the adapters loaded as `pipe.load_ip_adapter` loads them."""
    unet = copy.deepcopy(unet)
    unet._load_ip_adapter_weights([read_weights(w) for w in weights], low_cpu_mem_usage=False)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [p.scale for p in prompts]
    batch = inputs["sample"].shape[0]
    embeds = [
        torch.cat([p.uncond_embeds.expand(batch, -1, -1), p.embeds.expand(batch, -1, -1)]) for p in prompts
    ]
    condition = torch.cat(
        [inputs["condition_uncond"].expand(batch, -1, -1), inputs["condition"].expand(batch, -1, -1)]
    )
    with torch.no_grad():
        pred = unet(
            torch.cat([inputs["sample"]] * 2),
            inputs["timestep"],
            encoder_hidden_states=condition,
            added_cond_kwargs={"image_embeds": embeds},
        ).sample
    uncond, cond = pred.chunk(2)
    return cond, uncond


def test_one_and_two_adapters_match_diffusers_and_leave_no_trace(unet_inputs, second_weights):
    first = encoder_block()(image=reference(1), scale=0.8)["ip_adapter"]
    second = encoder_block(second_weights)(image=reference(2), scale=0.5)["ip_adapter"]
    assert first.embeds.shape == (1, 1, 32) and not first.uncond_embeds.any()  # zeros: the negative branch

    block = UNet2DBackboneBlock(model={"source": "preset:tiny", "subfolder": "unet"})
    unet = block.model
    keys, config = list(unet.state_dict()), dict(unet.config)
    plain = block(**unet_inputs)
    preds = []
    for prompts in ([first], [first, second]):
        got = block(**unet_inputs, ip_adapter=prompts if len(prompts) > 1 else prompts[0])
        cond, uncond = diffusers_prediction(unet, [p.weights for p in prompts], prompts, unet_inputs)
        assert (got["pred"] - cond).abs().max() <= 1e-5 and (got["pred_uncond"] - uncond).abs().max() <= 1e-5
        assert not torch.allclose(got["pred"], plain["pred"], atol=1e-3)
        preds.append(got["pred"])

    # Between calls the UNet is the plain one: same prediction, same state dict and config (what a checkpoint
    # of any graph on it saves); switching back to the first adapter gives its prediction again.
    assert torch.equal(block(**unet_inputs)["pred"], plain["pred"])
    assert list(unet.state_dict()) == keys and dict(unet.config) == config
    assert torch.equal(block(**unet_inputs, ip_adapter=first)["pred"], preds[0])


@pytest.mark.parametrize(
    "image",
    [42, torch.rand(1, 4, 32, 32), "/no/such/reference.png", [torch.rand(3, 32, 32), object()]],
    ids=["number", "four-channels", "missing-file", "list-with-a-stranger"],
)
def test_what_is_not_an_image_is_refused_at_the_image_input(image):
    block = encoder_block()
    with pytest.raises(ConfigError) as err:
        block.check_inputs({"image": image})
    assert err.value.path == "image"
    with pytest.raises(ConfigError, match="not a reference image|image must be"):
        block(image=image)


def test_a_graph_names_the_node_and_its_input():
    from worldgen.preflight import preflight

    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=1, ip_adapter={"model": PRESET})
    with pytest.raises(ConfigError, match=r"node 'ip_adapter'") as err:
        preflight(graph, {"prompt": PROMPT, "ip_adapter_image": "not-an-image.png"})
    assert err.value.path == "inputs.ip_adapter_image"


def test_a_backbone_without_cross_attention_is_refused(unet_inputs):
    from diffusers import UNet2DConditionModel

    config = preset_config("tiny", "unet") | {
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2D",  # self-attention only
    }
    block = UNet2DBackboneBlock(model={"source": "preset:tiny", "subfolder": "unet"})
    block.set_model(UNet2DConditionModel(**config).eval(), origin="test")
    processors = dict(block.model.attn_processors)
    prompt = encoder_block()(image=reference(1))["ip_adapter"]
    with pytest.raises(ConfigError, match="needs a backbone with cross-attention") as err:
        block(**unet_inputs, ip_adapter=prompt)
    assert err.value.path == "ip_adapter"
    assert block.model.attn_processors == processors  # the UNet itself is untouched


def test_weights_with_other_keys_or_another_unets_layers_are_refused(unet_inputs, tmp_path):
    from safetensors.torch import save_file

    embeds = torch.zeros(1, 1, 32)
    block = UNet2DBackboneBlock(model={"source": "preset:tiny", "subfolder": "unet"})
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    other = IPAdapterWeights(source=str(tmp_path), weight_name="lora.safetensors")
    with pytest.raises(ConfigError, match=r"no IP-Adapter weights file.*unet.conv_in.weight") as err:
        block(**unet_inputs, ip_adapter=ImagePrompt(embeds, embeds, other, 1.0))
    assert err.value.path == "ip_adapter"

    sdxl = IPAdapterWeights(source="preset:ip-adapter-sdxl-tiny", weight_name=WEIGHT_NAME)
    with pytest.raises(ConfigError, match=r"made for another UNet") as err:
        block(**unet_inputs, ip_adapter=ImagePrompt(embeds, embeds, sdxl, 1.0))
    assert err.value.path == "ip_adapter"

    with pytest.raises(ConfigError, match=r"adapter/ip_adapter") as err:
        block(**unet_inputs, ip_adapter=embeds)
    assert err.value.path == "ip_adapter"


def test_the_encoder_is_the_presets_clip_vision_model():
    encoder = build_preset_component("ip-adapter-tiny", "image_encoder")
    assert type(encoder).__name__ == "CLIPVisionModelWithProjection"
    assert encoder_block().model_class() is type(encoder)
