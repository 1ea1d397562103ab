"""Stable Audio preset (worldgen/models/tiny_stable_audio.py): a StableAudioPipeline whose parts fit one another
(T5 width -> projection -> DiT, DiT channels = the VAE's latent), sized as diffusers' own tests size theirs, with
Stable Audio Open's scheduler, the same weights in any order of building."""

from __future__ import annotations

import diffusers
import torch

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, preset_names, preset_pipeline


def test_the_preset_is_listed_under_its_family():
    assert preset_names("stable-audio") == ["stable-audio-tiny"]


def test_the_preset_is_a_stable_audio_pipeline_whose_parts_fit():
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    pipe = preset_pipeline("stable-audio-tiny")
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the caller's generator alone
    assert isinstance(pipe, diffusers.StableAudioPipeline)
    assert isinstance(pipe.scheduler, diffusers.CosineDPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    dit, vae, projection = pipe.transformer.config, pipe.vae.config, pipe.projection_model.config
    assert projection.text_encoder_dim == pipe.text_encoder.config.d_model
    assert dit.cross_attention_input_dim == projection.conditioning_dim
    assert dit.global_states_input_dim == 2 * projection.conditioning_dim  # start and end side by side
    assert dit.in_channels == vae.decoder_input_channels and vae.audio_channels == 2
    assert pipe.text_encoder.config.vocab_size > len(pipe.tokenizer)
    # The longest clip: 8 latent steps x hop 4 / 16 Hz.
    assert dit.sample_size * pipe.vae.hop_length / vae.sampling_rate == 2.0
    assert_same_weights(pipe.transformer, build_preset_component("stable-audio-tiny", "transformer"))
    assert_same_weights(
        pipe.projection_model, build_preset_component("stable-audio-tiny", "projection_model")
    )


def test_the_pipeline_makes_stereo_of_the_asked_length():
    pipe = preset_pipeline("stable-audio-tiny")
    pipe.set_progress_bar_config(disable=True)
    audio = pipe("rain", num_inference_steps=2, audio_end_in_s=1.0, output_type="pt").audios
    assert audio.shape == (1, 2, 16) and torch.isfinite(audio).all()
