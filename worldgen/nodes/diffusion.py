"""Diffusion task nodes backed by diffusers: UNet backbone, classifier-free guidance, latent noise, solvers
(diffusers schedulers, one step per call) and the VAE codec (the text conditioners are in text.py).

With the text nodes they reproduce `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` step for step, so a graph
built from them gives the same image as the pipeline for the same components, seed and settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, ModelRef, Work, inference
from worldgen.errors import ConfigError, ModelLoadError
from worldgen.ports import Aggregation, Port, PortKind
from worldgen.registry import register_block
from worldgen.rng import RngState, generator_or_none

K = PortKind


def _on_model(value: torch.Tensor, block: ModelBlock) -> torch.Tensor:
    device, dtype = block.placement()
    return value.to(device=device, dtype=dtype)


# ---- backbone and guidance -----------------------------------------------------------------------------
@register_block
class UNet2DBackboneBlock(ModelBlock):
    """One UNet prediction. With `condition_uncond` it predicts both branches of classifier-free guidance in
    one batched call, exactly as the diffusers pipelines do. A UNet with SDXL's added conditioning
    (`addition_embed_type: text_time`) also takes the pooled text embedding and the added time ids."""

    block_type = "backbone/unet2d"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections
    default_subfolder = "unet"
    INPUTS = (
        Port("sample", K.LATENT, doc="the (solver-scaled) latent model input"),
        Port("timestep", K.TIMESTEP),
        Port("condition", K.EMBEDDING),
        Port("condition_uncond", K.EMBEDDING, optional=True, doc="negative-prompt embedding for guidance"),
        Port("pooled", K.EMBEDDING, optional=True, doc="text_time UNets (SDXL): the pooled text embedding"),
        Port(
            "pooled_uncond",
            K.EMBEDDING,
            optional=True,
            doc="text_time: the negative prompt's pooled embedding",
        ),
        Port(
            "time_ids", K.EMBEDDING, optional=True, doc="text_time: the added time ids (sizes, crop, score)"
        ),
        Port("time_ids_uncond", K.EMBEDDING, optional=True, doc="text_time: the negative branch's time ids"),
        Port(
            "concat",
            K.LATENT,
            optional=True,
            doc="extra input channels put after the sample's once it is batched for guidance (an inpainting "
            "UNet's mask and masked image latents from latent/inpaint_condition, the x4 upscaler's noised "
            "low-res image)",
        ),
        Port(
            "class_labels",
            K.TIMESTEP,
            optional=True,
            doc="the UNet's class labels (the x4 upscaler's noise level), one per latent",
        ),
        Port(
            "ip_adapter",
            K.EMBEDDING,
            optional=True,
            aggregate=Aggregation.LIST,  # several adapters: one list, as pipe.load_ip_adapter([...]) takes
            doc="an adapter/ip_adapter's image prompt (IP-Adapter)",
        ),
        Port(
            "control",
            K.ANY,
            optional=True,
            doc="ControlNet residuals (adapter/controlnet), batched as this call",
        ),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT))

    def model_class(self) -> type:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def _text_time(self) -> bool:
        """Whether the UNet takes SDXL's added conditioning (read from its config: no weights are loaded)."""
        if self.model_loaded:
            return self.model.config.get("addition_embed_type") == "text_time"
        from diffusers import UNet2DConditionModel

        from worldgen.models.loading import component_config

        ref = self.config.model
        config = component_config(ref.source, ref.subfolder or "", ref.revision, UNet2DConditionModel)
        return config.get("addition_embed_type") == "text_time"

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        unfed = [p for p in ("pooled", "time_ids") if p in inputs and inputs[p] is None]
        if not unfed:
            return Work()
        try:
            text_time = self._text_time()
        except ModelLoadError:
            return Work()  # an unreadable model fails when it loads, with its own error
        if text_time:
            _refuse_missing_text_time(unfed[0])
        return Work()

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        # An IP-Adapter's image prompt is attention the UNet runs with for this call only
        # (worldgen/nodes/ip_adapter.py); the prediction itself is as without it.
        from worldgen.nodes.ip_adapter import image_prompt

        prompt, batch = inputs.pop("ip_adapter", None), inputs["sample"].shape[0]
        with image_prompt(self, prompt, batch, guided=inputs.get("condition_uncond") is not None):
            return super().__call__(**inputs)

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        condition_uncond: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        pooled_uncond: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        time_ids_uncond: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        control: Any = None,
    ) -> dict[str, Any]:
        unet = self.model
        batch = sample.shape[0]
        residuals = _control_kwargs(control, self, batch * (1 if condition_uncond is None else 2))
        guided = condition_uncond is not None
        text, added = text_conditioning(
            self, batch, condition, condition_uncond, pooled, pooled_uncond, time_ids, time_ids_uncond, guided
        )
        sample = _on_model(sample, self)
        extra = _extra_channels(concat, batch, self, sample.shape[1])
        if class_labels is not None:  # labels (indices, or a noise level) keep their dtype
            class_labels = _to_batch(class_labels.reshape(-1), batch).to(sample.device)
        if guided:  # both branches in one call, as the pipelines batch them: [uncond, cond]
            sample, extra = torch.cat([sample] * 2), extra if extra is None else torch.cat([extra] * 2)
            class_labels = None if class_labels is None else torch.cat([class_labels] * 2)
        pred = unet(
            _with_channels(sample, extra),
            timestep,
            encoder_hidden_states=text,
            added_cond_kwargs=added,
            class_labels=class_labels,
            return_dict=False,
            **residuals,
        )[0]
        if not guided:
            return {"pred": pred, "pred_uncond": None}
        pred_uncond, pred_cond = pred.chunk(2)
        return {"pred": pred_cond, "pred_uncond": pred_uncond}


