"""Upscaler presets: `upscale-tiny` (StableDiffusionUpscalePipeline, the x4 upscaler) and `latent-upscale-tiny`
(StableDiffusionLatentUpscalePipeline, the x2 latent upscaler).

`upscale-tiny` keeps the x4 upscaler's interfaces at toy widths: a UNet taking the 4 latent channels plus the 3
channels of the noised low-res image (in_channels 7) with the noise level as a class embedding, a VAE of three
blocks (4x downsampling, so the latents have the low-res image's size and the output is 4x it) with the x4
VAE's scaling factor, a DDIM scheduler predicting v and a DDPM `low_res_scheduler` that noises the image.

`latent-upscale-tiny` keeps the x2 latent upscaler's: a UNet of K-diffusion blocks (fourier time embedding,
1x1 in/out convolutions) taking the latents plus the 2x upscaled image latents (in_channels 8), predicting
one extra channel the pipeline drops, with the noise-level embedding (128) and the pooled text embedding as
its `timestep_cond`; an Euler scheduler predicting the sample. Its VAE and text encoder are the `tiny`
preset's (same config, same seed: the same weights), as sd-x2-latent-upscaler works on SD 1.x's latents, so
a text-to-image graph on `tiny` and an upscaler graph load them once.
"""

from __future__ import annotations

from typing import Any

import worldgen.models.tiny  # noqa: F401  (registers `tiny`, whose VAE and text encoder the x2 preset takes)
from worldgen.models.presets import Component, Preset, get_preset, register_preset
from worldgen.models.tiny import PRESETS, clip_text_component, clip_tokenizer_component

_SEEDS: dict[str, int] = {"unet": 20, "vae": 21, "text_encoder": 22, "latent_unet": 23}

# The x4 upscaler's schedules (stabilityai/stable-diffusion-x4-upscaler): v-prediction DDIM for denoising, DDPM
# for the low-res image's noise; both scaled-linear from 1e-4 to 2e-2.
_X4_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
}
_X4_SCHEDULER: dict[str, Any] = {
    **_X4_BETAS,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
MAX_NOISE_LEVEL = 350  # the x4 pipeline's `max_noise_level`

_X4_UNET: dict[str, Any] = {
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 7,  # 4 latent channels + the 3 of the noised low-res image
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "use_linear_projection": True,
    "only_cross_attention": [True, True, False],
    "num_class_embeds": 1000,  # one embedding per noise level, as the real UNet
}
_X4_VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.08333,  # the x4 VAE's (the pipeline rewrites any other value to it)
}
_SD2_TEXT: dict[str, Any] = {**PRESETS["tiny"]["text_encoder"], "hidden_act": "gelu"}  # SD 2.x's OpenCLIP

register_preset(
    Preset(
        name="upscale-tiny",
        family="upscale",
        pipeline_class="StableDiffusionUpscalePipeline",
        description="test-sized x4 upscaler: UNet (32, 32, 64) on latents + the noised low-res image, 3-block VAE",
        components={
            "unet": Component("diffusers.UNet2DConditionModel", _X4_UNET, _SEEDS["unet"]),
            "vae": Component("diffusers.AutoencoderKL", _X4_VAE, _SEEDS["vae"]),
            "text_encoder": clip_text_component(_SD2_TEXT, _SEEDS["text_encoder"]),
            "tokenizer": clip_tokenizer_component(),
            "scheduler": Component("diffusers.DDIMScheduler", _X4_SCHEDULER),
            "low_res_scheduler": Component("diffusers.DDPMScheduler", _X4_BETAS),
        },
        pipeline_extra={
            "safety_checker": None,
            "feature_extractor": None,
            "watermarker": None,
            "max_noise_level": MAX_NOISE_LEVEL,
        },
    )
)

NOISE_LEVEL_EMBED = 128  # the x2 pipeline's noise-level embedding: 64 ones and 64 zeros (noise level 0)
_TINY = get_preset("tiny")

_X2_UNET: dict[str, Any] = {
    "act_fn": "gelu",
    "attention_head_dim": 8,
    "norm_num_groups": None,
    "block_out_channels": [32, 64, 64],  # the K blocks need a wider level after the first
    "time_cond_proj_dim": NOISE_LEVEL_EMBED + _TINY.components["text_encoder"].config["hidden_size"],
    "conv_in_kernel": 1,
    "conv_out_kernel": 1,
    "cross_attention_dim": _TINY.components["text_encoder"].config["hidden_size"],
    "down_block_types": ["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    "up_block_types": ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
    "in_channels": 8,  # 4 latent channels + the 4 of the upscaled image latents
    "out_channels": 5,  # the pipeline drops the last one
    "mid_block_type": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "scale_shift",
    "time_embedding_type": "fourier",
    "timestep_post_act": "gelu",
    "sample_size": 16,
}
# sd-x2-latent-upscaler's scheduler: Euler on SD's betas, the UNet (preconditioned) predicting the sample.
_X2_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "sample",
}

register_preset(
    Preset(
        name="latent-upscale-tiny",
        family="latent-upscale",
        pipeline_class="StableDiffusionLatentUpscalePipeline",
        description="test-sized x2 latent upscaler for `tiny`: K-diffusion UNet (32, 64, 64), tiny's VAE and CLIP",
        components={
            "unet": Component("diffusers.UNet2DConditionModel", _X2_UNET, _SEEDS["latent_unet"]),
            "vae": _TINY.components["vae"],
            "text_encoder": _TINY.components["text_encoder"],
            "tokenizer": clip_tokenizer_component(),
            "scheduler": Component("diffusers.EulerDiscreteScheduler", _X2_SCHEDULER),
        },
    )
)
