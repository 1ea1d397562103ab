"""Flux ControlNet presets (worldgen/models/tiny_flux.py): models of their own preset family that fit the
flux-tiny transformer, deterministic, with residual layers that are not zero (so control shows), loaded once
through the pool by their model reference, and no pipeline a graph could be built from."""

from __future__ import annotations

import pytest
import torch

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.errors import ConfigError
from worldgen.model_ref import ModelRef
from worldgen.models.presets import build_preset_component, get_preset, preset_config, preset_names

NAMES = ("flux-controlnet-tiny", "flux-controlnet-union-tiny")


def test_controlnet_presets_are_models_of_their_own_family():
    assert set(preset_names("controlnet")) >= set(NAMES)
    assert not set(NAMES) & set(preset_names("flux"))  # no Flux pipeline: the flux presets stay pipelines
    for name in NAMES:
        preset = get_preset(name)
        assert preset.pipeline_class == "FluxControlNetModel" and list(preset.components) == ["controlnet"]


@pytest.mark.parametrize("name", NAMES)
def test_controlnets_fit_the_flux_tiny_transformer(name):
    controlnet, transformer = preset_config(name, "controlnet"), preset_config("flux-tiny", "transformer")
    for key in ("in_channels", "num_attention_heads", "attention_head_dim", "joint_attention_dim"):
        assert controlnet[key] == transformer[key], key
    assert controlnet["pooled_projection_dim"] == transformer["pooled_projection_dim"]
    assert controlnet["conditioning_embedding_channels"] is None  # the InstantX kind: takes VAE latents
    assert (controlnet["num_mode"] is not None) is ("union" in name)


def test_controlnets_are_deterministic_with_residual_layers_that_act():
    torch.manual_seed(3)
    tiny = build_preset_component("flux-controlnet-tiny", "controlnet")
    torch.manual_seed(4)
    assert_same_weights(tiny, build_preset_component("flux-controlnet-tiny", "controlnet"))
    union = build_preset_component("flux-controlnet-union-tiny", "controlnet")
    assert not torch.equal(tiny.x_embedder.weight, union.x_embedder.weight)  # seeded apart
    # Trained ControlNets start these at zero; random ones would be no control at all.
    for layer in (tiny.controlnet_x_embedder, tiny.controlnet_blocks[0], tiny.controlnet_single_blocks[0]):
        assert layer.weight.abs().max() > 0 and layer.bias.abs().max() > 0


def test_a_controlnet_preset_loads_once_by_its_reference():
    from diffusers import FluxControlNetModel

    from worldgen.models.pool import default_pool

    ref = ModelRef(source="preset:flux-controlnet-tiny", subfolder="controlnet")
    first = default_pool().get(ref, FluxControlNetModel)
    assert default_pool().get(ModelRef(**ref.model_dump()), FluxControlNetModel) is first


def test_no_graph_is_built_from_a_controlnet_preset():
    import worldgen as wg

    with pytest.raises(ConfigError, match="FluxControlNetModel.*cannot build a graph"):
        wg.Graph.from_template("text_to_image", model="preset:flux-controlnet-tiny")