def text_conditioning(
    block: ModelBlock,
    batch: int,
    condition: torch.Tensor,
    condition_uncond: torch.Tensor | None,
    pooled: torch.Tensor | None,
    pooled_uncond: torch.Tensor | None,
    time_ids: torch.Tensor | None,
    time_ids_uncond: torch.Tensor | None,
    guided: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The text condition and SDXL's added conditioning (`text_time` models) of one UNet-shaped call, on the
    block's model: the conditional branch alone, or (`guided`) both branches as the pipelines batch them,
    [uncond, cond]. The UNet and its ControlNets share it."""
    text = _on_model(_to_batch(condition, batch), block)
    added = None
    if block.model.config.get("addition_embed_type") == "text_time":
        if pooled is None or time_ids is None:
            _refuse_missing_text_time("pooled" if pooled is None else "time_ids")
        added = {"text_embeds": _to_batch(pooled, batch), "time_ids": _to_batch(time_ids, batch)}
    if guided:
        text = torch.cat([_on_model(_to_batch(condition_uncond, batch), block), text])
        if added is not None:  # the negative branch's twins go first, as the pipelines concatenate them
            if pooled_uncond is None or time_ids_uncond is None:
                missing = "pooled_uncond" if pooled_uncond is None else "time_ids_uncond"
                raise ConfigError(
                    f"guidance with a text_time model needs `{missing}` too (the negative branch's twin)",
                    path=missing,
                )
            added = {
                "text_embeds": torch.cat([_to_batch(pooled_uncond, batch), added["text_embeds"]]),
                "time_ids": torch.cat([_to_batch(time_ids_uncond, batch), added["time_ids"]]),
            }
    return text, None if added is None else {k: _on_model(v, block) for k, v in added.items()}


def _extra_channels(
    concat: torch.Tensor | None, batch: int, block: UNet2DBackboneBlock, channels: int
) -> torch.Tensor | None:
    """`concat` for the batch, on the model; a ConfigError when the UNet does not take the sample's channels
    plus these (an inpainting UNet needs them, a base UNet none)."""
    extra = None if concat is None else _on_model(_to_batch(concat, batch), block)
    wanted = block.model.config.in_channels
    given = channels + (0 if extra is None else extra.shape[1])
    if given != wanted:
        raise ConfigError(
            f"the UNet takes {wanted} input channels but gets {given} (the sample's {channels} + `concat`'s "
            f"{given - channels}); an inpainting UNet (9) needs the mask and the masked image's latents (the "
            "inpaint template), the x4 upscaler (7) the noised low-res image (the upscale template)",
            path="concat",
        )
    return extra


def _with_channels(sample: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return sample if extra is None else torch.cat([sample, extra], dim=1)


def _to_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """One prompt's (or one size's) value for a batch of latents (e.g. of init images): repeated as needed."""
    if value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    return value


def _control_kwargs(control: Any, block: ModelBlock, batch: int) -> dict[str, Any]:
    """ControlNet residuals (worldgen/nodes/controlnet.py) as the UNet's additional residuals, checked against
    the call's batch (a ControlNet with guidance must be fed the same negative branch as the UNet)."""
    if control is None:
        return {}
    if control.mid.shape[0] != batch:
        raise ConfigError(
            f"the ControlNet residuals are batched for {control.mid.shape[0]} but this call runs {batch} (feed "
            "the ControlNet the same condition_uncond as the UNet)",
            path="control",
        )
    return {
        "down_block_additional_residuals": [_on_model(r, block) for r in control.down],
        "mid_block_additional_residual": _on_model(control.mid, block),
    }


def _refuse_missing_text_time(port: str) -> None:
    raise ConfigError(
        "this UNet (or ControlNet) takes SDXL's added conditioning (config `addition_embed_type: text_time`): connect `pooled` "
        "(text_encoder_2's projected embedding) and `time_ids` (from a conditioner/sdxl_time_ids node), with "
        "their `_uncond` twins for guidance",
        path=port,
    )


class CFGConfig(BlockConfig):
    scale: float = Field(7.5, description="guidance scale used when the `scale` input is not connected")
    rescale: float = Field(0.0, ge=0.0, le=1.0, description="guidance rescale (Lin et al. 2023), 0 = off")


