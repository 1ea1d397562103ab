"""Flux ControlNet task nodes: `FluxControlNetPipeline`'s control written out as blocks.

    control_image -> image/flux_control (resize to the generation size) -> codec/vae (encode, a sample drawn
    from the run's generator before the noise) -> latent/flux_pack -> adapter/flux_controlnet -> residuals
    -> backbone/flux_transformer.control

`adapter/flux_controlnet` holds one `FluxControlNetModel` (the InstantX kind: it takes the packed VAE latent of
the control image). Each step it predicts the residuals the transformer adds after its double and single
blocks, scaled by the conditioning scale, and zero outside the control's start/end fraction of the steps.
Several ControlNets are chained: each node adds its residuals to the ones it is given, as
`FluxMultiControlNetModel` sums them. worldgen/templates/flux_controlnet.py wires these into the Flux graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.nodes.diffusion import SolverState
from worldgen.nodes.flux import batched, refuse_non_numbers, step_embedding_inputs
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


@dataclass(frozen=True)
class FluxControl:
    """The residuals the Flux transformer adds: one per double block and one per single block of the
    ControlNet (the transformer spreads them over its own blocks)."""

    block_samples: tuple[torch.Tensor, ...]
    single_block_samples: tuple[torch.Tensor, ...]

    def __add__(self, other: FluxControl) -> FluxControl:
        # As FluxMultiControlNetModel merges its nets' outputs: elementwise, the earlier ControlNet's first.
        return FluxControl(
            tuple(a + b for a, b in zip(self.block_samples, other.block_samples, strict=True)),
            tuple(a + b for a, b in zip(self.single_block_samples, other.single_block_samples, strict=True)),
        )

    @property
    def width(self) -> int:
        """The residuals' last dimension: the ControlNet's inner dim, which must be the transformer's."""
        return next(iter(self.block_samples + self.single_block_samples)).shape[-1]

    def to(self, device: Any, dtype: torch.dtype) -> FluxControl:
        return FluxControl(
            tuple(s.to(device=device, dtype=dtype) for s in self.block_samples),
            tuple(s.to(device=device, dtype=dtype) for s in self.single_block_samples),
        )


# ---- the control image ---------------------------------------------------------------------------------
class FluxControlImageConfig(BlockConfig):
    height: int = Field(
        1024, ge=1, description="generation height in pixels when the `height` input is unset"
    )
    width: int = Field(1024, ge=1, description="generation width in pixels when the `width` input is unset")
    multiple: int = Field(
        16, ge=1, description="sizes are cut down to multiples of this (Flux: 2 x VAE factor)"
    )


@register_block
class FluxControlImageBlock(Block):
    """A control image resized to the generation size, as `FluxControlNetPipeline.prepare_image` does with the
    pipeline's image processor (sizes cut down to multiples of 16). `codec/vae` then normalises and encodes it."""

    block_type = "image/flux_control"
    Config = FluxControlImageConfig
    inline = True  # one resize: cheaper where the run is driven than as a task of its own
    INPUTS = (
        Port("image", K.IMAGE, doc="RGB PIL image(s), or a float tensor (B, 3, H, W) in [0, 1]"),
        Port("height", K.INT, optional=True, doc="generation height (default: the config's)"),
        Port("width", K.INT, optional=True, doc="generation width (default: the config's)"),
        Port("like", K.IMAGE, optional=True, doc="image to image: the init image, whose size is generated"),
    )
    OUTPUTS = (Port("image", K.IMAGE, doc="the image at the generation size"),)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        image = inputs.get("image")
        if image is not None:
            _check_control_image(image)
        return Work()

    def forward(
        self, image: Any, height: int | None = None, width: int | None = None, like: Any = None
    ) -> dict[str, Any]:
        from diffusers.image_processor import VaeImageProcessor

        _check_control_image(image)
        processor = VaeImageProcessor(vae_scale_factor=self.config.multiple)
        if like is not None:  # the init image's size, cut down as codec/vae cuts it before encoding
            height, width = processor.get_default_height_width(_first(like))
        height = self.config.height if not height else int(height)
        width = self.config.width if not width else int(width)
        # The processor's own rounding and resampling (Lanczos for PIL), so the pixels match the pipeline's.
        height, width = processor.get_default_height_width(image, height, width)
        if isinstance(image, torch.Tensor):
            batch = image if image.dim() == 4 else image.unsqueeze(0)
            return {"image": processor.resize(batch, height, width)}
        images = image if isinstance(image, list) else [image]
        return {"image": [processor.resize(i, height, width) for i in images]}


