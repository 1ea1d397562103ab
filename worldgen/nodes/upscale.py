"""Upscaler task nodes: what `StableDiffusionUpscalePipeline` (x4) and `StableDiffusionLatentUpscalePipeline` (x2)
do besides the text, loop and VAE nodes every Stable Diffusion graph has (worldgen/nodes/text.py, diffusion.py).

x4: `image/low_res_noise` noises the low-res image at `noise_level` with the pipeline's `low_res_scheduler`; the
UNet (`backbone/unet2d`) takes it as extra input channels (`concat`) and the noise level as its class label.

x2: `codec/latent_upscale_image` encodes the image with the VAE (or takes latents as they are) and upscales them
2x (nearest); `backbone/latent_upscale_unet` is the upscaler's K-diffusion UNet with its preconditioning, so its
prediction is the denoised sample an Euler solver (prediction type "sample") steps with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, ModelRef, Work, inference
from worldgen.errors import ConfigError
from worldgen.nodes.diffusion import SolverState, VAECodecBlock
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block
from worldgen.rng import RngState, generator_or_none

K = PortKind


# ---- shared checks -------------------------------------------------------------------------------------
def _image_size(image: Any, port: str, channels: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(batch, channels, height, width) of an image input: a float tensor (B, C, H, W) or (C, H, W) whose
    channels are one of `channels`, or PIL image(s) (RGB); None for anything else (the processor's business)."""
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.dim() == 3:
            shape = (1, *shape)
        wanted = " or ".join(str(c) for c in channels)
        if len(shape) != 4 or shape[1] not in channels or not image.dtype.is_floating_point:
            raise ConfigError(
                f"image must be a float tensor (B, C, H, W) with {wanted} channels, got {image.dtype} "
                f"{tuple(image.shape)}",
                path=port,
            )
        return shape  # type: ignore[return-value]
    pictures = image if isinstance(image, list) else [image]
    if pictures and all(hasattr(p, "size") and hasattr(p, "mode") for p in pictures):
        modes = sorted({p.mode for p in pictures} - {"RGB"})
        if modes:  # the processor would pass RGBA's 4 or L's 1 channel on to the model
            raise ConfigError(f"PIL images must be RGB, got mode {', '.join(modes)}", path=port)
        width, height = pictures[0].size
        return len(pictures), 3, height, width
    return None


def _check_side(height: int, width: int, least: int, port: str) -> None:
    if min(height, width) < least:
        raise ConfigError(
            f"image must be at least {least}x{least} pixels (the VAE's downsampling), got {height}x{width}",
            path=port,
        )


# ---- x4: the noised low-res image --------------------------------------------------------------------------
class LowResNoiseConfig(BlockConfig):
    model: ModelRef | None = Field(
        None, description="where the low-res scheduler's config comes from (<dir>/low_res_scheduler)"
    )
    scheduler: dict[str, Any] = Field(default_factory=dict, description="overrides of that scheduler config")
    max_noise_level: int = Field(350, ge=0, description="the highest noise level (the pipeline's config)")
    pixel_multiple: int = Field(
        4, ge=1, description="images are resized down to multiples of this (the VAE's scale factor)"
    )
    upscale: int = Field(4, ge=1, description="output pixels per input pixel (for the size budgets)")
    latent_channels: int = Field(4, ge=1, description="channels of the latents to draw (the VAE's)")
    dtype: str = Field("float32", description="dtype of the image and the noises (the text encoder's)")


