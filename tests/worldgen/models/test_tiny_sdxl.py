"""SDXL presets (worldgen/models/tiny_sdxl.py): registered for the family, the refiner's VAE and text_encoder_2 the
base's very weights (so one component serves both), UNets whose added conditioning fits their time ids."""

from __future__ import annotations

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, preset_config, preset_names
from worldgen.templates.families import family_components, model_index


def test_sdxl_presets_are_registered_for_the_family():
    assert {"sdxl-tiny", "sdxl-small", "sdxl-refiner-tiny"} <= set(preset_names("sdxl"))
    refiner = model_index("preset:sdxl-refiner-tiny")
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner["requires_aesthetics_score"] is True and refiner["force_zeros_for_empty_prompt"] is False
    assert "text_encoder" not in family_components("preset:sdxl-refiner-tiny")


def test_refiner_shares_the_base_vae_and_second_text_encoder():
    for name in ("vae", "text_encoder_2"):
        assert preset_config("sdxl-refiner-tiny", name) == preset_config("sdxl-tiny", name)
        assert_same_weights(
            build_preset_component("sdxl-tiny", name), build_preset_component("sdxl-refiner-tiny", name)
        )


def test_unets_take_their_time_ids_and_text_width():
    for preset, ids, width in [("sdxl-tiny", 6, 64), ("sdxl-small", 6, 128), ("sdxl-refiner-tiny", 5, 32)]:
        unet = preset_config(preset, "unet")
        projection = preset_config(preset, "text_encoder_2")["projection_dim"]
        assert (
            unet["projection_class_embeddings_input_dim"]
            == ids * unet["addition_time_embed_dim"] + projection
        )
        assert unet["cross_attention_dim"] == width
