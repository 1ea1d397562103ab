"""SD3 presets (worldgen/models/tiny_sd3.py): StableDiffusion3Pipelines with all three text encoders, SD3's VAE
latents and scheduler shift, tokenizers that fit their encoders, the same weights in any order of building."""

from __future__ import annotations

import diffusers
import pytest
import torch

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, preset_names, preset_pipeline


def test_presets_listed_under_their_family():
    assert {"sd3-tiny", "sd3-small"} <= set(preset_names("sd3"))


@pytest.mark.parametrize("name", ["sd3-tiny", "sd3-small"])
def test_a_preset_is_an_sd3_pipeline_with_sd3s_latents(name):
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    pipe = preset_pipeline(name)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    vae, transformer = pipe.vae.config, pipe.transformer.config
    assert vae.latent_channels == transformer.in_channels == 16 and vae.shift_factor == 0.0609
    assert pipe.scheduler.config.shift == 3.0
    # The condition's widths agree: T5's width is the joint width, the CLIP projections sum to the pooled one.
    assert pipe.text_encoder_3.config.d_model == transformer.joint_attention_dim
    clip = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert clip == transformer.pooled_projection_dim
    for tok, te in [
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
        ("tokenizer_3", "text_encoder_3"),
    ]:
        assert getattr(pipe, te).config.vocab_size > len(getattr(pipe, tok))
    # One component alone has the weights it has in the pipeline.
    assert_same_weights(pipe.transformer, build_preset_component(name, "transformer"))
    assert_same_weights(pipe.text_encoder_3, build_preset_component(name, "text_encoder_3"))
