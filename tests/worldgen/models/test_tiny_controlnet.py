"""The ControlNet presets (worldgen/models/tiny_controlnet.py): each is its base preset's pipeline plus a
ControlNet built for that UNet (the config ControlNetModel.from_unet derives), with live output convolutions and
the same weights however it is built."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from worldgen.models.presets import build_preset_component, get_preset, preset_config


@pytest.mark.parametrize(
    ("name", "base"), [("controlnet-tiny", "tiny"), ("sdxl-controlnet-tiny", "sdxl-tiny")]
)
def test_a_controlnet_preset_fits_its_base_unet_as_from_unet_would_build_it(name, base):
    preset = get_preset(name)
    assert preset.family == get_preset(base).family
    assert set(preset.components) == set(get_preset(base).components) | {"controlnet"}
    unet = UNet2DConditionModel(**preset_config(base, "unet"))
    derived = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).config
    ours = preset_config(name, "controlnet")

    def plain(value):
        return list(value) if isinstance(value, list | tuple) else value

    assert {k: plain(derived[k]) for k in ours} == {k: plain(v) for k, v in ours.items()}


def test_the_controlnet_outputs_are_live_and_seeded():
    first = build_preset_component("controlnet-tiny", "controlnet")
    again = build_preset_component("controlnet-tiny", "controlnet")
    other = build_preset_component("controlnet-tiny-b", "controlnet")
    assert first.controlnet_mid_block.weight.abs().max() > 0  # diffusers would start them at zero
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not torch.equal(first.controlnet_mid_block.weight, other.controlnet_mid_block.weight)
