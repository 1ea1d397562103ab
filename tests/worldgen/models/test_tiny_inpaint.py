"""Inpainting presets (worldgen/models/tiny_inpaint.py): registered for their families under the inpaint pipelines'
class names (so family detection finds them, from a saved directory too), their base presets with a 9-channel UNet
of its own weights and every other component the base's very weights."""

from __future__ import annotations

import json

import pytest

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, get_preset, preset_config, save_preset_pipeline
from worldgen.templates.families import detect_family

PRESETS = [
    ("inpaint-tiny", "tiny", "sd", "StableDiffusionInpaintPipeline"),
    ("sdxl-inpaint-tiny", "sdxl-tiny", "sdxl", "StableDiffusionXLInpaintPipeline"),
]


@pytest.mark.parametrize(("name", "base", "family", "pipeline"), PRESETS)
def test_inpaint_presets_are_their_base_with_an_inpainting_unet(name, base, family, pipeline):
    preset = get_preset(name)
    assert (preset.family, preset.pipeline_class) == (family, pipeline)
    assert detect_family(f"preset:{name}").name == family
    assert set(preset.components) == set(get_preset(base).components)
    unet, base_unet = preset_config(name, "unet"), preset_config(base, "unet")
    assert unet["in_channels"] == 9 and {**unet, "in_channels": 4} == base_unet
    assert preset.components["unet"].seed != get_preset(base).components["unet"].seed
    for component in ("vae", "text_encoder"):
        assert preset_config(name, component) == preset_config(base, component)
    assert_same_weights(build_preset_component(name, "vae"), build_preset_component(base, "vae"))


def test_a_saved_inpaint_preset_is_detected_from_its_directory(tmp_path):
    path = save_preset_pipeline("inpaint-tiny", tmp_path / "inpaint")
    assert (
        json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    )
    assert detect_family(str(path)).name == "sd"
