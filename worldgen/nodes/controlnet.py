"""ControlNet task nodes: the control-image preparation (`image/control`, `image/canny`) and the ControlNet itself
(`adapter/controlnet`), which turns the control image into residuals the UNet backbone adds to its own.

With the SD/SDXL nodes they write `StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline`:

    control_image -> [canny ->] control --------------------.
    schedule/solver (model input, timestep, state) ---------+-> controlnet -> [controlnet_2 ->] unet.control
    te/te_neg (condition, condition_uncond; SDXL pooled, time ids) '

Several ControlNets chain: each adds its residuals to the ones it is given (`residuals`), which is diffusers'
`MultiControlNetModel` (it sums them in the same order). The two image nodes are light and run where the graph is
driven; the ControlNet holds weights and runs on its own model host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.nodes.diffusion import SolverState, text_conditioning
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


def _on_model(value: torch.Tensor, block: ModelBlock) -> torch.Tensor:
    device, dtype = block.placement()
    return value.to(device=device, dtype=dtype)


def _to_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """One prompt's (or one image's) value for a batch of latents, as the UNet's own inputs are repeated."""
    if value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    return value


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to the UNet: one residual per down-block output and one for the mid block, batched
    as the UNet's call is ([uncond, cond] under guidance)."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def __add__(self, other: ControlResiduals) -> ControlResiduals:
        # In this order: MultiControlNetModel adds each net's residuals to the sum of the ones before it.
        return ControlResiduals(
            tuple(a + b for a, b in zip(self.down, other.down, strict=True)), self.mid + other.mid
        )


# ---- control images ------------------------------------------------------------------------------------
def _image_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image, an array (H, W[, C]) / (B, H, W, C) or a tensor (C, H, W) / (B, C, H, W)."""
    import numpy as np
    import PIL.Image

    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return tuple(first.shape[-3:-1]) if first.ndim >= 3 else tuple(first.shape)
    if isinstance(first, torch.Tensor):
        return tuple(first.shape[-2:])
    return None


def _channels(image: Any) -> int | None:
    """Channels of an array or tensor image (None for PIL images, which are converted to RGB)."""
    import numpy as np

    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, torch.Tensor):
        return 1 if first.dim() == 2 else int(first.shape[-3])
    if isinstance(first, np.ndarray):
        return 1 if first.ndim == 2 else int(first.shape[-1])
    return None


def check_control_image(image: Any, port: str = "image") -> None:
    """A ConfigError for what cannot be a control image: not an image, a tensor/array of 2 or 4+ channels (RGB or
    grayscale only: a 4-channel tensor would pass diffusers' processor unresized as a latent), or values below 0."""
    import numpy as np
    import PIL.Image

    items = image if isinstance(image, list) else [image]
    if not items or not all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in items):
        raise ConfigError(
            f"a control image must be a PIL image, an array or a tensor in [0, 1] (or a list of them), got "
            f"{type(image).__name__}",
            path=port,
        )
    for item in items:
        if isinstance(item, torch.Tensor) and not 2 <= item.dim() <= 4:
            raise ConfigError(f"a control image tensor is (B, C, H, W), got {tuple(item.shape)}", path=port)
        channels = _channels(item)
        if channels is not None and channels not in (1, 3):
            raise ConfigError(
                f"a control image has 3 channels (RGB) or 1 (grayscale, e.g. a depth map), got {channels} "
                f"(shape {tuple(item.shape)})",
                path=port,
            )
        if isinstance(item, (torch.Tensor, np.ndarray)) and item.size and float(item.min()) < 0:
            raise ConfigError(
                "a control image's values are in [0, 1] (not [-1, 1]: the ControlNet takes it unnormalised), "
                f"got a minimum of {float(item.min()):.3g}",
                path=port,
            )


class ControlImageConfig(BlockConfig):
    scale_factor: int = Field(8, ge=1, description="image pixels per latent pixel (the VAE's downsampling)")