def _first(image: Any) -> Any:
    """The first of a list of images, or a tensor batch (B, 3, H, W) (its size is the batch's)."""
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        return image.unsqueeze(0)
    return image[0] if isinstance(image, list) else image


def _check_control_image(image: Any) -> None:
    """A ConfigError at `image` for what the ControlNet cannot take: not RGB, or not an image at all."""
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.dim() not in (3, 4) or shape[-3] != 3 or not image.dtype.is_floating_point:
            raise ConfigError(
                f"control image must be RGB: a float tensor (B, 3, H, W) or (3, H, W) in [0, 1], got "
                f"{image.dtype} {shape}",
                path="image",
            )
        return
    images = image if isinstance(image, list) else [image]
    for picture in images:
        mode = getattr(picture, "mode", None)
        if mode is None:
            raise ConfigError(
                f"control image must be a PIL image or a tensor, got {type(picture).__name__}", path="image"
            )
        if mode != "RGB":
            raise ConfigError(
                f"control image must be RGB (3 channels), got a PIL image in mode '{mode}'; convert it with "
                "image.convert('RGB')",
                path="image",
            )


# ---- the ControlNet ------------------------------------------------------------------------------------
class FluxControlNetConfig(ModelConfig):
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps before the control starts")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps after which the control stops")


