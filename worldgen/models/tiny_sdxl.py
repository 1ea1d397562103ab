"""SDXL presets: `sdxl-tiny` and `sdxl-small` (StableDiffusionXLPipeline) and `sdxl-refiner-tiny`
(StableDiffusionXLImg2ImgPipeline as the SDXL refiner is: no first text encoder, aesthetic-score time ids).

The shapes follow diffusers' own SDXL pipeline tests: a two-level UNet with `text_time` added conditioning whose
cross-attention width is the two CLIP encoders' hidden sizes together, and whose added embedding takes six time
ids (five for the refiner) of `addition_time_embed_dim` each plus text_encoder_2's projection. The refiner shares
the base's VAE and text_encoder_2 (same config, same seed: the same weights), so a base + refiner graph can load
them once from the base, as diffusers' docs load the refiner.
"""

from __future__ import annotations

from typing import Any

from worldgen.models.presets import Component, Preset, register_preset
from worldgen.models.tiny import clip_text_component, clip_tokenizer_component

# One fixed seed per component; the refiner's VAE and text_encoder_2 take the base's (the same weights).
_SEEDS: dict[str, int] = {"unet": 10, "vae": 11, "text_encoder": 12, "text_encoder_2": 13, "refiner_unet": 14}

_TIME_ID_DIM = 8  # addition_time_embed_dim (256 in SDXL)

# SDXL base's scheduler_config.json (EulerDiscreteScheduler, "leading" spacing).
_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}


def _clip(hidden: int, layers: int = 5) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 37 if hidden == 32 else 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
    }


def _vae(sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64],
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.13025,  # SDXL's VAE
    }


def _unet(sample_size: int, cross_attention_dim: int, projection_dim: int, time_ids: int) -> dict[str, Any]:
    return {
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": cross_attention_dim,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_ID_DIM,
        "projection_class_embeddings_input_dim": time_ids * _TIME_ID_DIM + projection_dim,
    }


_BASE_FLAGS = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}


def _base(name: str, description: str, sample_size: int, hidden: int) -> Preset:
    text = _clip(hidden)
    return Preset(
        name=name,
        family="sdxl",
        pipeline_class="StableDiffusionXLPipeline",
        description=description,
        components={
            "unet": Component(
                "diffusers.UNet2DConditionModel",
                _unet(sample_size, 2 * hidden, hidden, time_ids=6),
                _SEEDS["unet"],
            ),
            "vae": Component("diffusers.AutoencoderKL", _vae(2 * sample_size), _SEEDS["vae"]),
            "text_encoder": clip_text_component(text, _SEEDS["text_encoder"]),
            "text_encoder_2": clip_text_component(text, _SEEDS["text_encoder_2"], projection=True),
            "tokenizer": clip_tokenizer_component(),
            "tokenizer_2": clip_tokenizer_component(),
            "scheduler": Component("diffusers.EulerDiscreteScheduler", _SCHEDULER),
        },
        pipeline_extra=_BASE_FLAGS,
    )


# For unit tests: as small as diffusers' own SDXL pipeline tests (32x32 images, 16x16 latents).
register_preset(
    _base("sdxl-tiny", "test-sized SDXL: 32x32 images, UNet (32, 64), two CLIPs of hidden 32", 16, 32)
)
# For benchmarks: 64x64 images (32x32 latents), CLIPs of hidden 64: one UNet call is tens of ms on a CPU.
register_preset(
    _base("sdxl-small", "benchmark-sized SDXL: 64x64 images, UNet (32, 64), two CLIPs of hidden 64", 32, 64)
)

# The refiner: text_encoder_2 only, a UNet conditioned on it alone (cross-attention 32) with five time ids
# (original size, crop, aesthetic score), and the base's VAE and text_encoder_2.
_REFINER_TEXT = _clip(32)
register_preset(
    Preset(
        name="sdxl-refiner-tiny",
        family="sdxl",
        pipeline_class="StableDiffusionXLImg2ImgPipeline",
        description="test-sized SDXL refiner for sdxl-tiny: text_encoder_2 only, aesthetic-score time ids",
        components={
            "unet": Component(
                "diffusers.UNet2DConditionModel", _unet(16, 32, 32, time_ids=5), _SEEDS["refiner_unet"]
            ),
            "vae": Component("diffusers.AutoencoderKL", _vae(32), _SEEDS["vae"]),
            "text_encoder_2": clip_text_component(_REFINER_TEXT, _SEEDS["text_encoder_2"], projection=True),
            "tokenizer_2": clip_tokenizer_component(),
            "scheduler": Component("diffusers.EulerDiscreteScheduler", _SCHEDULER),
        },
        # As stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json.
        pipeline_extra={
            "text_encoder": None,
            "tokenizer": None,
            "requires_aesthetics_score": True,
            "force_zeros_for_empty_prompt": False,
            "add_watermarker": False,
        },
    )
)
