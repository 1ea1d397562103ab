"""Inpainting presets: `inpaint-tiny` (StableDiffusionInpaintPipeline) and `sdxl-inpaint-tiny`
(StableDiffusionXLInpaintPipeline).

Each is its base preset (`tiny`, `sdxl-tiny`) with an inpainting UNet, as diffusers' own inpaint pipeline tests
build theirs: the same architecture taking 9 input channels (4 latent + 1 mask + 4 masked-image latent), its own
seed. The other components are the base's (same configs and seeds: the same weights), so a base and an
inpainting graph can share them.
"""

from __future__ import annotations

import dataclasses

from worldgen.models.presets import Component, get_preset, register_preset

_UNET_SEEDS: dict[str, int] = {"inpaint-tiny": 30, "sdxl-inpaint-tiny": 31}
_LATENT_CHANNELS = 4


def _inpainting(name: str, base: str, pipeline_class: str, description: str) -> None:
    preset = get_preset(base)
    unet = preset.components["unet"]
    channels = 2 * _LATENT_CHANNELS + 1  # latents, the mask, the masked image's latents
    components = {
        **preset.components,
        "unet": Component(unet.cls, {**unet.config, "in_channels": channels}, _UNET_SEEDS[name]),
    }
    register_preset(
        dataclasses.replace(
            preset,
            name=name,
            pipeline_class=pipeline_class,
            description=description,
            components=components,
        )
    )


_inpainting(
    "inpaint-tiny",
    "tiny",
    "StableDiffusionInpaintPipeline",
    "test-sized SD inpainting model: `tiny` with a 9-channel UNet (32x32 images)",
)
_inpainting(
    "sdxl-inpaint-tiny",
    "sdxl-tiny",
    "StableDiffusionXLInpaintPipeline",
    "test-sized SDXL inpainting model: `sdxl-tiny` with a 9-channel UNet (32x32 images)",
)
