"""Flux.1 presets: `flux-tiny` and `flux-small` (schnell-like: no guidance embeddings, a fixed shift) and
`flux-dev-tiny` (dev-like: the distilled guidance embedding, dynamic shifting), each a `FluxPipeline`; and
ControlNets that fit `flux-tiny`: `flux-controlnet-tiny` and the union `flux-controlnet-union-tiny`.

They keep Flux's interfaces at toy widths: a VAE with 16 latent channels, shift and scaling factors and a
downsampling of 8 (so sizes are multiples of 16), a transformer taking 2x2 patches of it (64 channels per
token), a CLIP text encoder for the pooled output and a T5 encoder for the sequence, with the shared locally
built tokenizers (worldgen/models/tiny.py). The scheduler configs are the real checkpoints'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.models.presets import Component, Preset, register_preset
from worldgen.models.tiny import clip_text_component, clip_tokenizer_component, t5_tokenizer_component

# One fixed seed per component, so any subset of a preset builds the same weights in any order.
_SEEDS: dict[str, int] = {"transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}

LATENT_CHANNELS = 16  # Flux's VAE; the transformer takes 2x2 patches of it: 64 values per token

# scheduler/scheduler_config.json of FLUX.1-schnell and FLUX.1-dev.
_SCHNELL_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_DEV_SCHEDULER: dict[str, Any] = {**_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}


def _vae(width: int, groups: int, size: int) -> dict[str, Any]:
    """Flux's VAE layout (four blocks: 8x downsampling, 16 latent channels, no quant convs, its shift and
    scaling factors) at `width` channels per block."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [width] * 4,
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": groups,
        "sample_size": size,  # the template's default image size (FLUX.1's VAE says 1024, its pipeline's default)
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.1159,
        "scaling_factor": 0.3611,
    }


def _transformer(
    layers: int,
    single_layers: int,
    heads: int,
    head_dim: int,
    text_dim: int,
    pooled_dim: int,
    rope: list[int],
) -> dict[str, Any]:
    return {
        "patch_size": 1,
        "in_channels": LATENT_CHANNELS * 4,
        "num_layers": layers,
        "num_single_layers": single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": text_dim,  # T5's d_model
        "pooled_projection_dim": pooled_dim,  # CLIP's hidden size (its pooled output)
        "axes_dims_rope": rope,  # sums to head_dim
        "guidance_embeds": False,
    }


def _clip(hidden: int, intermediate: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "vocab_size": 1000,  # over the shared CLIP tokenizer's 653 entries
        "max_position_embeddings": 77,
        "projection_dim": hidden,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    }


def _t5(d_model: int, d_ff: int, heads: int) -> dict[str, Any]:
    return {
        "vocab_size": 128,  # over the shared T5 tokenizer's 93 entries
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": d_ff,
        "num_layers": 2,
        "num_heads": heads,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",  # T5 v1.1, as FLUX.1's T5-XXL encoder
        "is_encoder_decoder": False,
        "use_cache": False,
    }


_TINY_TRANSFORMER = _transformer(1, 1, heads=2, head_dim=16, text_dim=32, pooled_dim=32, rope=[4, 4, 8])
# Measured on 2 CPU threads: one call ~25 ms at 64x64 (16 image tokens + 256 text tokens).
_SMALL_TRANSFORMER = _transformer(2, 4, heads=4, head_dim=16, text_dim=64, pooled_dim=64, rope=[4, 6, 6])