@register_block
class LowResNoiseBlock(Block):
    """The x4 upscaler's inputs prepared as its pipeline prepares them: the low-res image in [-1, 1], noised by
    the low-res scheduler (a DDPM scheduler) at `noise_level`, the noise level as the UNet's class labels, and
    the initial latents' noise, of the image's size (the x4 upscaler denoises latents as large as the low-res
    image). Both noises come from `rng`, the image's first, in the pipeline's order."""

    block_type = "image/low_res_noise"
    Config = LowResNoiseConfig
    inline = True  # a scheduler's arithmetic on a small image: cheaper where the run is driven than as a task
    INPUTS = (
        Port("image", K.IMAGE, doc="the low-res image: tensor in [0, 1] (B, 3, H, W), or PIL image(s)"),
        Port("noise_level", K.INT, optional=True, default=20, doc="0 to max_noise_level"),
        Port("rng", K.RNG, optional=True),
    )
    OUTPUTS = (
        Port("image", K.LATENT, doc="the noised image, the UNet's extra input channels"),
        Port("class_labels", K.TIMESTEP, doc="the noise level, one per image"),
        Port("noise", K.LATENT, doc="standard-normal latents (B, latent_channels, H, W): the solver's start"),
        Port("rng", K.RNG),
    )

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._scheduler = None

    @property
    def scheduler(self) -> Any:
        """The low-res scheduler (only its noise schedule is used)."""
        if self._scheduler is None:
            from diffusers import DDPMScheduler

            base = {}
            if self.config.model is not None:
                from worldgen.models.loading import load_component

                base = dict(load_component(self.config.model, DDPMScheduler).config)
            self._scheduler = DDPMScheduler.from_config({**base, **self.config.scheduler})
        return self._scheduler

    def save_assets(self, directory) -> None:
        self.scheduler.save_config(directory)  # a saved graph carries the noise schedule it was built with

    def load_assets(self, directory) -> None:
        if (directory / "scheduler_config.json").exists():
            from diffusers import DDPMScheduler

            self._scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(directory))

    def _noise_level(self, value: Any) -> int:
        most = self.config.max_noise_level
        if value is None:
            value = 20
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(
                f"noise_level must be a whole number 0 to {most}, got {value!r}", path="noise_level"
            )
        if not 0 <= int(value) <= most:
            raise ConfigError(
                f"noise_level must be 0 to {most} (the model's max_noise_level), got {int(value)}",
                path="noise_level",
            )
        return int(value)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "noise_level" in inputs:
            self._noise_level(inputs["noise_level"])
        size = _image_size(inputs.get("image"), "image", (3,))
        if size is None:
            return Work()
        batch, _, height, width = size
        _check_side(height, width, self.config.pixel_multiple, "image")
        f = self.config.upscale
        return Work(width=width * f, height=height * f, batch={"image": batch})

    def forward(self, image: Any, noise_level: Any = 20, rng: RngState | None = None) -> dict[str, Any]:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.utils.torch_utils import randn_tensor

        from worldgen.models.loading import dtype_from_name

        level = self._noise_level(noise_level)
        size = _image_size(image, "image", (3,))
        if size is not None:
            _check_side(size[2], size[3], self.config.pixel_multiple, "image")
        processor = VaeImageProcessor(vae_scale_factor=self.config.pixel_multiple, resample="bicubic")
        pixels = processor.preprocess(image).to(dtype=dtype_from_name(self.config.dtype))
        generator = generator_or_none(rng)
        noise = randn_tensor(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        levels = torch.tensor([level], dtype=torch.long)
        noised = self.scheduler.add_noise(pixels, noise, levels)
        batch, _, height, width = pixels.shape
        shape = (batch, self.config.latent_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        return {
            "image": noised,
            "class_labels": levels.repeat(batch),
            "noise": latents,
            "rng": RngState.of(generator) if generator is not None else rng,
        }


# ---- x2: the upscaled image latents and the preconditioned UNet ------------------------------------------------
class LatentUpscaleImageConfig(ModelConfig):
    sample: bool = Field(True, description="sample the latent distribution (else take its mode)")
    pixel_multiple: int | None = Field(
        None,
        ge=1,
        description="images are resized down to multiples of this (default: the VAE's scale factor)",
    )
    upscale: int = Field(2, ge=1, description="latent pixels out per latent pixel in (nearest neighbour)")


@register_block
class LatentUpscaleImageBlock(VAECodecBlock):
    """The x2 latent upscaler's image condition: an image encoded by the VAE (RGB in [0, 1], as `codec/vae`
    encodes it), or latents of the VAE's channels taken as they are, then upscaled 2x (nearest). The result is
    the UNet's extra input channels and the shape of the latents it denoises."""

    block_type = "codec/latent_upscale_image"
    Config = LatentUpscaleImageConfig

    def input_ports(self) -> dict[str, Port]:
        return {
            "image": Port(
                "image",
                K.IMAGE,
                doc="RGB tensor in [0, 1] (B, 3, H, W), PIL image(s), or latents (B, latent channels, h, w)",
            ),
            "rng": Port("rng", K.RNG, optional=True),
        }

    def output_ports(self) -> dict[str, Port]:
        return {
            "latent": Port("latent", K.LATENT, doc="the image latents, upscaled"),
            "rng": Port("rng", K.RNG),
        }

    def _latent_channels(self) -> int:
        if self.model_loaded:
            return int(self.model.config.latent_channels)
        from diffusers import AutoencoderKL

        from worldgen.models.loading import component_config

        ref = self.config.model
        return int(
            component_config(ref.source, ref.subfolder or "", ref.revision, AutoencoderKL)["latent_channels"]
        )

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        image = inputs.get("image")
        size = _image_size(image, "image", (3, self._latent_channels()))
        if size is None:
            return Work()
        batch, channels, height, width = size
        f = self.config.upscale
        if channels == 3:
            scale = self._scale_factor_unloaded()
            _check_side(height, width, 2 * scale, "image")  # the encoder's last norm needs a 2x2 latent
            return Work(width=width * f, height=height * f, batch={"image": batch})
        scale = self._scale_factor_unloaded()  # latents: the image they stand for is `scale` times larger
        return Work(width=width * scale * f, height=height * scale * f, batch={"image": batch})

    @torch.no_grad()
    def forward(self, image: Any, rng: RngState | None = None) -> dict[str, Any]:
        size = _image_size(image, "image", (3, self._latent_channels()))
        if size is not None and size[1] != 3:  # latents from another graph: no encoding
            latent, rng_out = image if image.dim() == 4 else image.unsqueeze(0), rng
        else:
            encoded = self._encode(image, rng)
            latent, rng_out = encoded["latent"], encoded["rng"]
        # The pipeline scales by (noise_level² + 1)^-0.5 at noise level 0: by exactly 1.
        upscaled = torch.nn.functional.interpolate(latent, scale_factor=self.config.upscale, mode="nearest")
        return {"latent": upscaled, "rng": rng_out}


NOISE_LEVEL_EMBED = 64  # the pipeline's noise-level embedding: this many ones, then as many zeros (level 0)


def _sigma(state: SolverState) -> torch.Tensor:
    """The current step's sigma, from the Euler solver's state (the scheduler's sigmas at its step index)."""
    scheduler = state.scheduler
    if "sigmas" not in scheduler:
        raise ConfigError(
            "the latent upscaler's UNet needs a sigma-based solver's state (solver/euler): this one has no sigmas",
            path="state",
        )
    index = scheduler.get("_step_index")
    return scheduler["sigmas"][state.step if index is None else index]


@register_block
class LatentUpscaleUNetBlock(ModelBlock):
    """The x2 latent upscaler's UNet with its preconditioning: it sees the scaled latents and the upscaled image
    latents (`concat`) at timestep log(σ)/4, conditioned on the text sequence and (as `timestep_cond`) the noise
    level embedding with the pooled text embedding; its output (less the last channel) becomes the denoised
    sample c_skip·x + c_out·F(x), c_skip = 1/(σ²+1), c_out = σ/√(σ²+1). σ is the solver's (`state`); `latent`
    is x, unscaled. Both guidance branches in one batched call, as the pipeline does."""

    block_type = "backbone/latent_upscale_unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_subfolder = "unet"
    INPUTS = (
        Port("sample", K.LATENT, doc="the solver-scaled latents x/√(σ²+1)"),
        Port("latent", K.LATENT, doc="the latents x the solver steps (unscaled)"),
        Port("state", K.SOLVER_STATE, doc="the Euler solver's state: the current sigma"),
        Port("timestep", K.TIMESTEP, optional=True, doc="unused: this UNet takes log(σ)/4 instead"),
        Port("condition", K.EMBEDDING, doc="the text sequence (the last layer, before its norm)"),
        Port("pooled", K.EMBEDDING),
        Port("condition_uncond", K.EMBEDDING, optional=True),
        Port("pooled_uncond", K.EMBEDDING, optional=True),
        Port("concat", K.LATENT, doc="the upscaled image latents (codec/latent_upscale_image)"),
        Port(
            "guidance_scale",
            K.SCALAR,
            optional=True,
            doc="0: the unconditional branch alone (the pipeline's prompt-free upscaling at guidance 0)",
        ),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT))

    def model_class(self) -> type:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        latent: torch.Tensor,
        state: SolverState,
        condition: torch.Tensor,
        pooled: torch.Tensor,
        concat: torch.Tensor,
        timestep: Any = None,
        condition_uncond: torch.Tensor | None = None,
        pooled_uncond: torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> dict[str, Any]:
        unet = self.active_model()
        device, dtype = self.placement()
        batch = sample.shape[0]
        sigma = _sigma(state).to(device)
        guided = condition_uncond is not None
        if guided and pooled_uncond is None:
            raise ConfigError("guidance needs `pooled_uncond` too (the negative prompt's pooled embedding)")
        branches = 2 if guided else 1
        texts = [condition_uncond, condition] if guided else [condition]
        pools = [pooled_uncond, pooled] if guided else [pooled]
        text = torch.cat([_to_batch(t, batch) for t in texts]).to(device=device, dtype=dtype)
        pool = torch.cat([_to_batch(p, batch) for p in pools]).to(device=device, dtype=dtype)
        level = torch.cat(
            [
                torch.ones(pool.shape[0], NOISE_LEVEL_EMBED, dtype=dtype, device=device),
                torch.zeros(pool.shape[0], NOISE_LEVEL_EMBED, dtype=dtype, device=device),
            ],
            dim=1,
        )
        x = torch.cat([latent.to(device)] * branches)
        model_input = torch.cat(
            [
                torch.cat([sample] * branches).to(device=device, dtype=dtype),
                torch.cat([concat] * branches).to(device=device, dtype=dtype),
            ],
            dim=1,
        )
        out = unet(
            model_input,
            torch.log(sigma) * 0.25,
            encoder_hidden_states=text,
            timestep_cond=torch.cat([level, pool], dim=1),
        ).sample[:, :-1]
        # The preconditioning, in the pipeline's order of operations (c_out as the scheduler scales an input).
        denoised = 1 / (sigma**2 + 1) * x + sigma / ((sigma**2 + 1) ** 0.5) * out
        if not guided:
            return {"pred": denoised, "pred_uncond": None}
        pred_uncond, pred_cond = denoised.chunk(2)
        if guidance_scale is not None and float(guidance_scale) == 0:
            return {"pred": pred_uncond, "pred_uncond": None}
        return {"pred": pred_cond, "pred_uncond": pred_uncond}


def _to_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """One prompt's value for a batch of latents: repeated as needed."""
    if value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    return value