@register_block
class ControlImageBlock(Block):
    """A control image (an edge map, a depth or pose map, a previous picture) prepared as the ControlNet pipelines'
    `prepare_image` does: resized to the generation size, RGB, values in [0, 1], repeated to the batch.

    The generation size is the `latent`'s (times the scale factor) when connected, else `height` x `width`,
    else the image's own (rounded down to a multiple of the scale factor, as diffusers does)."""

    block_type = "image/control"
    Config = ControlImageConfig
    inline = True
    INPUTS = (
        Port("image", K.IMAGE, doc="PIL image(s), an array (H, W, C) or a tensor (B, C, H, W) in [0, 1]"),
        Port("latent", K.LATENT, optional=True, doc="the latent being generated: its size sets the image's"),
        Port("height", K.INT, optional=True),
        Port("width", K.INT, optional=True),
        Port("batch_size", K.INT, optional=True, default=1, doc="images generated (a single image repeats)"),
    )
    OUTPUTS = (Port("image", K.IMAGE, doc="tensor (B, 3, H, W) in [0, 1]"),)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "image" in inputs and inputs["image"] is not None:
            check_control_image(inputs["image"])
        f = self.config.scale_factor
        for port in ("height", "width"):
            value = inputs.get(port)
            if value is not None and (int(value) <= 0 or int(value) % f):
                raise ConfigError(f"{port} must be a positive multiple of {f}, got {value}", path=port)
        size = _image_size(inputs.get("image"))
        return Work(height=size[0], width=size[1]) if size else Work()

    def forward(
        self,
        image: Any,
        latent: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = 1,
    ) -> dict[str, Any]:
        from diffusers.image_processor import VaeImageProcessor

        check_control_image(image)
        f = self.config.scale_factor
        if latent is not None:
            height, width = int(latent.shape[-2]) * f, int(latent.shape[-1]) * f
            batch_size = int(latent.shape[0])
        processor = VaeImageProcessor(vae_scale_factor=f, do_convert_rgb=True, do_normalize=False)
        prepared = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        if prepared.shape[1] == 1:  # a grayscale map: the ControlNet takes RGB
            prepared = prepared.repeat(1, 3, 1, 1)
        if prepared.shape[0] == 1:  # one control image for the whole batch, as the pipelines repeat it
            prepared = prepared.repeat_interleave(int(batch_size or 1), dim=0)
        return {"image": prepared}


class CannyConfig(BlockConfig):
    low_threshold: int = Field(
        100, ge=0, le=255, description="cv2.Canny's first (lower) hysteresis threshold"
    )
    high_threshold: int = Field(
        200, ge=0, le=255, description="cv2.Canny's second (upper) hysteresis threshold"
    )

    @model_validator(mode="after")
    def _ordered(self) -> CannyConfig:
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold {self.low_threshold} is above high_threshold {self.high_threshold}"
            )
        return self


def _as_uint8_arrays(image: Any) -> list[Any]:
    """RGB uint8 arrays (H, W, 3), one per image, as diffusers' numpy_to_pil rounds [0, 1] floats."""
    import numpy as np
    import PIL.Image

    items = image if isinstance(image, list) else [image]
    arrays = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            arrays.append(np.array(item.convert("RGB")))
            continue
        if isinstance(item, torch.Tensor):
            batch = item.unsqueeze(0) if item.dim() == 3 else item
            if batch.dim() == 2:
                batch = batch[None, None]
            item = batch.permute(0, 2, 3, 1).float().cpu().numpy()
        else:
            item = item[None] if item.ndim == 3 or item.ndim == 2 else item
            item = item[..., None] if item.ndim == 3 else item
        if item.dtype != np.uint8:
            item = (item * 255).round().clip(0, 255).astype("uint8")
        if item.shape[-1] == 1:
            item = np.repeat(item, 3, axis=-1)
        arrays.extend(list(item))
    return arrays


@register_block
class CannyBlock(Block):
    """Canny edges of an image as a control image, as diffusers' ControlNet docs make one: `cv2.Canny` on the RGB
    image, the edge map copied to three channels. Outputs PIL images (what those docs pass the pipeline), so a
    following `image/control` resizes them exactly as the pipeline would."""

    block_type = "image/canny"
    Config = CannyConfig
    inline = True
    INPUTS = (Port("image", K.IMAGE, doc="PIL image(s), an array or a tensor (B, 3, H, W) in [0, 1]"),)
    OUTPUTS = (Port("image", K.IMAGE, doc="a PIL image (a list for several) of white edges on black"),)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if inputs.get("image") is not None:
            check_control_image(inputs["image"])
        return Work()

    def forward(self, image: Any) -> dict[str, Any]:
        import cv2
        import numpy as np
        import PIL.Image

        check_control_image(image)
        low, high = self.config.low_threshold, self.config.high_threshold
        edges = [cv2.Canny(array, low, high) for array in _as_uint8_arrays(image)]
        images = [PIL.Image.fromarray(np.stack([e] * 3, axis=-1)) for e in edges]
        return {"image": images[0] if len(images) == 1 else images}