SPECS: dict[str, dict[str, Any]] = {
    # For unit tests: as small as diffusers' own Flux pipeline tests (one double and one single block).
    "flux-tiny": {
        "description": "test-sized Flux.1-schnell-like model: 32x32 images, transformer 1+1 blocks of width 32",
        "transformer": _TINY_TRANSFORMER,
        "vae": _vae(8, 4, 32),
        "text_encoder": _clip(32, 37),
        "text_encoder_2": _t5(32, 37, 4),
        "scheduler": _SCHNELL_SCHEDULER,
    },
    "flux-dev-tiny": {
        "description": "test-sized Flux.1-dev-like model (guidance embeddings, dynamic shifting): 32x32 images",
        "transformer": {**_TINY_TRANSFORMER, "guidance_embeds": True},
        "vae": _vae(8, 4, 32),
        "text_encoder": _clip(32, 37),
        "text_encoder_2": _t5(32, 37, 4),
        "scheduler": _DEV_SCHEDULER,
    },
    # For benchmarks: one transformer call is tens of ms on a CPU at the default 64x64.
    "flux-small": {
        "description": "benchmark-sized Flux.1-schnell-like model: 64x64 images, transformer 2+4 blocks of width 64",
        "transformer": _SMALL_TRANSFORMER,
        "vae": _vae(16, 8, 64),
        "text_encoder": _clip(64, 128),
        "text_encoder_2": _t5(64, 128, 4),
        "scheduler": _SCHNELL_SCHEDULER,
    },
}

for _name, _spec in SPECS.items():
    register_preset(
        Preset(
            name=_name,
            family="flux",
            pipeline_class="FluxPipeline",
            description=_spec["description"],
            components={
                "transformer": Component(
                    "diffusers.FluxTransformer2DModel", _spec["transformer"], _SEEDS["transformer"]
                ),
                "vae": Component("diffusers.AutoencoderKL", _spec["vae"], _SEEDS["vae"]),
                "text_encoder": clip_text_component(_spec["text_encoder"], _SEEDS["text_encoder"]),
                "tokenizer": clip_tokenizer_component(),
                "text_encoder_2": Component(
                    "transformers.T5EncoderModel", _spec["text_encoder_2"], _SEEDS["text_encoder_2"]
                ),
                "tokenizer_2": t5_tokenizer_component(),
                "scheduler": Component("diffusers.FlowMatchEulerDiscreteScheduler", _spec["scheduler"]),
            },
            pipeline_extra={"image_encoder": None, "feature_extractor": None},
        )
    )


# ---- ControlNets -----------------------------------------------------------------------------------------
# A ControlNet preset is a model, not a pipeline: its `pipeline_class` is the model class and its one component
# sits at subfolder "controlnet" (a model reference `{source: "preset:flux-controlnet-tiny", subfolder:
# "controlnet"}`; the templates add the subfolder), so its identity and single load work as for any component.
# It belongs to the "controlnet" family of presets: it is no Flux pipeline a graph could be built from.
CONTROLNET_FAMILY = "controlnet"
CONTROLNET_SUBFOLDER = "controlnet"


def _controlnet(num_mode: int | None = None) -> dict[str, Any]:
    """The flux-tiny transformer's layout (so its residuals fit it), one double and one single block."""
    return {**_TINY_TRANSFORMER, "num_mode": num_mode, "conditioning_embedding_channels": None}


def build_controlnet(config: Mapping[str, Any]) -> Any:
    """A FluxControlNetModel whose zero-initialised layers (the control embedder and the residual
    projections, zero as training starts) get small random weights, so the control visibly changes images
    and a test of it can fail."""
    import torch
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(**config)
    zeroed = [model.controlnet_x_embedder, *model.controlnet_blocks, *model.controlnet_single_blocks]
    for layer in zeroed:
        torch.nn.init.normal_(layer.weight, std=0.2)
        torch.nn.init.normal_(layer.bias, std=0.02)
    return model


CONTROLNETS: dict[str, dict[str, Any]] = {
    "flux-controlnet-tiny": {
        "description": "test-sized Flux ControlNet (InstantX kind) for flux-tiny: 1+1 blocks of width 32",
        "config": _controlnet(),
        "seed": 10,
    },
    "flux-controlnet-union-tiny": {
        "description": "test-sized Flux union ControlNet (4 control modes) for flux-tiny: 1+1 blocks of width 32",
        "config": _controlnet(num_mode=4),
        "seed": 11,
    },
}

for _name, _spec in CONTROLNETS.items():
    register_preset(
        Preset(
            name=_name,
            family=CONTROLNET_FAMILY,
            pipeline_class="FluxControlNetModel",
            description=_spec["description"],
            components={
                CONTROLNET_SUBFOLDER: Component(
                    "diffusers.FluxControlNetModel", _spec["config"], _spec["seed"], build=build_controlnet
                )
            },
        )
    )
