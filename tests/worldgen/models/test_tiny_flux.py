"""Flux presets (worldgen/models/tiny_flux.py): registered as the flux family, components that fit each other
(as a FluxPipeline needs them), schnell-like and dev-like as their names say, deterministic per component."""

from __future__ import annotations

import pytest
import torch

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import (
    build_preset_component,
    get_preset,
    preset_config,
    preset_name,
    preset_names,
)
from worldgen.models.tiny import build_t5_tokenizer, build_tokenizer


def test_flux_presets_are_registered_for_the_family():
    assert set(preset_names("flux")) == {"flux-tiny", "flux-dev-tiny", "flux-small"}
    assert preset_name("tiny", "flux") == "flux-tiny" and preset_name("small", "flux") == "flux-small"
    assert all(get_preset(name).pipeline_class == "FluxPipeline" for name in preset_names("flux"))


@pytest.mark.parametrize("name", ["flux-tiny", "flux-dev-tiny", "flux-small"])
def test_components_fit_each_other(name):
    transformer, vae = preset_config(name, "transformer"), preset_config(name, "vae")
    clip, t5 = preset_config(name, "text_encoder"), preset_config(name, "text_encoder_2")
    assert transformer["in_channels"] == 4 * vae["latent_channels"] == 64  # 2x2 patches of 16 channels
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # FLUX.1's VAE factor: sizes are multiples of 16
    assert vae["shift_factor"] and vae["scaling_factor"]
    assert transformer["joint_attention_dim"] == t5["d_model"]
    assert transformer["pooled_projection_dim"] == clip["hidden_size"]  # CLIPTextModel's pooler_output
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    assert clip["vocab_size"] > len(build_tokenizer()) and t5["vocab_size"] > len(build_t5_tokenizer())
    dev = name == "flux-dev-tiny"
    assert transformer["guidance_embeds"] is dev
    assert preset_config(name, "scheduler")["use_dynamic_shifting"] is dev  # as FLUX.1-dev / -schnell


def test_components_are_deterministic_in_any_order():
    torch.manual_seed(5)
    t5 = build_preset_component("flux-tiny", "text_encoder_2")
    transformer = build_preset_component("flux-tiny", "transformer")
    torch.manual_seed(6)
    assert_same_weights(transformer, build_preset_component("flux-tiny", "transformer"))
    assert_same_weights(t5, build_preset_component("flux-tiny", "text_encoder_2"))
