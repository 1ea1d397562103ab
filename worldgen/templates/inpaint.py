"""The inpaint graph parts the SD and SDXL families share (their builders add the text side and the loop):

    image, mask_image -> mask (image/mask) -> image ------> vae_enc ---> schedule.latent
                                           -> masked_image -> vae_masked -.
                                           -> mask ------------------------+-> inpaint_condition -> unet.concat
                         vae_enc.rng -> noise -> schedule.noise            |   (an inpainting UNet, 9 channels), or
                                                                           '-> schedule.mask (a base UNet: the
                                                                               solver puts the kept area back)

The generator runs through the nodes in the pipelines' order: the image's latents (when they are used), the
noise, the masked image's latents; then the solver. `vae_masked` shares `vae_enc`'s block (one VAE loaded).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph


def inpainting_unet(unet: Mapping[str, Any], latent_channels: int, source: str) -> bool:
    """Whether a UNet config is an inpainting UNet (latents + mask + masked image's latents in) rather than a
    base one (latents in); a ConfigError for any other input width."""
    channels = unet.get("in_channels")
    if channels == 2 * latent_channels + 1:
        return True
    if channels == latent_channels:
        return False
    raise ConfigError(
        f"model '{source}': its UNet takes {channels} input channels; inpainting needs {latent_channels} (a base "
        f"UNet, masked image to image) or {2 * latent_channels + 1} (an inpainting UNet)",
        path="unet.model",
    )


def refuse_inpainting_unet(unet: Mapping[str, Any], latent_channels: int, task: str, source: str) -> None:
    """A clear error for an inpainting UNet given to text_to_image/image_to_image (it needs a mask)."""
    if unet.get("in_channels") == 2 * latent_channels + 1:
        raise ConfigError(
            f"model '{source}' is an inpainting model (its UNet takes {unet['in_channels']} channels: latents, "
            f"mask and masked image); {task} cannot feed it: use the inpaint template (image, mask_image, prompt)",
            path="model",
        )


def add_inpaint_nodes(
    g: Graph,
    *,
    vae: Mapping[str, Any],
    inpainting: bool,
    latent_channels: int,
    scale_factor: int,
    height: int,
    width: int,
    strength: float,
    dtype: str,
    backbone_id: str = "unet",
) -> None:
    """Add the mask, encoders and noise and wire them into a graph whose denoising loop (`schedule`, the
    backbone) is built; expose `image`, `mask_image`, `height`, `width`, `strength`."""
    g.add_node(
        "image/mask",
        id="mask",
        config={
            "scale_factor": scale_factor,
            "height": height,
            "width": width,
            "encode_image": "below_full_strength" if inpainting else "always",
        },
        auto_connect=False,
    )
    g.add_node("codec/vae", id="vae_enc", config={"model": dict(vae), "mode": "encode"}, auto_connect=False)
    g.add_node(
        "latent/noise",
        id="noise",
        config={
            "channels": latent_channels,
            "scale_factor": scale_factor,
            "height": height,
            "width": width,
            "dtype": dtype,
        },
        auto_connect=False,
    )
    g.add_node(g.block("vae_enc"), id="vae_masked", auto_connect=False)
    edges = [
        ("mask.image", "vae_enc.image"),
        ("vae_enc.rng", "noise.rng"),
        ("mask.height", "noise.height"),
        ("mask.width", "noise.width"),
        ("mask.batch_size", "noise.batch_size"),
        ("noise.rng", "vae_masked.rng"),
        ("mask.masked_image", "vae_masked.image"),
        ("vae_enc.latent", "schedule.latent"),  # None for an inpainting UNet at full strength: noise alone
        ("noise.latent", "schedule.noise"),
        ("vae_masked.rng", "schedule.rng"),
    ]
    if inpainting:  # the mask and the masked image's latents, after the latents' channels
        g.add_node("latent/inpaint_condition", id="inpaint_condition", auto_connect=False)
        edges += [
            ("mask.mask", "inpaint_condition.mask"),
            ("vae_masked.latent", "inpaint_condition.masked_latent"),
            ("inpaint_condition.condition", f"{backbone_id}.concat"),
        ]
    else:
        edges += [("mask.mask", "schedule.mask")]
    for source, target in edges:
        g.add_edge(source, target)
    g.expose_input("image", "mask.image")
    g.expose_input("mask_image", "mask.mask_image")
    g.expose_input("height", "mask.height", default=None)
    g.expose_input("width", "mask.width", default=None)
    g.expose_input("strength", ["mask.strength", "schedule.strength"], default=strength)