@register_block
class ClassifierFreeGuidanceBlock(Block):
    """pred = uncond + scale · (cond − uncond), optionally rescaled; passes `pred_cond` through without uncond."""

    block_type = "guidance/cfg"
    Config = CFGConfig
    INPUTS = (
        Port("pred_cond", K.LATENT),
        Port("pred_uncond", K.LATENT, optional=True),
        Port("scale", K.SCALAR, optional=True),
    )
    OUTPUTS = (Port("pred", K.LATENT),)

    def forward(
        self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None, scale: float | None = None
    ):
        scale = self.config.scale if scale is None else float(scale)
        if pred_uncond is None or scale <= 1.0:
            # As the diffusers pipelines: guidance only above 1 (a scale of 0, as turbo models run, is the
            # conditional prediction, not the unconditional one).
            return {"pred": pred_cond}
        pred = pred_uncond + scale * (pred_cond - pred_uncond)
        if self.config.rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale=self.config.rescale)
        return {"pred": pred}


# ---- latents -------------------------------------------------------------------------------------------
class NoiseConfig(BlockConfig):
    channels: int = Field(4, ge=1, description="latent channels (the backbone's in_channels)")
    scale_factor: int = Field(8, ge=1, description="image pixels per latent pixel (the VAE's downsampling)")
    height: int = Field(512, ge=8, description="default image height in pixels")
    width: int = Field(512, ge=8, description="default image width in pixels")
    multiple_of: int | None = Field(
        None,
        ge=1,
        description="image sizes must be multiples of this many pixels (default: `scale_factor`; Flux: twice "
        "it, as its backbone takes 2x2 latent patches)",
    )
    dtype: str = "float32"
    multiple_of: int | None = Field(
        None,
        ge=1,
        description="height and width must be multiples of this (default: scale_factor; a patchifying backbone "
        "needs scale_factor x its patch size)",
    )
    max_side: int | None = Field(
        None,
        ge=1,
        description="the largest height or width the backbone takes (e.g. SD3's position embedding)",
    )


@register_block
class GaussianNoiseBlock(Block):
    """Seeded standard-normal latents: shaped by image size (or like another latent), drawn from `rng`."""

    block_type = "latent/noise"
    Config = NoiseConfig
    inline = True  # drawing a latent's noise is cheaper where the run is driven than as a task
    INPUTS = (
        Port("height", K.INT, optional=True),
        Port("width", K.INT, optional=True),
        Port("batch_size", K.INT, optional=True, default=1),
        Port("like", K.LATENT, optional=True, doc="take the shape of this latent instead of the image size"),
        Port("rng", K.RNG, optional=True),
    )
    OUTPUTS = (Port("latent", K.LATENT), Port("rng", K.RNG))

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels: the config's when not given; positive multiples of the scale factor."""
        height = self.config.height if height is None else int(height)
        width = self.config.width if width is None else int(width)
        f = self.config.multiple_of or self.config.scale_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ConfigError(
                f"height and width must be positive multiples of {f}, got {height}x{width}",
                path="height" if height <= 0 or height % f else "width",
            )
        most = self.config.max_side
        if most is not None and max(height, width) > most:
            raise ConfigError(
                f"height and width must be at most {most} (the backbone's largest size), got {height}x{width}",
                path="height" if height > most else "width",
            )
        return height, width

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "like" not in inputs or inputs["like"] is not None:
            return Work()  # shaped like another latent: that one's block sets the size
        height, width = self._size(inputs.get("height"), inputs.get("width"))
        batch = inputs.get("batch_size")
        batch = 1 if batch is None else int(batch)
        if batch < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch}", path="batch_size")
        return Work(width=width, height=height, batch={"batch_size": batch})

    def forward(self, height=None, width=None, batch_size=1, like=None, rng: RngState | None = None):
        from diffusers.utils.torch_utils import randn_tensor

        from worldgen.models.loading import dtype_from_name

        if like is not None:
            shape, dtype = tuple(like.shape), like.dtype
        else:
            f = self.config.scale_factor
            height, width = self._size(height or None, width or None)  # 0: the config's size, as before
            shape = (int(batch_size or 1), self.config.channels, height // f, width // f)
            dtype = dtype_from_name(self.config.dtype)
        generator = generator_or_none(rng)
        latent = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
        return {"latent": latent, "rng": RngState.of(generator) if generator is not None else None}


# ---- solvers -------------------------------------------------------------------------------------------
@dataclass
class SolverState:
    """Everything a scheduler changes while it steps, so each step can be a separate (remote) call."""

    scheduler: dict[str, Any]
    timesteps: torch.Tensor
    step: int
    rng: RngState | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return len(self.timesteps) - self.step


class SolverConfig(BlockConfig):
    model: ModelRef | None = Field(
        None, description="where the scheduler config comes from (e.g. <dir>/scheduler)"
    )
    scheduler: dict[str, Any] = Field(default_factory=dict, description="overrides of the scheduler config")
    num_inference_steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0, description="DDIM-style stochasticity (for schedulers that accept it)")
    noise_at_full_strength: bool = Field(
        False,
        description="with `noise` at strength 1, start from the noise alone (scaled as text to image does), as "
        "the inpaint pipelines do; otherwise the image is noised to the first timestep (image to image)",
    )


