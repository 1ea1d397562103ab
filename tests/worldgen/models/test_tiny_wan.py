"""Wan presets (worldgen/models/tiny_wan.py): registered as the wan family, components that fit each other (as
WanPipeline / WanImageToVideoPipeline need them), the real checkpoints' scheduler, deterministic per component."""

from __future__ import annotations

import torch

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, get_preset, preset_config, preset_names
from worldgen.models.tiny import build_t5_tokenizer
from worldgen.templates.families import detect_family


def test_wan_presets_are_registered_for_the_family_and_detected_as_it():
    assert set(preset_names("wan")) == {"wan-tiny", "wan-i2v-tiny", "wan22-ti2v-tiny"}
    assert get_preset("wan-tiny").pipeline_class == "WanPipeline"
    assert get_preset("wan-i2v-tiny").pipeline_class == "WanImageToVideoPipeline"
    for name in preset_names("wan"):
        assert detect_family(f"preset:{name}").name == "wan"  # from the model_index.json it would save


def test_components_fit_each_other():
    for name in preset_names("wan"):
        transformer, vae = preset_config(name, "transformer"), preset_config(name, "vae")
        umt5 = preset_config(name, "text_encoder")
        assert transformer["text_dim"] == umt5["d_model"]
        assert transformer["out_channels"] == vae["z_dim"]
        assert transformer["patch_size"] == [1, 2, 2]  # with the VAE's 8x: sizes are multiples of 16
        assert umt5["vocab_size"] > len(build_t5_tokenizer())
        scheduler = preset_config(name, "scheduler")  # Wan 2.1's own: UniPC on flow sigmas
        assert scheduler["use_flow_sigmas"] and scheduler["prediction_type"] == "flow_prediction"
    assert preset_config("wan-tiny", "transformer")["in_channels"] == 16
    assert preset_config("wan-tiny", "transformer")["image_dim"] is None
    i2v = preset_config("wan-i2v-tiny", "transformer")
    assert i2v["in_channels"] == 16 + 4 + 16  # noise, first-frame mask, first-frame latent
    assert i2v["image_dim"] == preset_config("wan-i2v-tiny", "image_encoder")["hidden_size"]
    # Wan 2.2 TI2V: the image's latent replaces the first frame, so the transformer takes the VAE's 48 channels
    # and no image embeddings; the VAE compresses 16x (sizes are multiples of 32).
    ti2v, vae22 = preset_config("wan22-ti2v-tiny", "transformer"), preset_config("wan22-ti2v-tiny", "vae")
    assert ti2v["in_channels"] == vae22["z_dim"] == 48 and ti2v["image_dim"] is None
    assert vae22["scale_factor_spatial"] == 16 and vae22["is_residual"]
    assert get_preset("wan22-ti2v-tiny").pipeline_extra["expand_timesteps"] is True
    processor = build_preset_component("wan-i2v-tiny", "image_processor")
    assert processor.crop_size["height"] == preset_config("wan-i2v-tiny", "image_encoder")["image_size"]


def test_components_are_deterministic_in_any_order():
    torch.manual_seed(5)
    encoder = build_preset_component("wan-i2v-tiny", "image_encoder")
    transformer = build_preset_component("wan-tiny", "transformer")
    torch.manual_seed(6)
    assert_same_weights(transformer, build_preset_component("wan-tiny", "transformer"))
    assert_same_weights(encoder, build_preset_component("wan-i2v-tiny", "image_encoder"))