# ---- the ControlNet ------------------------------------------------------------------------------------
class ControlNetConfig(ModelConfig):
    scale: float = Field(
        1.0, ge=0.0, description="controlnet_conditioning_scale when the `scale` input is unset"
    )
    start: float = Field(
        0.0, ge=0.0, le=1.0, description="control_guidance_start: fraction of steps before control"
    )
    end: float = Field(
        1.0, ge=0.0, le=1.0, description="control_guidance_end: fraction of steps after which it stops"
    )
    guess_mode: bool = Field(
        False,
        description="control the conditional branch only (zeros for the unconditional one), residuals scaled "
        "geometrically from 0.1 (shallowest) to 1 (mid block), as the pipelines' guess_mode",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetConfig:
        if self.start >= self.end:
            raise ValueError(f"start {self.start} must be below end {self.end}")
        return self


def control_keep(state: SolverState | None, start: float, end: float) -> float:
    """1 while the step is inside [start, end] of the schedule, else 0: the pipelines' `controlnet_keep`."""
    if state is None:
        return 1.0
    i, n = state.step, len(state.timesteps)
    return 1.0 - float(i / n < start or (i + 1) / n > end)


@register_block
class ControlNetBlock(ModelBlock):
    """A diffusers `ControlNetModel`: the control image and the UNet's own inputs -> residuals for the UNet's down
    and mid blocks, batched as the UNet's guided call ([uncond, cond]). Takes the same ports as `backbone/unet2d`
    (an SDXL ControlNet also the pooled embedding and time ids), the prepared control image, and the solver
    state (for `start`/`end`, fractions of the steps). `residuals` from another ControlNet are added to."""

    block_type = "adapter/controlnet"
    Config = ControlNetConfig
    default_subfolder = "controlnet"
    INPUTS = (
        Port("sample", K.LATENT, doc="the (solver-scaled) latent model input, as the UNet takes it"),
        Port("timestep", K.TIMESTEP),
        Port("condition", K.EMBEDDING),
        Port("image", K.IMAGE, doc="the control image from image/control: (B, 3, H, W) in [0, 1]"),
        Port("condition_uncond", K.EMBEDDING, optional=True, doc="the negative branch (guidance)"),
        Port("pooled", K.EMBEDDING, optional=True, doc="text_time ControlNets (SDXL): the pooled embedding"),
        Port("pooled_uncond", K.EMBEDDING, optional=True),
        Port("time_ids", K.EMBEDDING, optional=True, doc="text_time: the added time ids"),
        Port("time_ids_uncond", K.EMBEDDING, optional=True),
        Port("scale", K.SCALAR, optional=True, doc="conditioning scale (default: the config's)"),
        Port("state", K.SOLVER_STATE, optional=True, doc="the solver's state: which step of how many runs"),
        Port("residuals", K.ANY, optional=True, doc="another ControlNet's residuals, to add this one's to"),
    )
    OUTPUTS = (Port("residuals", K.ANY, doc="ControlResiduals for the UNet's `control` input"),)

    def model_class(self) -> type:
        from diffusers import ControlNetModel

        return ControlNetModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        scale = inputs.get("scale")
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0
        ):
            raise ConfigError(f"the conditioning scale must be a number >= 0, got {scale!r}", path="scale")
        return Work()

    def _prepared_image(self, image: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The control image for this call's latents: the right channels, size and batch, or a ConfigError."""
        net = self.model
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ConfigError(
                "the control image must be a tensor (B, C, H, W): prepare it with an image/control node",
                path="image",
            )
        wanted = net.config.conditioning_channels
        if image.shape[1] != wanted:
            raise ConfigError(
                f"this ControlNet takes {wanted}-channel control images (its conditioning_channels), got "
                f"{image.shape[1]} channels",
                path="image",
            )
        # The conditioning embedding downsamples once per block but the first: the image must land on the latent.
        factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
        expected = (int(sample.shape[-2]) * factor, int(sample.shape[-1]) * factor)
        if tuple(image.shape[-2:]) != expected:
            raise ConfigError(
                f"the control image is {image.shape[-2]}x{image.shape[-1]} pixels but the latent needs "
                f"{expected[0]}x{expected[1]} (latent {sample.shape[-2]}x{sample.shape[-1]} times {factor}); "
                "an image/control node resizes it to the generation size",
                path="image",
            )
        batch = sample.shape[0]
        if image.shape[0] not in (1, batch):
            raise ConfigError(
                f"the control image holds {image.shape[0]} images for a batch of {batch}: give one, or one per "
                "image generated",
                path="image",
            )
        return _on_model(_to_batch(image, batch), self)

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        image: torch.Tensor,
        condition_uncond: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        pooled_uncond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        time_ids_uncond: torch.Tensor | None = None,
        scale: float | None = None,
        state: SolverState | None = None,
        residuals: ControlResiduals | None = None,
    ) -> dict[str, Any]:
        net = self.model
        batch = sample.shape[0]
        control = self._prepared_image(image, sample)
        sample = _on_model(sample, self)
        config = self.config
        conditioning_scale = (config.scale if scale is None else float(scale)) * control_keep(
            state, config.start, config.end
        )
        guess = config.guess_mode or bool(net.config.get("global_pool_conditions", False))
        guided = condition_uncond is not None
        both = guided and not guess  # both branches in one call, as the UNet's: [uncond, cond]
        text, added = text_conditioning(
            self, batch, condition, condition_uncond, pooled, pooled_uncond, time_ids, time_ids_uncond, both
        )
        if both:
            sample, control = torch.cat([sample] * 2), torch.cat([control] * 2)
        down, mid = net(
            sample,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=control,
            conditioning_scale=conditioning_scale,
            guess_mode=guess,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if guided and guess:  # only the conditional branch was controlled: zeros leave the other as it is
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        own = ControlResiduals(tuple(down), mid)
        return {"residuals": own if residuals is None else residuals + own}
