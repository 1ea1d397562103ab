"""Flux ControlNet nodes (worldgen/nodes/flux_controlnet.py): the ControlNet called as FluxControlNetPipeline
calls it, chained nodes summing as FluxMultiControlNetModel, the control's start/end, the control image
resized as the pipeline's image processor does, the transformer taking the residuals; bad input refused
with the port named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxMultiControlNetModel, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component
from worldgen.nodes.diffusion import SolverState
from worldgen.nodes.flux_controlnet import FluxControl
from worldgen.registry import create_block

TINY = "preset:flux-controlnet-tiny"
UNION = "preset:flux-controlnet-union-tiny"


def _controlnet(source: str, **config) -> object:
    block = create_block(
        "adapter/flux_controlnet", {"model": {"source": source, "subfolder": "controlnet"}, **config}
    )
    block.set_model(build_preset_component(source.removeprefix("preset:"), "controlnet"))
    return block


def _inputs(**extra):
    gen = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 64, generator=gen),
        "controlnet_cond": torch.randn(1, 4, 64, generator=gen),
        "timestep": torch.tensor(750.0),
        "condition": torch.randn(1, 8, 32, generator=gen),
        "pooled": torch.randn(1, 32, generator=gen),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
        **extra,
    }


def _model_call(model, inputs, scale, mode=None):
    """The call FluxControlNetPipeline makes (one ControlNet) or FluxMultiControlNetModel (a list)."""
    kwargs = {
        "hidden_states": inputs["sample"],
        "timestep": torch.tensor([0.75]),
        "guidance": None,
        "pooled_projections": inputs["pooled"],
        "encoder_hidden_states": inputs["condition"],
        "txt_ids": torch.zeros(8, 3),
        "img_ids": inputs["img_ids"],
        "return_dict": False,
    }
    with torch.no_grad():
        if isinstance(model, FluxMultiControlNetModel):
            conds = [inputs["controlnet_cond"]] * len(model.nets)
            return model(controlnet_cond=conds, controlnet_mode=mode, conditioning_scale=scale, **kwargs)
        return model(
            controlnet_cond=inputs["controlnet_cond"],
            controlnet_mode=mode,
            conditioning_scale=scale,
            **kwargs,
        )


def test_controlnet_residuals_are_the_models_and_chained_nodes_sum_as_the_multi_model():
    first, union = _controlnet(TINY), _controlnet(UNION)
    blocks, singles = _model_call(first.model, _inputs(), 0.7)
    out = first(**_inputs(conditioning_scale=0.7))["control"]
    assert isinstance(out, FluxControl) and len(out.block_samples) == len(out.single_block_samples) == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(out.block_samples + out.single_block_samples, blocks + singles, strict=True)
    )
    assert out.block_samples[0].abs().max() > 0  # the preset's residual layers are not zero-initialised

    # A second node given the first's residuals adds its own, as FluxMultiControlNetModel merges its nets.
    chained = union(**_inputs(conditioning_scale=1.3, control_mode=2, control=out))["control"]
    multi = FluxMultiControlNetModel([first.model, union.model])
    mode = [torch.tensor([-1]), torch.tensor([2])]  # the pipeline's modes: -1 for a ControlNet given none
    expected = _model_call(multi, _inputs(), [0.7, 1.3], mode)
    got = chained.block_samples + chained.single_block_samples
    assert all(torch.equal(a, b) for a, b in zip(got, expected[0] + expected[1], strict=True))
    assert not torch.equal(chained.block_samples[0], out.block_samples[0])


def test_control_acts_between_start_and_end_only():
    block = _controlnet(TINY, start=0.25, end=0.75)

    def state(step: int) -> SolverState:
        return SolverState({}, torch.arange(4.0), step)

    # The pipeline's controlnet_keep over 4 steps for start 0.25, end 0.75: off, on, on, off.
    assert [block.keep(state(i)) for i in range(4)] == [0.0, 1.0, 1.0, 0.0]
    earlier = FluxControl((torch.ones(1, 4, 32),), (torch.ones(1, 4, 32),))
    # Outside the range the model is not called and an earlier ControlNet's residuals pass unchanged.
    assert block(**_inputs(state=state(0)))["control"] is None
    assert block(**_inputs(state=state(3), control=earlier))["control"] is earlier
    assert block(**_inputs(state=state(1), conditioning_scale=0.0))["control"] is None
    assert block(**_inputs(state=state(1)))["control"] is not None


def test_transformer_adds_the_residuals_in_both_true_cfg_calls():
    transformer = create_block("backbone/flux_transformer", {"model": "preset:flux-tiny"})
    transformer.set_model(build_preset_component("flux-tiny", "transformer"))
    control = _controlnet(TINY)(**_inputs())["control"]
    base = _inputs()
    inputs = {k: base[k] for k in ("sample", "timestep", "condition", "pooled", "img_ids")}
    negative = {"condition_uncond": torch.zeros(1, 8, 32), "pooled_uncond": torch.zeros(1, 32)}
    with torch.no_grad():
        expected = transformer.model(
            hidden_states=inputs["sample"],
            timestep=torch.tensor([0.75]),
            pooled_projections=inputs["pooled"],
            encoder_hidden_states=inputs["condition"],
            controlnet_block_samples=list(control.block_samples),
            controlnet_single_block_samples=list(control.single_block_samples),
            txt_ids=torch.zeros(8, 3),
            img_ids=inputs["img_ids"],
            return_dict=False,
        )[0]
    plain = transformer(**inputs, **negative, true_cfg_scale=2.0)
    out = transformer(**inputs, **negative, true_cfg_scale=2.0, control=control)
    assert torch.equal(out["pred"], expected)
    # FluxControlNetPipeline passes the (positive prompt's) residuals to the negative call too.
    assert not torch.equal(out["pred_uncond"], plain["pred_uncond"])

    wide = FluxControl((torch.zeros(1, 4, 64),), (torch.zeros(1, 4, 64),))
    with pytest.raises(
        ConfigError, match=r"residuals are 64 wide but this transformer's blocks are 32"
    ) as err:
        transformer(**inputs, control=wide)
    assert err.value.path == "control"


def test_control_image_is_resized_as_the_pipeline_prepares_it():
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    block = create_block("image/flux_control", {"height": 64, "width": 64, "multiple": 16})
    # FluxControlNetPipeline.prepare_image: its image processor (16: twice the VAE's factor) at height/width.
    expected = VaeImageProcessor(vae_scale_factor=16).preprocess(image, height=32, width=48)
    resized = block(image=image, height=32, width=48)["image"]
    assert resized[0].size == (48, 32)
    assert torch.equal(VaeImageProcessor(vae_scale_factor=16).preprocess(resized), expected)
    # Unset sizes are the config's; sizes are cut down to multiples of 16 as the processor cuts them.
    assert block(image=image)["image"][0].size == (64, 64)
    assert block(image=image, height=40, width=56)["image"][0].size == (48, 32)
    # Image to image: the init image's size (cut down to multiples of 16), whatever the config says.
    assert block(image=image, like=Image.new("RGB", (88, 72)))["image"][0].size == (80, 64)
    for like in (torch.rand(1, 3, 40, 56), torch.rand(3, 40, 56), [Image.new("RGB", (56, 40))]):
        assert block(image=image, like=like)["image"][0].size == (48, 32)
    # A [0, 1] tensor is resized the same way.
    assert block(image=torch.rand(3, 40, 56), height=32, width=48)["image"].shape == (1, 3, 32, 48)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(1, 4, 32, 32), r"RGB.*\(1, 4, 32, 32\)"),
        (torch.rand(1, 32, 32), r"RGB.*\(1, 32, 32\)"),
        (Image.new("L", (32, 32)), r"mode 'L'"),
        ("edges.png", "a PIL image or a tensor, got str"),
    ],
)
def test_control_image_refuses_what_is_not_rgb(image, message):
    block = create_block("image/flux_control")
    for check in (block.check_inputs, lambda inputs: block(**inputs)):
        with pytest.raises(ConfigError, match=message) as err:
            check({"image": image})
        assert err.value.path == "image"


def test_controlnet_refuses_inputs_it_cannot_take():
    block = _controlnet(TINY)
    with pytest.raises(
        ConfigError, match=r"controlnet_cond must be packed latent tokens \(B, tokens, 64\)"
    ) as err:
        block(**_inputs(controlnet_cond=torch.zeros(1, 4, 16)))
    assert err.value.path == "controlnet_cond"
    with pytest.raises(ConfigError, match="control latent has 16 tokens but the latent 4") as err:
        block(**_inputs(controlnet_cond=torch.zeros(1, 16, 64)))
    assert err.value.path == "controlnet_cond"
    union = _controlnet(UNION)
    unloaded = create_block(
        "adapter/flux_controlnet", {"model": {"source": UNION, "subfolder": "controlnet"}}
    )
    for mode in (None, 4):
        with pytest.raises(ConfigError, match="union ControlNet needs control_mode, one of 0 to 3") as err:
            union(**_inputs(control_mode=mode))
        assert err.value.path == "control_mode"
        # Before a run, by the config alone (no weights load).
        with pytest.raises(ConfigError, match="union ControlNet needs control_mode") as err:
            unloaded.check_inputs({"control_mode": mode})
        assert err.value.path == "control_mode" and not unloaded.model_loaded
    unloaded.check_inputs({"control_mode": 3})
    block.check_inputs({"control_mode": None})  # a ControlNet of one kind takes none
    for port, value in (("conditioning_scale", "strong"), ("control_mode", -1), ("guidance", True)):
        with pytest.raises(ConfigError) as err:
            block.check_inputs({port: value})
        assert err.value.path == port