class SchedulerSolver(Block):
    """A diffusers scheduler as a solver block. It is called once to set up the schedule (no `state` input:
    scales or noises the entering latent) and then once per step (with `state` and `pred`). The scheduler's
    changing internals travel in the `state` port, so a stateful multistep solver stays correct when every
    step is a separate call, in any process."""

    Config = SolverConfig
    # Scheduler arithmetic on a latent: where the run is driven it costs less than a task (a fused loop runs it
    # on the backbone's host anyway).
    inline = True
    scheduler_class_name: ClassVar[str]
    scheduler_defaults: ClassVar[Mapping[str, Any]] = {}
    INPUTS = (
        Port("latent", K.LATENT, doc="setup: the initial latent (noise, or the encoded image); step: x_t"),
        Port("pred", K.LATENT, optional=True, doc="the guided model prediction for the current step"),
        Port("state", K.SOLVER_STATE, optional=True, doc="absent on the setup call"),
        Port("noise", K.LATENT, optional=True, doc="setup for image-to-image: noise added to `latent`"),
        Port("strength", K.SCALAR, optional=True, default=1.0, doc="image-to-image: how much to re-noise"),
        Port("num_steps", K.INT, optional=True),
        Port("rng", K.RNG, optional=True, doc="setup: generator state for stochastic solvers"),
        Port(
            "denoising_start",
            K.SCALAR,
            optional=True,
            doc="setup: start this far (0-1) into the schedule on a part-denoised `latent`, adding no noise (the "
            "second expert of an SDXL base + refiner hand-off; `strength` is then ignored)",
        ),
        Port(
            "denoising_end",
            K.SCALAR,
            optional=True,
            doc="setup: stop this far (0-1) into the schedule, leaving the rest to another expert",
        ),
        Port(
            "mask",
            K.MASK,
            optional=True,
            doc="setup, inpainting on a base backbone: where to repaint (1), at latent size; after each step the "
            "rest is put back from `latent` (the image's latents) noised to the next timestep with `noise`",
        ),
    )
    OUTPUTS = (
        Port("latent", K.LATENT),
        Port("model_input", K.LATENT, doc="latent scaled for the backbone at `timestep`"),
        Port("timestep", K.TIMESTEP),
        Port("state", K.SOLVER_STATE),
    )

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._template = None
        self._step_param_names: frozenset[str] | None = None

    @property
    def scheduler(self) -> Any:
        """The configured scheduler template (never stepped itself)."""
        if self._template is None:
            import diffusers

            cls = getattr(diffusers, self.scheduler_class_name)
            if self.config.model is not None:
                from worldgen.models.loading import load_component

                base = dict(load_component(self.config.model, cls).config)
            else:
                base = {}
            overrides = {**self.scheduler_defaults, **self.config.scheduler}
            config = {**base, **overrides}
            # diffusers drops the keys a config lists as defaults (`_use_default_values`) when it builds from it:
            # an override is no default (else a Wan UniPC config's `shift` override for Euler is lost).
            if "_use_default_values" in config:
                config["_use_default_values"] = [
                    k for k in config["_use_default_values"] if k not in overrides
                ]
            self._template = cls.from_config(config)
        return self._template

    def _step_params(self) -> frozenset[str]:
        """Keyword arguments the scheduler's `step` accepts (looked up once: it is on the per-step path)."""
        if self._step_param_names is None:
            self._step_param_names = frozenset(inspect.signature(self.scheduler.step).parameters)
        return self._step_param_names

    def save_assets(self, directory) -> None:
        self.scheduler.save_config(directory)

    def load_assets(self, directory) -> None:
        if (directory / "scheduler_config.json").exists():
            import diffusers

            cls = getattr(diffusers, self.scheduler_class_name)
            self._template = cls.from_config(cls.load_config(directory))

    def training_sample(
        self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, the backbone's target) at random training timesteps, one per latent: the
        forward process the model was trained on (DDPM's, with this scheduler's noise schedule; rectified flow
        for a `flow_prediction` scheduler), whatever sampler the graph generates with. Randomness only from
        `generator`."""
        from diffusers import DDPMScheduler

        # a flow model sampled by a multistep solver (Wan's UniPC): it learns the flow's velocity
        if self.scheduler.config.get("prediction_type") == "flow_prediction":
            sigmas, timesteps = flow_training_table(self.scheduler.config)
            return flow_training_sample(latents, noise, generator, sigmas, timesteps)
        accepted = set(inspect.signature(DDPMScheduler.__init__).parameters)
        config = {k: v for k, v in dict(self.scheduler.config).items() if k in accepted}
        ddpm = DDPMScheduler.from_config(config)
        count = int(ddpm.config.num_train_timesteps)
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator, device=generator.device)
        timesteps = timesteps.to(latents.device)
        noisy = ddpm.add_noise(latents, noise, timesteps)
        kind = ddpm.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = ddpm.get_velocity(latents, noise, timesteps)
        elif kind == "sample":
            target = latents
        else:
            raise ConfigError(f"unknown prediction_type '{kind}' in the solver's scheduler config")
        return noisy, timesteps, target

    def loop_iterations(self, inputs: Mapping[str, Any]) -> int | None:
        state = inputs.get("state")
        return state.remaining if isinstance(state, SolverState) else None

    def _restore(self, state: SolverState) -> Any:
        scheduler = object.__new__(type(self.scheduler))
        # Schedulers replace their tensors rather than modifying them, so copying containers is enough.
        for source in (self.scheduler.__dict__, state.scheduler):
            scheduler.__dict__.update({k: _copy_container(v) for k, v in source.items()})
        return scheduler

    @staticmethod
    def _snapshot(scheduler: Any) -> dict[str, Any]:
        return {k: _copy_container(v) for k, v in scheduler.__dict__.items() if k != "_internal_dict"}

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "state" not in inputs:
            return Work()  # a step call: its schedule was set up (and checked) by the setup call
        steps = inputs.get("num_steps")
        steps = self.config.num_inference_steps if steps is None else int(steps)
        most = int(self.scheduler.config.num_train_timesteps)
        if not 1 <= steps <= most:
            raise ConfigError(
                f"steps must be 1 to {most} (the timesteps the scheduler was trained with), got {steps}",
                path="num_steps",
            )
        start = _fraction(inputs.get("denoising_start"), "denoising_start")
        end = _fraction(inputs.get("denoising_end"), "denoising_end")
        if start is not None and end is not None and start >= end:
            raise ConfigError(
                f"denoising_start {start} must be below denoising_end {end} (the hand-off point)",
                path="denoising_start",
            )
        strength = inputs.get("strength")
        if strength is not None:
            if not 0.0 <= float(strength) <= 1.0:
                raise ConfigError(f"strength must be 0 to 1, got {strength}", path="strength")
            if start is None and "noise" not in inputs and self._first_step(steps, float(strength)) >= steps:
                # noise comes from another node (image-to-image) and the strength leaves no step to run
                raise ConfigError(
                    f"strength {strength} with {steps} steps leaves no denoising step; raise either",
                    path="strength",
                )
        return Work(steps=steps)

    def forward(
        self,
        latent,
        pred=None,
        state=None,
        noise=None,
        strength=1.0,
        num_steps=None,
        rng=None,
        denoising_start=None,
        denoising_end=None,
        mask=None,
    ):
        if state is None:
            strength = 1.0 if strength is None else float(strength)
            start = _fraction(denoising_start, "denoising_start")
            end = _fraction(denoising_end, "denoising_end")
            out = self._setup(latent, noise, strength, num_steps, rng, start, end)
            if mask is not None:
                out["state"].extra = _blend_inputs(latent, noise, mask)
            return out
        if pred is None:
            raise ConfigError(f"{self.block_type}: a step call needs `pred` (the model prediction)")
        return self._step(latent, pred, state)

    def _setup(self, latent, noise, strength, num_steps, rng, start=None, end=None):
        scheduler = self._restore(SolverState({}, torch.empty(0), 0))
        steps = int(num_steps or self.config.num_inference_steps)
        pure_noise = noise is not None and strength == 1.0 and self.config.noise_at_full_strength
        # Only the inpaint start at full strength (pure noise) needs no latent.
        if latent is None and not pure_noise:
            raise ConfigError("the setup call needs `latent` (noise, or the encoded image)", path="latent")
        self._set_timesteps(scheduler, steps, noise if latent is None else latent)
        timesteps = scheduler.timesteps
        if start is not None:  # a hand-off: the latent is already part-denoised, as the SDXL pipelines cut it
            timesteps = _cut_start(scheduler, start)
        elif noise is not None:  # image-to-image: start part-way down the schedule (as get_timesteps does)
            t_start = self._first_step(steps, strength)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if len(timesteps) == 0:
                raise ConfigError(
                    f"strength {strength} with {steps} steps leaves no denoising step; raise either"
                )
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            if pure_noise:  # the inpaint pipelines' start at strength 1 (`is_strength_max`)
                latent = self._initial(scheduler, noise)
            else:
                latent = self._noised(scheduler, latent, noise, timesteps[:1].repeat(latent.shape[0]))
        else:
            latent = self._initial(scheduler, latent)
        if end is not None:
            timesteps = timesteps[: _steps_before(scheduler, timesteps, end)]
            if len(timesteps) == 0:
                raise ConfigError(
                    f"denoising_end {end} leaves no denoising step; raise it", path="denoising_end"
                )
        model_input = self._model_input(scheduler, latent, timesteps[0])
        state = SolverState(self._snapshot(scheduler), timesteps, 0, rng)
        return {"latent": latent, "model_input": model_input, "timestep": timesteps[0], "state": state}

    # Hooks where a family of schedulers differs from the DDPM-style ones (see FlowMatchSolver).
    def _set_timesteps(self, scheduler: Any, steps: int, latent: torch.Tensor) -> None:
        scheduler.set_timesteps(steps, device=latent.device)

    def _first_step(self, steps: int, strength: float) -> int:
        """Image-to-image: the index of the first step that runs (as the pipelines' `get_timesteps`)."""
        return max(steps - _denoising_steps(steps, strength), 0)

    def _initial(self, scheduler: Any, latent: torch.Tensor) -> torch.Tensor:
        """Text-to-image: pure noise scaled to the schedule's first step."""
        return latent * scheduler.init_noise_sigma

    def _noised(
        self, scheduler: Any, latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.add_noise(latent, noise, t)

    def _model_input(self, scheduler: Any, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(latent, t)

    def _step(self, latent, pred, state: SolverState):
        if state.remaining <= 0:  # a run's `iterations` asked for more steps than the schedule has
            raise ConfigError(
                f"the schedule has {len(state.timesteps)} steps and all have run; ask for fewer iterations "
                "(or more steps)"
            )
        if (
            latent.device != pred.device
        ):  # the noise is drawn on the CPU; the loop then stays on the backbone's device
            latent = latent.to(pred.device)
        scheduler = self._restore(state)
        t = state.timesteps[state.step]
        generator = generator_or_none(state.rng)
        params = self._step_params()
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = self.config.eta
        latent = scheduler.step(pred, t, latent, **kwargs, return_dict=False)[0]
        step = state.step + 1
        done = step >= len(state.timesteps)
        t_next = state.timesteps[-1] if done else state.timesteps[step]
        if state.extra:  # inpainting on a base backbone: the kept area from the image, as noisy as x_t
            keep = state.extra["image"].to(latent.device)
            if not done:
                keep = self._noised(
                    scheduler, keep, state.extra["noise"].to(latent.device), state.timesteps[step : step + 1]
                )
            mask = state.extra["mask"].to(latent)
            latent = (1 - mask) * keep + mask * latent
        model_input = latent if done else self._model_input(scheduler, latent, t_next)
        new_rng = RngState.of(generator) if generator is not None else None
        new_state = SolverState(self._snapshot(scheduler), state.timesteps, step, new_rng, state.extra)
        return {"latent": latent, "model_input": model_input, "timestep": t_next, "state": new_state}


def _blend_inputs(latent: Any, noise: Any, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each step of masked image-to-image puts back: the image's latents and the noise they are noised with."""
    if latent is None or noise is None:
        raise ConfigError(
            "a `mask` (inpainting on a base backbone) needs `latent` (the image's latents) and `noise`",
            path="latent" if latent is None else "noise",
        )
    return {"image": latent, "noise": noise, "mask": mask}


def _denoising_steps(steps: int, strength: float) -> int:
    """Steps image-to-image runs (as diffusers' get_timesteps): a ConfigError when there would be none."""
    count = min(int(steps * strength), steps)
    if count <= 0:
        raise ConfigError(
            f"strength {strength} with {steps} steps leaves no denoising step; raise either", path="strength"
        )
    return count


def _fraction(value: Any, port: str) -> float | None:
    """A denoising_start/denoising_end value: None (off) or a fraction strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{port} must be a fraction between 0 and 1 (exclusive), got {value!r}", path=port)
    return float(value)


def _cutoff(scheduler: Any, fraction: float) -> int:
    """The training timestep `fraction` of the way into denoising (as the SDXL pipelines compute it)."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def _cut_start(scheduler: Any, start: float) -> torch.Tensor:
    """The timesteps left after `denoising_start` (diffusers' SDXL img2img `get_timesteps`); the scheduler's
    begin index moves with them."""
    count = int((scheduler.timesteps < _cutoff(scheduler, start)).sum().item())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1  # a second-order step must not be cut between its two evaluations
    if count == 0:
        raise ConfigError(
            f"denoising_start {start} leaves no denoising step; lower it", path="denoising_start"
        )
    t_start = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


def _steps_before(scheduler: Any, timesteps: torch.Tensor, end: float) -> int:
    """How many of `timesteps` run before `denoising_end` (diffusers' SDXL `denoising_end` cut)."""
    cutoff = _cutoff(scheduler, end)
    return len([t for t in timesteps if t >= cutoff])


def _copy_container(value: Any) -> Any:
    if type(value) in (list, dict):  # exact types: a scheduler's FrozenDict config stays as it is
        return type(value)(value)
    return value


def _solver(block_type: str, class_name: str, doc: str, **defaults: Any) -> type[SchedulerSolver]:
    cls = type(
        class_name.replace("Scheduler", "Solver"),
        (SchedulerSolver,),
        {
            "block_type": block_type,
            "scheduler_class_name": class_name,
            "scheduler_defaults": defaults,
            "__doc__": doc,
            "__module__": __name__,
        },
    )
    return register_block(cls)


DDIMSolver = _solver("solver/ddim", "DDIMScheduler", "DDIM (deterministic with eta=0).")
PNDMSolver = _solver("solver/pndm", "PNDMScheduler", "PNDM/PLMS, Stable Diffusion's original default.")
EulerSolver = _solver("solver/euler", "EulerDiscreteScheduler", "Euler (k-diffusion sigmas).")
EulerAncestralSolver = _solver(
    "solver/euler_ancestral",
    "EulerAncestralDiscreteScheduler",
    "Euler ancestral (adds seeded noise each step).",
)
HeunSolver = _solver("solver/heun", "HeunDiscreteScheduler", "Heun, second order (two model calls per step).")
DPMSolverPP2M = _solver(
    "solver/dpmpp_2m",
    "DPMSolverMultistepScheduler",
    "DPM-Solver++(2M), multistep: keeps the last model outputs in its state.",
    algorithm_type="dpmsolver++",
    solver_order=2,
)
UniPCSolver = _solver("solver/unipc", "UniPCMultistepScheduler", "UniPC multistep.")


class FlowMatchConfig(SolverConfig):
    sigmas: Literal["scheduler", "linear"] = Field(
        "scheduler",
        description="'scheduler': the scheduler's own sigma range (SD3); 'linear': sigmas 1 -> 1/steps, as the "
        "Flux pipelines pass them",
    )
    patch_size: int = Field(
        2,
        ge=1,
        description="latent pixels per backbone token side, for the image sequence length of dynamic shifting",
    )


@register_block
class FlowMatchSolver(SchedulerSolver):
    """Flow-matching Euler (`FlowMatchEulerDiscreteScheduler`, SD3 and Flux): the latent moves along the predicted
    velocity. With the scheduler's dynamic shifting (Flux) the shift `mu` follows the image's sequence length,
    read from the latent (a packed latent's token count, or a 4-D latent's patches)."""

    block_type = "solver/flow_match_euler"
    Config = FlowMatchConfig
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"

    def _set_timesteps(self, scheduler: Any, steps: int, latent: torch.Tensor) -> None:
        import numpy as np

        config = scheduler.config
        sigmas = None
        if self.config.sigmas == "linear" and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = None
        if config.get("use_dynamic_shifting", False):
            mu = _flow_shift(_image_seq_len(latent, self.config.patch_size), config)
        scheduler.set_timesteps(steps, device=latent.device, sigmas=sigmas, mu=mu)

    def training_sample(
        self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified flow, as diffusers' SD3/Flux LoRA scripts train (uniform timestep density): x_t = (1 - sigma)
        x + sigma noise at one of the scheduler's training sigmas, and the velocity noise - x as the target."""
        scheduler = self.scheduler
        return flow_training_sample(latents, noise, generator, scheduler.sigmas, scheduler.timesteps)

    def _first_step(self, steps: int, strength: float) -> int:
        # The flow pipelines round after subtracting (SD's `get_timesteps` rounds the strength first).
        return int(max(steps - min(steps * strength, steps), 0))

    def _noised(
        self, scheduler: Any, latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return scheduler.scale_noise(latent, t, noise)

    def _initial(self, scheduler: Any, latent: torch.Tensor) -> torch.Tensor:
        return latent  # the noise enters as it is (sigma 1)

    def _model_input(self, scheduler: Any, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latent  # flow matching does not scale the backbone's input


def flow_training_table(config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) a flow-matching model trains on, for a scheduler config with flow sigmas (UniPC's
    `use_flow_sigmas`, Wan's): N sigmas from 1 to 1/N shifted by `flow_shift`, timesteps sigma * N — the table
    FlowMatchEulerDiscreteScheduler builds at its construction with that shift."""
    count = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("flow_shift") or 1.0)
    sigmas = torch.linspace(1.0, 1.0 / count, count, dtype=torch.float64)
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).to(torch.float32)
    return sigmas, sigmas * count


def flow_training_sample(
    latents: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow at one of the training `sigmas` per latent, drawn uniformly from `generator`:
    x_t = (1 - sigma) x + sigma noise, the backbone's timestep the matching entry of `timesteps`, and the
    velocity noise - x as the target. Latents of any rank (images (B, C, h, w), clips (B, C, F', h, w))."""
    index = torch.randint(
        0, len(timesteps), (latents.shape[0],), generator=generator, device=generator.device
    ).cpu()
    chosen = timesteps[index].to(latents.device)
    sigma = sigmas[index].to(device=latents.device, dtype=latents.dtype)
    sigma = sigma.reshape(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - sigma) * latents + sigma * noise
    return noisy, chosen, noise - latents


def _image_seq_len(latent: torch.Tensor, patch_size: int) -> int:
    """Tokens the backbone sees for this latent: a packed (B, tokens, C) latent's count, else (h/p)·(w/p)."""
    if latent.dim() == 3:
        return int(latent.shape[1])
    return (int(latent.shape[-2]) // patch_size) * (int(latent.shape[-1]) // patch_size)


def _flow_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """The dynamic shift `mu` for an image sequence length, by the Flux pipeline's own rule and defaults."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


SOLVERS = {
    "ddim": "solver/ddim",
    "pndm": "solver/pndm",
    "euler": "solver/euler",
    "euler_ancestral": "solver/euler_ancestral",
    "heun": "solver/heun",
    "dpmpp_2m": "solver/dpmpp_2m",
    "unipc": "solver/unipc",
    "flow_match_euler": "solver/flow_match_euler",
}


# ---- codec ---------------------------------------------------------------------------------------------
class VAEConfig(ModelConfig):
    mode: Literal["encode", "decode"] = "decode"
    sample: bool = Field(True, description="encode: sample the latent distribution (else take its mode)")
    pixel_multiple: int | None = Field(
        None,
        ge=1,
        description="encode: images are resized down to multiples of this many pixels, as the pipeline's image "
        "processor does (default: the VAE's scale factor; Flux: twice it)",
    )


def scale_latent(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """A VAE's raw latent in the space the denoiser works in (shifted, then scaled, as diffusers does)."""
    if getattr(vae.config, "shift_factor", None):
        latent = latent - vae.config.shift_factor
    return vae.config.scaling_factor * latent


@register_block
class VAECodecBlock(ModelBlock):
    """AutoencoderKL: images in [0, 1] (B, 3, H, W) ↔ scaled latents. `mode` picks the direction."""

    block_type = "codec/vae"
    Config = VAEConfig
    default_subfolder = "vae"

    def model_class(self) -> type:
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def input_ports(self) -> dict[str, Port]:
        if self.config.mode == "decode":
            return {"latent": Port("latent", K.LATENT)}
        return {
            "image": Port(
                "image",
                K.IMAGE,
                doc="tensor in [0, 1] (B, 3, H, W), or PIL image(s); None: nothing to encode (no latent, the "
                "generator passed on untouched)",
            ),
            "rng": Port("rng", K.RNG, optional=True),
        }

    def output_ports(self) -> dict[str, Port]:
        if self.config.mode == "decode":
            return {"image": Port("image", K.IMAGE, doc="tensor in [0, 1] (B, 3, H, W)")}
        return {"latent": Port("latent", K.LATENT), "rng": Port("rng", K.RNG)}

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        image = inputs.get("image")
        if self.config.mode == "decode" or not isinstance(image, torch.Tensor):
            return Work()  # a latent from another node, or PIL images (their own checks)
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3 or not image.dtype.is_floating_point:
            raise ConfigError(
                f"image must be a float tensor (B, 3, H, W) in [0, 1] (RGB), got {image.dtype} "
                f"{tuple(image.shape)}",
                path="image",
            )
        batch, _, height, width = image.shape
        # The encoder's last norm needs more than one value per group: a latent of at least 2x2.
        least = 2 * self._scale_factor_unloaded()
        if batch < 1 or min(height, width) < least:
            raise ConfigError(
                f"image must be at least {least}x{least} pixels (and hold one), got {tuple(image.shape)}",
                path="image",
            )
        return Work(width=width, height=height, batch={"image": batch})

    def _scale_factor_unloaded(self) -> int:
        """`scale_factor` without loading weights: from the model's config unless the model is loaded."""
        if self.model_loaded:
            return self.scale_factor
        from diffusers import AutoencoderKL

        from worldgen.models.loading import component_config

        ref = self.config.model
        config = component_config(ref.source, ref.subfolder or "", ref.revision, AutoencoderKL)
        return 2 ** (len(config["block_out_channels"]) - 1)

    @torch.no_grad()
    def forward(self, **inputs: Any) -> dict[str, Any]:
        return self._decode(**inputs) if self.config.mode == "decode" else self._encode(**inputs)

    def _decode(self, latent: torch.Tensor) -> dict[str, Any]:
        vae = self.model
        z = _on_model(latent, self) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return {"image": (image / 2 + 0.5).clamp(0, 1)}

    def _encode(self, image: Any, rng: RngState | None = None) -> dict[str, Any]:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        if image is None:  # e.g. an inpainting UNet at full strength, whose pipeline draws no image latents
            return {"latent": None, "rng": rng}
        vae = self.model
        multiple = self.config.pixel_multiple or self.scale_factor
        pixels = VaeImageProcessor(vae_scale_factor=multiple).preprocess(image)
        pixels = _on_model(pixels, self)
        generator = generator_or_none(rng)
        mode = "sample" if self.config.sample else "argmax"
        latent = scale_latent(
            vae, retrieve_latents(vae.encode(pixels), generator=generator, sample_mode=mode)
        )
        return {"latent": latent, "rng": RngState.of(generator) if generator is not None else rng}
