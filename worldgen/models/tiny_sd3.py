"""Stable Diffusion 3 / 3.5 presets (`sd3-tiny`, `sd3-small`): `StableDiffusion3Pipeline` with all three text
encoders (two CLIP with projection, one T5), an MMDiT with SD3.5's query-key RMS norm and a dual-attention
layer, a 16-channel VAE with SD3's shift and scaling factors, and SD3.5's flow-matching scheduler (shift 3.0).

Sized like diffusers' own SD3 pipeline tests (tiny) and a little bigger for benchmarks (small). The tokenizers
are the shared ones of worldgen/models/tiny.py, built locally.
"""

from __future__ import annotations

from typing import Any

from worldgen.models.presets import Component, Preset, register_preset
from worldgen.models.tiny import clip_text_component, clip_tokenizer_component, t5_tokenizer_component

# One fixed seed per component, so that building one component alone gives the weights the pipeline has.
_SEEDS: dict[str, int] = {
    "transformer": 30,
    "vae": 31,
    "text_encoder": 32,
    "text_encoder_2": 33,
    "text_encoder_3": 34,
}

# SD3.5's scheduler_config.json (SD3.0 has the same shift).
_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# SD3's VAE: 16 latent channels, no quant convs, shifted and scaled latents (its real factors).
_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 16,
    "layers_per_block": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}


def _clip(hidden: int, layers: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden + 5,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "vocab_size": 1000,  # above the shared tokenizer's 653 tokens
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
    }


def _t5(width: int, layers: int) -> dict[str, Any]:
    return {
        "vocab_size": 128,  # above the shared T5 tokenizer's 93 pieces
        "d_model": width,
        "d_kv": 8,
        "d_ff": 2 * width,
        "num_layers": layers,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "feed_forward_proj": "gated-gelu",  # T5 v1.1, as SD3's T5-XXL
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
    }


# The transformer's joint_attention_dim is T5's width and its pooled_projection_dim the two CLIP projections'
# sum, as in the real model (4096; 768 + 1280). The two CLIPs differ in width, as CLIP-L and CLIP-G do, and
# together are narrower than T5, so the pipeline's padding of their concatenation is exercised.
_SPECS: dict[str, dict[str, Any]] = {
    # For unit tests: 32x32 images, 16x16 latents (8x8 patches).
    "sd3-tiny": {
        "description": "test-sized SD3.5: 32x32 images, MMDiT 2 layers x 32 wide, CLIP 32+48, T5 96",
        "transformer": {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": 96,
            "caption_projection_dim": 32,
            "pooled_projection_dim": 80,
            "pos_embed_max_size": 32,
            "dual_attention_layers": [0],
            "qk_norm": "rms_norm",
        },
        "vae": {**_VAE, "block_out_channels": [16, 32], "norm_num_groups": 8, "sample_size": 32},
        "text_encoder": _clip(32, 2),
        "text_encoder_2": _clip(48, 2),
        "text_encoder_3": _t5(96, 2),
    },
    # For benchmarks: 64x64 images, 32x32 latents (256 patches); one transformer call is tens of ms on CPU.
    "sd3-small": {
        "description": "benchmark-sized SD3.5: 64x64 images, MMDiT 4 layers x 64 wide, CLIP 64+96, T5 192",
        "transformer": {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 4,
            "joint_attention_dim": 192,
            "caption_projection_dim": 64,
            "pooled_projection_dim": 160,
            "pos_embed_max_size": 48,
            "dual_attention_layers": [0, 1],
            "qk_norm": "rms_norm",
        },
        "vae": {**_VAE, "block_out_channels": [32, 64], "norm_num_groups": 32, "sample_size": 64},
        "text_encoder": _clip(64, 3),
        "text_encoder_2": _clip(96, 3),
        "text_encoder_3": _t5(192, 2),
    },
}

for _name, _spec in _SPECS.items():
    register_preset(
        Preset(
            name=_name,
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            description=_spec["description"],
            components={
                "transformer": Component(
                    "diffusers.SD3Transformer2DModel", _spec["transformer"], _SEEDS["transformer"]
                ),
                "vae": Component("diffusers.AutoencoderKL", _spec["vae"], _SEEDS["vae"]),
                "text_encoder": clip_text_component(
                    _spec["text_encoder"], _SEEDS["text_encoder"], projection=True
                ),
                "text_encoder_2": clip_text_component(
                    _spec["text_encoder_2"], _SEEDS["text_encoder_2"], projection=True
                ),
                "text_encoder_3": Component(
                    "transformers.T5EncoderModel", _spec["text_encoder_3"], _SEEDS["text_encoder_3"]
                ),
                "tokenizer": clip_tokenizer_component(),
                "tokenizer_2": clip_tokenizer_component(),
                "tokenizer_3": t5_tokenizer_component(),
                "scheduler": Component("diffusers.FlowMatchEulerDiscreteScheduler", _SCHEDULER),
            },
        )
    )
