"""ControlNet presets: the tiny SD and SDXL pipelines with a ControlNet that fits their UNet.

    controlnet-tiny          StableDiffusionControlNetPipeline: the `tiny` preset's components + `controlnet`
    controlnet-tiny-b        the same with another ControlNet (other weights), for multi-ControlNet
    sdxl-controlnet-tiny     StableDiffusionXLControlNetPipeline: `sdxl-tiny`'s components + `controlnet`

How a preset ControlNet is referenced: `preset:controlnet-tiny` with subfolder `controlnet`, exactly as a saved
ControlNet pipeline directory has it (the `controlnet:` template option turns `model: preset:controlnet-tiny`
into that). Its identity key is then the preset's name and the subfolder, so every graph naming it shares one
loaded ControlNet (one model host on Ray); the other components are the base preset's (same configs and seeds:
the same weights), so `preset_pipeline("controlnet-tiny")` is the diffusers pipeline a controlled `tiny` graph
must match.

The ControlNet's config is derived from the UNet's (block layout, attention widths, SDXL's added conditioning),
as `ControlNetModel.from_unet` derives it, with a conditioning embedding that downsamples like the tiny VAE
(x2). diffusers initialises a ControlNet's output convolutions to zero (its residuals start as nothing); as
diffusers' own pipeline tests do, the presets draw them at random instead, so the control visibly changes the
image and a test can tell a ControlNet that is applied from one that is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.models.presets import Component, Preset, get_preset, register_preset

# Keys a ControlNet shares with the UNet it controls (ControlNetModel.from_unet copies the same ones).
_FROM_UNET = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
)


def controlnet_config(unet: Mapping[str, Any], conditioning_channels: tuple[int, ...]) -> dict[str, Any]:
    """A ControlNetModel config that fits a UNet config; `conditioning_channels` are the conditioning embedding's
    block widths (it downsamples the control image 2x per block after the first)."""
    config = {key: unet[key] for key in _FROM_UNET if key in unet}
    config["conditioning_embedding_out_channels"] = list(conditioning_channels)
    return config


def _build_controlnet(config: Mapping[str, Any]) -> Any:
    """A ControlNetModel whose zero-initialised output convolutions get random weights (under the preset seed)."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel(**config)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.2)
            torch.nn.init.normal_(conv.bias, std=0.2)
    return net


def _controlled(name: str, base: str, pipeline_class: str, seed: int, description: str) -> Preset:
    """A ControlNet preset: the base preset's components (the same weights) and a ControlNet fitting its UNet."""
    source = get_preset(base)
    unet = dict(source.components["unet"].config)
    controlnet = Component(
        "diffusers.ControlNetModel", controlnet_config(unet, (16, 32)), seed, build=_build_controlnet
    )
    return Preset(
        name=name,
        family=source.family,
        pipeline_class=pipeline_class,
        description=description,
        components={**source.components, "controlnet": controlnet},
        pipeline_extra=dict(source.pipeline_extra),
    )


register_preset(
    _controlled(
        "controlnet-tiny",
        "tiny",
        "StableDiffusionControlNetPipeline",
        20,
        "test-sized SD ControlNet pipeline: the tiny preset with a ControlNet (32, 64) for its UNet",
    )
)
register_preset(
    _controlled(
        "controlnet-tiny-b",
        "tiny",
        "StableDiffusionControlNetPipeline",
        21,
        "a second tiny SD ControlNet (other weights than controlnet-tiny's), for multi-ControlNet tests",
    )
)
register_preset(
    _controlled(
        "sdxl-controlnet-tiny",
        "sdxl-tiny",
        "StableDiffusionXLControlNetPipeline",
        22,
        "test-sized SDXL ControlNet pipeline: sdxl-tiny with a text_time ControlNet for its UNet",
    )
)