@register_block
class FluxControlNetBlock(ModelBlock):
    """One `FluxControlNetModel` call per step: the residuals for the transformer's blocks, from the packed
    latent, the packed control latent and the same conditioning the transformer gets.

    The residuals are scaled by `conditioning_scale` and kept only for steps i with start <= i/n and
    (i+1)/n <= end (the pipeline's `controlnet_keep`); outside that the model is not called (its scaled
    residuals would be zeros). With `control` given (an earlier ControlNet's), this node's residuals are
    added to it, so a chain of nodes is a FluxMultiControlNetModel.
    """

    block_type = "adapter/flux_controlnet"
    Config = FluxControlNetConfig
    default_subfolder = None  # a ControlNet is its own repository (config.json at its root)
    INPUTS = (
        Port("sample", K.LATENT, doc="packed latent tokens (B, tokens, in_channels), as the transformer's"),
        Port("controlnet_cond", K.LATENT, doc="the packed VAE latent of the control image (B, tokens, 64)"),
        Port("timestep", K.TIMESTEP, doc="the solver's timestep (0 to 1000)"),
        Port("condition", K.EMBEDDING, doc="T5 sequence (B, seq, joint_attention_dim)"),
        Port("pooled", K.EMBEDDING, doc="CLIP pooled output (B, pooled_projection_dim)"),
        Port("img_ids", K.ANY, doc="position ids of the latent tokens (latent/flux_pack)"),
        Port("state", K.SOLVER_STATE, optional=True, doc="the solver's state: which step of how many"),
        Port(
            "guidance", K.SCALAR, optional=True, doc="distilled guidance (ControlNets with guidance embeds)"
        ),
        Port("conditioning_scale", K.SCALAR, optional=True, default=1.0, doc="how strongly the control acts"),
        Port("control_mode", K.INT, optional=True, doc="union ControlNets: which control type the image is"),
        Port("control", K.ANY, optional=True, doc="an earlier ControlNet's residuals to add this one's to"),
    )
    OUTPUTS = (Port("control", K.ANY, doc="the residuals (FluxControl) for backbone/flux_transformer"),)

    def model_class(self) -> type:
        from diffusers import FluxControlNetModel

        return FluxControlNetModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        refuse_non_numbers(inputs, ("guidance", "conditioning_scale"))
        mode = inputs.get("control_mode")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or mode < 0):
            raise ConfigError(
                f"control_mode must be a non-negative integer, got {mode!r}", path="control_mode"
            )
        if "control_mode" in inputs:  # a known value (a run's input or its default): check it by the config
            _check_mode(self._num_modes(), mode)
        return Work()

    def _num_modes(self) -> int | None:
        """The union ControlNet's number of control modes (None: no union), from its config: no weights load."""
        if self.model_loaded:
            return self.model.config.num_mode
        from worldgen.models.loading import component_config

        ref = self.config.model
        return component_config(ref.source, ref.subfolder or "", ref.revision, self.model_class()).get(
            "num_mode"
        )

    def keep(self, state: SolverState | None) -> float:
        """1.0 when the control acts at this step, else 0.0 (the pipeline's `controlnet_keep`)."""
        if state is None:
            return 1.0
        i, n = state.step, len(state.timesteps)
        start, end = self.config.start, self.config.end
        return 1.0 - float(i / n < start or (i + 1) / n > end)

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        controlnet_cond: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: torch.Tensor,
        state: SolverState | None = None,
        guidance: float | None = None,
        conditioning_scale: float | None = 1.0,
        control_mode: int | None = None,
        control: FluxControl | None = None,
    ) -> dict[str, Any]:
        scale = (1.0 if conditioning_scale is None else float(conditioning_scale)) * self.keep(state)
        if scale == 0:
            return {"control": control}  # scaled residuals would be zeros: adding them changes nothing
        model = self.model
        self._check_fits(model, sample, controlnet_cond, control_mode)
        device, dtype = self.placement()
        sample = sample.to(device=device, dtype=dtype)
        batch = sample.shape[0]
        t, embedded_guidance = step_embedding_inputs(
            model, timestep, guidance, batch, (device, dtype), "this Flux ControlNet"
        )
        mode = None
        if control_mode is not None:
            mode = torch.full((batch, 1), int(control_mode), device=device, dtype=torch.long)
        sequence = batched(condition.to(device=device, dtype=dtype), batch)
        block_samples, single_block_samples = model(
            hidden_states=sample,
            controlnet_cond=batched(controlnet_cond.to(device=device, dtype=dtype), batch),
            controlnet_mode=mode,
            conditioning_scale=scale,
            timestep=t,
            guidance=embedded_guidance,
            pooled_projections=batched(pooled.to(device=device, dtype=dtype), batch),
            encoder_hidden_states=sequence,
            txt_ids=torch.zeros(sequence.shape[1], 3, device=device, dtype=dtype),
            img_ids=img_ids.to(device=device, dtype=dtype),
            return_dict=False,
        )
        own = FluxControl(tuple(block_samples or ()), tuple(single_block_samples or ()))
        return {"control": own if control is None else control.to(device, dtype) + own}

    def _check_fits(
        self, model: Any, sample: torch.Tensor, cond: torch.Tensor, control_mode: int | None
    ) -> None:
        """ConfigErrors naming the port for inputs the model cannot take (before it fails inside)."""
        if model.input_hint_block is not None:
            raise ConfigError(
                "this Flux ControlNet has an input hint block (the XLabs kind, taking pixels); only ControlNets "
                "that take the control image's packed VAE latent (the InstantX kind) are supported",
                path="model",
            )
        channels = model.config.in_channels
        for port, value in (("sample", sample), ("controlnet_cond", cond)):
            if value.dim() != 3 or value.shape[-1] != channels:
                raise ConfigError(
                    f"{port} must be packed latent tokens (B, tokens, {channels}) for this ControlNet, got "
                    f"{tuple(value.shape)}",
                    path=port,
                )
        if cond.shape[1] != sample.shape[1]:
            raise ConfigError(
                f"the control latent has {cond.shape[1]} tokens but the latent {sample.shape[1]}: the control "
                "image must be encoded at the generation size",
                path="controlnet_cond",
            )
        _check_mode(model.config.num_mode, control_mode)


def _check_mode(modes: int | None, control_mode: int | None) -> None:
    """A union ControlNet (`modes` control types) needs a control_mode below `modes`; others ignore it."""
    if modes is not None and (control_mode is None or not 0 <= int(control_mode) < modes):
        raise ConfigError(
            f"this union ControlNet needs control_mode, one of 0 to {modes - 1} (the control type), got "
            f"{control_mode!r}",
            path="control_mode",
        )
