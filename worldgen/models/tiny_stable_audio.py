"""Stable Audio Open preset (`stable-audio-tiny`): `StableAudioPipeline` with its latent DiT
(`StableAudioDiTModel`), the Oobleck VAE (stereo waveform <-> latent sequence), a T5 encoder (T5 v1.0 as
t5-base) and the projection model that maps T5's sequence and the seconds start/end numbers into the DiT's
conditioning width, with Stable Audio Open's cosine DPM-Solver scheduler.

Sized like diffusers' own StableAudio pipeline tests: a latent of 8 steps of 4 channels, 4 waveform samples per
latent step (hop length), 16 samples a second, so the model makes at most 8 x 4 / 16 = 2 seconds of stereo.
The T5 tokenizer is the presets' shared one (worldgen/models/tiny.py) cut to 64 tokens, as the real model's
tokenizer is to 128.
"""

from __future__ import annotations

from typing import Any

from worldgen.models.presets import Component, Preset, register_preset
from worldgen.models.tiny import build_t5_tokenizer

# One fixed seed per component, so that building one component alone gives the weights the pipeline has.
_SEEDS: dict[str, int] = {"transformer": 50, "vae": 51, "text_encoder": 52, "projection_model": 53}

# stable-audio-open-1.0's scheduler_config.json (the class defaults, written out so the preset says them).
_SCHEDULER: dict[str, Any] = {
    "sigma_min": 0.3,
    "sigma_max": 500.0,
    "sigma_data": 1.0,
    "sigma_schedule": "exponential",
    "solver_order": 2,
    "prediction_type": "v_prediction",
    "final_sigmas_type": "zero",
}

_TOKENS = 64  # the tokenizer's model_max_length: the pipeline pads every prompt to it
_T5_WIDTH = 32
_CONDITIONING = (
    16  # the projection model's output width: the DiT's cross-attention input (and half its global)
)

_TRANSFORMER: dict[str, Any] = {
    "sample_size": 8,  # latent steps the pipeline always denoises (the longest clip)
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_attention_heads": 2,  # grouped-query attention, as the real DiT
    "cross_attention_dim": 32,
    "time_proj_dim": 16,
    "global_states_input_dim": 2 * _CONDITIONING,  # seconds start and end, concatenated
    "cross_attention_input_dim": _CONDITIONING,
}

_VAE: dict[str, Any] = {
    "encoder_hidden_size": 8,  # twice the latent channels: the encoder's mean and scale
    "downsampling_ratios": [2, 2],  # hop length 4
    "channel_multiples": [2, 4],
    "decoder_channels": 8,
    "decoder_input_channels": 4,
    "audio_channels": 2,
    "sampling_rate": 16,
}

_PROJECTION: dict[str, Any] = {
    "text_encoder_dim": _T5_WIDTH,
    "conditioning_dim": _CONDITIONING,
    "min_value": 0,
    "max_value": 512,  # the real model's seconds range
}

_T5: dict[str, Any] = {
    "vocab_size": 128,  # above the shared T5 tokenizer's 93 pieces
    "d_model": _T5_WIDTH,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "relu",  # T5 v1.0, as Stable Audio Open's t5-base
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
}


def _tokenizer(_config: Any) -> Any:
    tokenizer = build_t5_tokenizer()
    tokenizer.model_max_length = _TOKENS
    return tokenizer


register_preset(
    Preset(
        name="stable-audio-tiny",
        family="stable-audio",
        pipeline_class="StableAudioPipeline",
        description="test-sized Stable Audio Open: 2 s of 16 Hz stereo, DiT 2 layers x 32 wide, T5 32, Oobleck x4",
        components={
            "transformer": Component("diffusers.StableAudioDiTModel", _TRANSFORMER, _SEEDS["transformer"]),
            "vae": Component("diffusers.AutoencoderOobleck", _VAE, _SEEDS["vae"]),
            "text_encoder": Component("transformers.T5EncoderModel", _T5, _SEEDS["text_encoder"]),
            "projection_model": Component(
                "diffusers.StableAudioProjectionModel", _PROJECTION, _SEEDS["projection_model"]
            ),
            "tokenizer": Component("transformers.T5TokenizerFast", build=_tokenizer),
            "scheduler": Component("diffusers.CosineDPMSolverMultistepScheduler", _SCHEDULER),
        },
    )
)
