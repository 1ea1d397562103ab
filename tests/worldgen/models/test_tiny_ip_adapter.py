"""The IP-Adapter presets (worldgen/models/tiny_ip_adapter.py): seeded, in the format diffusers' loader reads, each
fitting its base preset's UNet, and written out as an h94-style folder."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component, preset_config, preset_names
from worldgen.models.tiny_ip_adapter import (
    IMAGE_ENCODER,
    WEIGHT_NAME,
    build_ip_adapter_weights,
    cross_attention_layers,
    preset_base,
    save_preset_ip_adapter,
)
from worldgen.nodes.ip_adapter import IPAdapterWeights, check_fits, read_weights

PRESETS = {"ip-adapter-tiny": "tiny", "ip-adapter-sdxl-tiny": "sdxl-tiny"}


def meta_unet(base: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(preset_config(base, "unet"))


def test_each_preset_fits_its_base_unet_and_not_the_other():
    assert set(PRESETS) <= set(preset_names("ip_adapter"))
    for name, base in PRESETS.items():
        assert preset_base(name) == base
        state = read_weights(IPAdapterWeights(source=f"preset:{name}", weight_name=WEIGHT_NAME))
        unet = meta_unet(base)
        check_fits(state, unet, name)
        # The file numbers the cross-attention layers as diffusers' loader counts them: 1, 3, 5, ...
        assert sorted({int(k.split(".")[0]) for k in state["ip_adapter"]}) == [
            2 * i + 1 for i in range(len(cross_attention_layers(unet)))
        ]
        other = meta_unet(next(b for b in PRESETS.values() if b != base))
        with pytest.raises(ConfigError, match="made for another UNet"):
            check_fits(state, other, name)


def test_weights_are_seeded_and_the_folder_is_what_load_ip_adapter_reads(tmp_path):
    first = build_preset_component("ip-adapter-tiny", WEIGHT_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the caller's global seed does not matter
        again = build_preset_component("ip-adapter-tiny", WEIGHT_NAME)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    fresh = build_ip_adapter_weights(preset_config("tiny", "unet"), 32)
    assert fresh.keys() == first.keys() and not torch.equal(
        fresh["image_proj.proj.weight"], first["image_proj.proj.weight"]
    )

    folder = save_preset_ip_adapter("ip-adapter-tiny", tmp_path / "ipa")
    assert (folder / IMAGE_ENCODER / "config.json").is_file()
    with safe_open(str(folder / WEIGHT_NAME), "pt") as weights:
        keys = set(weights.keys())
    assert keys == set(first) and {k.split(".")[0] for k in keys} == {"image_proj", "ip_adapter"}
