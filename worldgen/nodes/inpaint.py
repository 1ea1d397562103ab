"""Inpainting task nodes: the image and mask preparation of the diffusers inpaint pipelines.

`image/mask` does what `StableDiffusionInpaintPipeline` / `StableDiffusionXLInpaintPipeline` do to `image` and
`mask_image` before any model runs: both resized to the output size, the mask made one channel and binary
(white = repaint), the masked image (the repainted area blanked), and the mask at latent size:

    image, mask_image -> mask -> image         -> vae_enc (codec/vae)  -> the image's latents
                              -> masked_image  -> vae_masked           -> an inpainting UNet's extra channels
                              -> mask (latent size)                    -> the solver's blend on a base UNet
    mask, the masked image's latents -> inpaint_condition (latent/inpaint_condition) -> an inpainting UNet's concat

The encoding itself is the existing `codec/vae`; images leave this node in [0, 1] as the codec takes them (it
normalises to [-1, 1] exactly as the pipeline's image processor does), so the latents are the pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, Work
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


class MaskConfig(BlockConfig):
    scale_factor: int = Field(8, ge=1, description="image pixels per latent pixel (the VAE's downsampling)")
    height: int = Field(
        512, ge=8, description="output height when not given (the pipelines: the UNet's size)"
    )
    width: int = Field(512, ge=8, description="output width when not given")
    encode_image: Literal["always", "below_full_strength"] = Field(
        "always",
        description="when the image itself is encoded: 'always' (a base UNet blends its latents back after each "
        "step), 'below_full_strength' (an inpainting UNet starts from the noised image only at strength below 1; "
        "at 1 its pipeline encodes no image, so the seed's noise is drawn first)",
    )


@register_block
class InpaintMaskBlock(Block):
    """The inpaint pipelines' image and mask preparation (their `image_processor` and `mask_processor`, and
    `prepare_mask_latents`' resize). A mask must be the image's size and one channel (a grey image saved as
    RGB counts); sizes not given are the config's, multiples of the scale factor."""

    block_type = "image/mask"
    Config = MaskConfig
    inline = True  # resizing two small images costs less where the run is driven than as a task
    INPUTS = (
        Port(
            "image",
            K.IMAGE,
            doc="PIL RGB image(s), or a float tensor (B, 3, H, W) / array (B, H, W, 3) in [0, 1]",
        ),
        Port(
            "mask_image",
            K.MASK,
            doc="white (1) = repaint, black (0) = keep: PIL image(s), or a tensor/array (H, W), (B, 1, H, W) or "
            "(B, H, W, 1) in [0, 1], of the image's size",
        ),
        Port("height", K.INT, optional=True, doc="output height in pixels (default: the config's)"),
        Port("width", K.INT, optional=True),
        Port("strength", K.SCALAR, optional=True, default=1.0, doc="decides whether the image is encoded"),
    )
    OUTPUTS = (
        Port("image", K.IMAGE, doc="(B, 3, H, W) in [0, 1] at the output size; None when it is not encoded"),
        Port("masked_image", K.IMAGE, doc="the image with the repainted area mid-grey (0 once normalised)"),
        Port("mask", K.MASK, doc="(B, 1, H/f, W/f), 1 = repaint: the mask at latent size"),
        Port("height", K.INT),
        Port("width", K.INT),
        Port("batch_size", K.INT),
    )

    def _size(self, height: Any, width: Any) -> tuple[int, int]:
        height = self.config.height if height is None else int(height)
        width = self.config.width if width is None else int(width)
        f = self.config.scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                raise ConfigError(f"{name} must be a positive multiple of {f}, got {value}", path=name)
        return height, width

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        height, width = self._size(inputs.get("height"), inputs.get("width"))
        strength = inputs.get("strength")
        if strength is not None and not 0.0 <= float(strength) <= 1.0:
            raise ConfigError(f"strength must be 0 to 1, got {strength}", path="strength")
        batch = None
        if "image" in inputs and "mask_image" in inputs:
            batch, _ = _check_pair(inputs["image"], inputs["mask_image"])
        return Work(width=width, height=height, batch={"image": batch} if batch else {})

    def forward(
        self,
        image: Any,
        mask_image: Any,
        height: int | None = None,
        width: int | None = None,
        strength: float | None = 1.0,
    ) -> dict[str, Any]:
        from diffusers.image_processor import VaeImageProcessor

        height, width = self._size(height, width)
        batch, mask_image = _check_pair(image, mask_image)
        f = self.config.scale_factor
        # The pipelines' processors, but leaving the image in [0, 1]: the codec normalises it as they do.
        pixels = VaeImageProcessor(vae_scale_factor=f, do_normalize=False)
        masks = VaeImageProcessor(
            vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        init = pixels.preprocess(image, height=height, width=width).to(torch.float32)
        mask = masks.preprocess(mask_image, height=height, width=width)
        # The pipelines' `init_image * (mask < 0.5)` in [-1, 1]: a blanked pixel is 0 there, 0.5 here.
        masked = torch.where(mask < 0.5, init, torch.full_like(init, 0.5))
        latent_mask = torch.nn.functional.interpolate(mask, size=(height // f, width // f))
        full = strength is None or float(strength) == 1.0
        encoded = None if self.config.encode_image == "below_full_strength" and full else init
        return {
            "image": encoded,
            "masked_image": masked,
            "mask": latent_mask,
            "height": height,
            "width": width,
            "batch_size": batch,
        }


# ---- checks --------------------------------------------------------------------------------------------
def _check_pair(image: Any, mask_image: Any) -> tuple[int, Any]:
    """(the image batch, the mask as the processor takes it): ConfigErrors for an image that is not RGB, a
    mask with several differing channels, or a mask of another size or batch than the image."""
    batch, size = _image_shape(image)
    mask_batch, mask_size, mask_image = _mask_shape(mask_image)
    if mask_size != size:
        raise ConfigError(
            f"mask_image is {mask_size[1]}x{mask_size[0]} (WxH) but image is {size[1]}x{size[0]}: the mask must "
            "cover the image pixel for pixel",
            path="mask_image",
        )
    if mask_batch not in (1, batch):
        raise ConfigError(
            f"mask_image holds {mask_batch} masks for {batch} images: give one mask, or one per image",
            path="mask_image",
        )
    return batch, mask_image


def _pil_list(value: Any) -> list[Any] | None:
    import PIL.Image

    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        return list(value)
    return None


def _image_shape(image: Any) -> tuple[int, tuple[int, int]]:
    """(batch, (height, width)) of an RGB image input."""
    pils = _pil_list(image)
    if pils is not None:
        modes = {p.mode for p in pils}
        sizes = {(p.height, p.width) for p in pils}
        if modes != {"RGB"}:
            raise ConfigError(
                f"image must be RGB, got PIL mode {', '.join(sorted(modes))} (convert it with .convert('RGB'))",
                path="image",
            )
        if len(sizes) > 1:
            raise ConfigError(f"the images differ in size: {sorted(sizes)}", path="image")
        return len(pils), sizes.pop()
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        value = image if image.dim() == 4 else image.unsqueeze(0)
        channels_at = 1
    elif isinstance(image, np.ndarray):
        shape = image.shape
        value = image if image.ndim == 4 else image[None]
        channels_at = 3
    else:
        raise ConfigError(
            f"image must be a PIL image, a tensor (B, 3, H, W) or an array (B, H, W, 3), got {type(image).__name__}",
            path="image",
        )
    if value.ndim != 4 or value.shape[channels_at] != 3:
        layout = "(B, 3, H, W)" if channels_at == 1 else "(B, H, W, 3)"
        raise ConfigError(f"image must be RGB, {layout} in [0, 1], got shape {shape}", path="image")
    _check_range(value, "image")
    sizes = value.shape[2:] if channels_at == 1 else value.shape[1:3]
    return int(value.shape[0]), (int(sizes[0]), int(sizes[1]))


def _mask_shape(mask: Any) -> tuple[int, tuple[int, int], Any]:
    """(batch, (height, width), the mask with one channel) of a mask input; an RGB(A) mask must be grey."""
    pils = _pil_list(mask)
    if pils is not None:
        for p in pils:
            if p.mode in ("RGB", "RGBA"):
                rgb = np.asarray(p.convert("RGB"))
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
                ):
                    raise _not_a_mask(f"a colour PIL {p.mode} image")
        sizes = {(p.height, p.width) for p in pils}
        if len(sizes) > 1:
            raise ConfigError(f"the masks differ in size: {sorted(sizes)}", path="mask_image")
        return len(pils), sizes.pop(), mask
    if isinstance(mask, torch.Tensor):
        value = {2: lambda m: m[None, None], 3: lambda m: m[:, None], 4: lambda m: m}.get(mask.dim())
        if value is None:
            raise ConfigError(
                f"mask_image must be (H, W) or (B, 1, H, W), got {tuple(mask.shape)}", path="mask_image"
            )
        value = value(mask)
        value = _one_channel(value, 1, tuple(mask.shape))
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 2:
            value = mask[None, ..., None]
        elif mask.ndim == 3:
            value = mask[None] if mask.shape[-1] in (1, 3, 4) else mask[..., None]
        elif mask.ndim == 4:
            value = mask
        else:
            raise ConfigError(
                f"mask_image must be (H, W) or (B, H, W, 1), got {mask.shape}", path="mask_image"
            )
        value = _one_channel(value, 3, mask.shape)
    else:
        raise ConfigError(
            f"mask_image must be a PIL image, a tensor or an array, got {type(mask).__name__}",
            path="mask_image",
        )
    _check_range(value, "mask_image")
    size = value.shape[2:] if isinstance(value, torch.Tensor) else value.shape[1:3]
    return int(value.shape[0]), (int(size[0]), int(size[1])), value


def _one_channel(value: Any, axis: int, shape: tuple[int, ...]) -> Any:
    """A mask's single channel (4-D, channels at `axis`): RGB(A) is allowed only when R, G and B are equal."""
    channels = value.shape[axis]
    if channels == 1:
        return value
    if channels not in (3, 4):
        raise _not_a_mask(f"shape {tuple(shape)}, {channels} channels")
    if isinstance(value, torch.Tensor):
        rgb, first = value.narrow(axis, 0, 3), value.narrow(axis, 0, 1)
    else:
        rgb, first = np.take(value, [0, 1, 2], axis=axis), np.take(value, [0], axis=axis)
    if not bool((rgb == first).all()):
        raise _not_a_mask(f"shape {tuple(shape)}, {channels} channels that differ (a colour image)")
    return first


def _not_a_mask(what: str) -> ConfigError:
    return ConfigError(
        f"mask_image is {what}: a mask is one channel (white = repaint, black = keep); a grey image saved with "
        "several equal channels is fine",
        path="mask_image",
    )


def _check_range(value: Any, port: str) -> None:
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise ConfigError(f"{port} must be a float tensor in [0, 1], got {value.dtype}", path=port)
        low, high = float(value.min()), float(value.max())
    else:
        if not np.issubdtype(value.dtype, np.floating):
            raise ConfigError(f"{port} must be a float array in [0, 1], got {value.dtype}", path=port)
        low, high = float(value.min()), float(value.max())
    if low < 0.0 or high > 1.0:
        raise ConfigError(f"{port} values must be in [0, 1], got [{low:.3g}, {high:.3g}]", path=port)


# ---- the inpainting UNet's extra channels ---------------------------------------------------------------
@register_block
class InpaintConditionBlock(Block):
    """What an inpainting UNet takes besides the latents: the mask and the masked image's latents, concatenated
    on the channel axis in that order (as the pipelines concatenate them each step), one tensor for the
    backbone's `concat` port."""

    block_type = "latent/inpaint_condition"
    inline = True  # one concatenation: cheaper where the run is driven than as a task
    INPUTS = (
        Port("mask", K.MASK, doc="(B or 1, 1, h, w) at latent size, 1 = repaint"),
        Port("masked_latent", K.LATENT, doc="(B, C, h, w): the masked image's latents"),
    )
    OUTPUTS = (Port("condition", K.LATENT, doc="(B, 1 + C, h, w)"),)

    def forward(self, mask: torch.Tensor, masked_latent: torch.Tensor) -> dict[str, Any]:
        if mask.shape[-2:] != masked_latent.shape[-2:]:
            raise ConfigError(
                f"the mask is {tuple(mask.shape[-2:])} but the masked image's latents are "
                f"{tuple(masked_latent.shape[-2:])}: both must be at latent size",
                path="mask",
            )
        mask = mask.to(device=masked_latent.device, dtype=masked_latent.dtype)
        if mask.shape[0] == 1 and masked_latent.shape[0] > 1:  # one mask for every image
            mask = mask.expand(masked_latent.shape[0], *mask.shape[1:])
        return {"condition": torch.cat([mask, masked_latent], dim=1)}
