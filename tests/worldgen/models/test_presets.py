"""The preset registry (worldgen/models/presets.py): presets by family, saved as real diffusers directories."""

from __future__ import annotations

import json

import pytest

from worldgen.errors import ModelLoadError
from worldgen.models.presets import get_preset, preset_name, preset_names, save_preset_pipeline


def test_presets_are_named_by_family():
    assert {"tiny", "small"} <= set(preset_names("sd"))
    assert preset_name("tiny") == "tiny" and preset_name("tiny", "sd") == "tiny"
    assert preset_name("tiny", "flux") == "flux-tiny" and preset_name("flux-tiny", "flux") == "flux-tiny"
    for name in preset_names():
        preset = get_preset(name)
        assert preset.description and preset.components, name


def test_a_saved_preset_is_a_diffusers_directory_of_its_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    path = save_preset_pipeline("tiny", tmp_path / "tiny")
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert list(path.rglob("*.safetensors")) and not list(path.rglob("*.bin"))
    assert type(DiffusionPipeline.from_pretrained(path)).__name__ == "StableDiffusionPipeline"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"unknown model preset 'tinny'.*did you mean 'tiny'"):
        get_preset("tinny")
