"""Wan presets: `wan-tiny` (Wan 2.1 text to video, a `WanPipeline`), `wan-i2v-tiny` (Wan 2.1 image to video, a
`WanImageToVideoPipeline`: the transformer takes 36 channels — 16 of noise, 4 of first-frame mask, 16 of the
encoded first frame — and CLIP-vision image embeddings) and `wan22-ti2v-tiny` (Wan 2.2 TI2V-5B-like: the Wan 2.2
VAE with 48 latent channels and 16x spatial compression, no image encoder, `expand_timesteps`: the image's latent
stands in for the first latent frame at timestep 0).

They keep Wan's interfaces at the sizes diffusers' own Wan pipeline tests use: the Wan VAE (16 latent channels,
8x spatial and 4x temporal compression, its latents_mean/latents_std), a 3D transformer taking (1, 2, 2) patches,
a UMT5 text encoder (the shared locally built T5 tokenizer, as tiny_sd3/tiny_flux), and for image to video a
CLIP vision encoder (`CLIPVisionModel`, as the real checkpoints' image_encoder) with its image processor. The scheduler is the real Wan 2.1 checkpoints' (UniPC with flow
sigmas, flow_shift 3.0).
"""

from __future__ import annotations

from typing import Any

from worldgen.models.presets import Component, Preset, register_preset
from worldgen.models.tiny import t5_tokenizer_component

# One fixed seed per component, so any subset of a preset builds the same weights in any order.
_SEEDS: dict[str, int] = {"transformer": 0, "vae": 1, "text_encoder": 2, "image_encoder": 3}

LATENT_CHANNELS = 16  # the Wan 2.1 VAE's z_dim
TEXT_DIM = 32  # UMT5's d_model = the transformer's text_dim
IMAGE_SIZE = 32  # the CLIP vision encoder's input side

# A size that fits the tiny transformer (rope_max_seq_len 32 patches per axis) and runs in well under a second:
# the templates' defaults for these presets (real checkpoints default to the pipeline's 480x832, 81 frames).
DEFAULT_VIDEO: dict[str, int] = {"height": 32, "width": 32, "frames": 9}

# scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (and the 480P image-to-video model).
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "thresholding": False,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
}

_VAE: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],  # 4x in time: 4k+1 frames -> k+1 latent frames
}


def _transformer(in_channels: int, image_dim: int | None) -> dict[str, Any]:
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": in_channels,
        "out_channels": LATENT_CHANNELS,
        "text_dim": TEXT_DIM,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
        "image_dim": image_dim,  # the CLIP vision encoder's hidden size (image to video), None for text to video
    }


_UMT5: dict[str, Any] = {
    "vocab_size": 128,  # over the shared T5 tokenizer's 93 entries
    "d_model": TEXT_DIM,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",  # as umt5-xxl
    "is_encoder_decoder": False,
    "use_cache": False,
}

_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 4,
    "projection_dim": 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "intermediate_size": 16,
    "patch_size": 1,
}


def _image_processor(_config: Any) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=IMAGE_SIZE, size=IMAGE_SIZE)


def _common() -> dict[str, Component]:
    return {
        "vae": Component("diffusers.AutoencoderKLWan", _VAE, _SEEDS["vae"]),
        "text_encoder": Component("transformers.UMT5EncoderModel", _UMT5, _SEEDS["text_encoder"]),
        "tokenizer": t5_tokenizer_component(),
        "scheduler": Component("diffusers.UniPCMultistepScheduler", SCHEDULER),
    }


register_preset(
    Preset(
        name="wan-tiny",
        family="wan",
        pipeline_class="WanPipeline",
        description="test-sized Wan 2.1 text-to-video model: 32x32 clips of 4k+1 frames, transformer 2 blocks of width 24",
        components={
            "transformer": Component(
                "diffusers.WanTransformer3DModel", _transformer(LATENT_CHANNELS, None), _SEEDS["transformer"]
            ),
            **_common(),
        },
    )
)

register_preset(
    Preset(
        name="wan-i2v-tiny",
        family="wan",
        pipeline_class="WanImageToVideoPipeline",
        description="test-sized Wan 2.1 image-to-video model: 32x32 clips from a first frame, CLIP-vision image "
        "embeddings",
        components={
            "transformer": Component(
                "diffusers.WanTransformer3DModel",
                _transformer(2 * LATENT_CHANNELS + 4, _CLIP_VISION["hidden_size"]),
                _SEEDS["transformer"],
            ),
            **_common(),
            "image_encoder": Component("transformers.CLIPVisionModel", _CLIP_VISION, _SEEDS["image_encoder"]),
            "image_processor": Component("transformers.CLIPImageProcessor", build=_image_processor),
        },
    )
)


# The Wan 2.2 VAE (TI2V-5B's layout): 2x2 pixel patches in, residual blocks, 48 channels, 16x spatial compression.
# Its statistics are not 0/1 here (diffusers' test sets them so), so a missing normalisation would show.
_VAE_22: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 48,
    "in_channels": 12,
    "out_channels": 12,
    "is_residual": True,
    "patch_size": 2,
    "latents_mean": [round(0.1 * ((i % 7) - 3), 2) for i in range(48)],
    "latents_std": [round(1.0 + 0.1 * (i % 5), 2) for i in range(48)],
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True],
}

register_preset(
    Preset(
        name="wan22-ti2v-tiny",
        family="wan",
        pipeline_class="WanImageToVideoPipeline",
        description="test-sized Wan 2.2 TI2V-like model (expand_timesteps, no image encoder): 32x32 clips",
        components={
            "transformer": Component(
                "diffusers.WanTransformer3DModel",
                {**_transformer(48, None), "out_channels": 48},
                _SEEDS["transformer"],
            ),
            **_common(),
            "vae": Component("diffusers.AutoencoderKLWan", _VAE_22, _SEEDS["vae"]),
        },
        pipeline_extra={"expand_timesteps": True, "image_encoder": None, "image_processor": None},
    )
)
