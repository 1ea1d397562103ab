"""Families (worldgen/templates/families.py): text_to_image / image_to_image find a model's family from its
model_index.json as DiffusionPipeline.from_pretrained does; what cannot be built is a clear error."""

from __future__ import annotations

import json

import pytest

import worldgen as wg
from worldgen.errors import ConfigError
from worldgen.templates.families import detect_family, families, family_components, model_index


def test_every_family_is_registered_with_its_pipelines():
    known = families()
    assert "sd" in known and "StableDiffusionPipeline" in known["sd"].pipelines
    assert detect_family("preset:tiny").name == "sd"


def test_a_save_pretrained_directory_is_detected(tiny_sd_dir):
    assert detect_family(str(tiny_sd_dir)).name == "sd"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= family_components(str(tiny_sd_dir))
    graph = wg.Graph.from_template("text_to_image", model=str(tiny_sd_dir), steps=2)
    assert graph.block("unet").block_type == "backbone/unet2d"


def test_an_unsupported_pipeline_names_itself_and_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ConfigError) as err:
        wg.Graph.from_template("text_to_image", model=str(tmp_path))
    message = str(err.value)
    assert "KandinskyV22Pipeline" in message and "StableDiffusionPipeline (sd)" in message
    assert "model_index.json" in message


def test_a_directory_without_model_index_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"no model_index\.json.*found: unet"):
        wg.Graph.from_template("text_to_image", model=str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        model_index(str(tmp_path))


def test_family_override_and_options_are_checked():
    with pytest.raises(ConfigError, match=r"unknown model family 'sdx'"):
        wg.Graph.from_template("text_to_image", preset="tiny", family="sdx")
    with pytest.raises(ConfigError, match=r"no parameter 'stepz'.*did you mean 'steps'"):
        wg.Graph.from_template("text_to_image", preset="tiny", stepz=2)
    with pytest.raises(ConfigError, match="give exactly one of `model`"):
        wg.Graph.from_template("text_to_image")
    graph = wg.Graph.from_template("text_to_image", preset="tiny", family="sd", steps=2)
    assert graph.block("schedule").config.num_inference_steps == 2


def test_a_hub_id_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    with pytest.raises(ConfigError, match="cannot read model_index.json of 'nobody/no-such-model'"):
        wg.Graph.from_template("text_to_image", model="nobody/no-such-model")
