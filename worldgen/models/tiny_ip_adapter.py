"""IP-Adapter presets for tests: `ip-adapter-tiny` (for the SD preset `tiny`) and `ip-adapter-sdxl-tiny` (for
`sdxl-tiny`).

A preset stands for an IP-Adapter folder as h94/IP-Adapter ships one: an `image_encoder` subfolder (a CLIP
vision model with projection) and a weights file, `ip-adapter.safetensors`, whose keys are `image_proj.*` (the
image projection) and `ip_adapter.<k>.to_k_ip.weight` / `.to_v_ip.weight` (the decoupled cross-attention of the
UNet's k-th attention processor, odd k: the cross-attention ones), the format `pipe.load_ip_adapter` reads.

The weights fit one base preset's UNet (the number of cross-attention layers, their widths, the text width), so
each preset names its base. A preset reference is `preset:<name>`: the weights file is a preset component (its
name is the weight name), built in memory where it is used; `save_preset_ip_adapter` writes the folder out for
diffusers' own loader (tests compare against it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worldgen.models.presets import Component, Preset, build_preset_component, get_preset, register_preset

WEIGHT_NAME = "ip-adapter.safetensors"
IMAGE_ENCODER = "image_encoder"
_TOKENS = 4  # image tokens of the original IP-Adapter's projection (diffusers' ImageProjection)

# A CLIP vision tower as small as diffusers' own IP-Adapter tests use (32x32 images, projection 32).
_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "projection_dim": 32,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
    "intermediate_size": 37,
}


def cross_attention_layers(unet: Any) -> list[tuple[str, Any]]:
    """(processor name, Attention module) of every layer an IP-Adapter adds image attention to, in the order
    its weights file numbers them: diffusers counts every attention processor not named `attn1` (the
    transformer blocks' self-attention) as cross-attention, and gives the i-th of them key 2i + 1."""
    return [
        (name, unet.get_submodule(name.removesuffix(".processor")))
        for name in unet.attn_processors
        if not name.endswith("attn1.processor")
    ]


def _meta_unet(config: Mapping[str, Any]) -> Any:
    """The UNet of a config without weights (meta tensors): its layers' names and widths, in milliseconds."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def build_ip_adapter_weights(unet_config: Mapping[str, Any], image_embed_dim: int) -> dict[str, Any]:
    """A random-initialised IP-Adapter weights file (flat `image_proj.*` / `ip_adapter.*` keys) for a UNet of
    this config and an image encoder projecting to `image_embed_dim` (torch's default init, the caller seeds)."""
    from diffusers.models.embeddings import ImageProjection
    from torch import nn

    unet = _meta_unet(unet_config)
    cross_dim = unet.config.cross_attention_dim
    projection = ImageProjection(
        image_embed_dim=image_embed_dim, cross_attention_dim=cross_dim, num_image_text_embeds=_TOKENS
    )
    # diffusers renames the file's `proj` to `image_embeds` when it loads it; the file keeps the original name.
    weights = {
        f"image_proj.{key.replace('image_embeds', 'proj')}": value.contiguous()
        for key, value in projection.state_dict().items()
    }
    for i, (_, attn) in enumerate(cross_attention_layers(unet)):
        hidden = attn.to_q.in_features
        for name in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * i + 1}.{name}.weight"] = nn.Linear(
                cross_dim, hidden, bias=False
            ).weight.data
    return weights


@functools.lru_cache(maxsize=8)
def _built_weights(base: str, image_embed_dim: int, seed: int) -> dict[str, Any]:
    """A preset's weights, built once per process (every block and check reading them gets these tensors)."""
    import torch

    from worldgen.models.presets import preset_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_ip_adapter_weights(preset_config(base, "unet"), image_embed_dim)


def _weights_component(base: str, seed: int) -> Component:
    def build(config: Mapping[str, Any]) -> dict[str, Any]:
        return dict(_built_weights(config["base"], config["image_embed_dim"], seed))

    return Component(
        "safetensors.torch", {"base": base, "image_embed_dim": _ENCODER["projection_dim"]}, seed, build
    )


def _preset(name: str, base: str, seeds: tuple[int, int]) -> Preset:
    return register_preset(
        Preset(
            name=name,
            family="ip_adapter",
            pipeline_class="IPAdapter",  # no diffusers pipeline: an adapter a pipeline loads
            description=f"test-sized IP-Adapter for the '{base}' preset: CLIP vision hidden 32, 4 image tokens",
            components={
                IMAGE_ENCODER: Component("transformers.CLIPVisionModelWithProjection", _ENCODER, seeds[0]),
                WEIGHT_NAME: _weights_component(base, seeds[1]),
            },
        )
    )


_preset("ip-adapter-tiny", "tiny", (40, 41))
_preset("ip-adapter-sdxl-tiny", "sdxl-tiny", (42, 43))


def preset_base(name: str) -> str:
    """The base preset whose UNet an IP-Adapter preset fits."""
    return get_preset(name).components[WEIGHT_NAME].config["base"]


def save_preset_ip_adapter(name: str, directory: str | Path) -> Path:
    """Write an IP-Adapter preset as the folder `pipe.load_ip_adapter(directory, subfolder="", weight_name=
    "ip-adapter.safetensors")` reads (with its `image_encoder` subfolder); returns its path."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    build_preset_component(name, IMAGE_ENCODER).save_pretrained(path / IMAGE_ENCODER, safe_serialization=True)
    save_file(build_preset_component(name, WEIGHT_NAME), str(path / WEIGHT_NAME))
    return path
