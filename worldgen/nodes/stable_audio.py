"""Stable Audio Open task nodes: the T5 prompt encoder as the pipeline runs it (with its attention mask), the
projection model's conditioning (T5 sequence + seconds start/end), the latent DiT backbone
(`StableAudioDiTModel`), the audio latent's noise, the cosine DPM-Solver and the Oobleck VAE decoder.

With `tokenizer/t5` and `guidance/cfg` they reproduce `StableAudioPipeline` step for step
(worldgen/templates/stable_audio.py wires them):

    prompt -> tok -> te (T5, masked) --.
    negative_prompt -> ... (or zeros) --+--> cond (projection + seconds) --> dit
    start, duration -------------------'
    noise -> schedule -> dit -> cfg -> solver -> vae (Oobleck, trimmed to start..start+duration) -> audio

The clip's time span is given as `start` and `duration` seconds; the pipeline's `audio_end_in_s` is
start + duration. The latent always has the DiT's full length (`sample_size`): the span conditions the DiT and
then cuts the decoded waveform, as the pipeline does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.nodes.diffusion import SchedulerSolver
from worldgen.nodes.text import T5TextConditionerBlock
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block
from worldgen.rng import RngState, generator_or_none

K = PortKind


def clip_span(start: Any, duration: Any) -> tuple[float, float]:
    """(start, end) seconds of a clip from its `start` and `duration` inputs: numbers, start >= 0 and a positive
    duration; a ConfigError naming the port otherwise."""
    for port, value in (("start", start), ("duration", duration)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ConfigError(f"{port} must be a number of seconds, got {value!r}", path=port)
    if start < 0:
        raise ConfigError(f"start must be at least 0 seconds, got {start}", path="start")
    if duration <= 0:
        raise ConfigError(
            f"duration must be more than 0 seconds, got {duration} (the clip would end at or before its "
            f"start, {start} s)",
            path="duration",
        )
    return float(start), float(start) + float(duration)


def longest_clip(vae_config: Mapping[str, Any], latent_length: int) -> float:
    """The longest clip in seconds (the pipeline's max_audio_length_in_s): the DiT's latent steps x the VAE's
    hop length (the product of its downsampling ratios) / its sampling rate."""
    hop = 1
    for ratio in vae_config["downsampling_ratios"]:
        hop *= int(ratio)
    return latent_length * hop / float(vae_config["sampling_rate"])


def _unloaded_config(block: ModelBlock) -> Mapping[str, Any]:
    """The block's model config, without loading its weights unless they are loaded already."""
    if block.model_loaded:
        return block.model.config
    from worldgen.models.loading import component_config

    ref = block.config.model
    return component_config(ref.source, ref.subfolder or "", ref.revision, block.model_class())


# ---- text and seconds conditioning ---------------------------------------------------------------------
@register_block
class StableAudioT5Block(T5TextConditionerBlock):
    """Token ids → T5's sequence, attending only to the prompt's tokens: `StableAudioPipeline` passes the
    tokenizer's attention mask to T5 (SD3 and Flux do not, so `conditioner/t5_text` leaves it out)."""

    block_type = "conditioner/stable_audio_t5"
    default_subfolder = "text_encoder"

    @inference
    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        if token_ids is None:  # an optional (negative) prompt that was not given
            return {"embedding": None}
        if attention_mask is None:
            raise ConfigError(
                "Stable Audio's T5 attends only to the prompt's tokens: connect the tokenizer's attention_mask",
                path="attention_mask",
            )
        encoder = self.active_model()
        embedding = encoder(token_ids.to(encoder.device), attention_mask=attention_mask.to(encoder.device))[0]
        return {"embedding": embedding.to(dtype=encoder.dtype)}


class ProjectionConfig(ModelConfig):
    guidance: bool = Field(
        False,
        description="also give the negative branch (`*_uncond` outputs): the negative prompt's conditioning, or "
        "zeros where no negative prompt is given, as the pipeline does",
    )


@register_block
class StableAudioProjectionBlock(ModelBlock):
    """T5's sequence and the clip's seconds → the DiT's two conditions, as `StableAudioPipeline.encode_prompt`
    and `encode_duration`: the projected text (zeroed on padding) followed by the projected start and end
    seconds (cross-attention, `condition`), and start and end side by side (`global_condition`, prepended to
    the latent sequence). With `guidance` the negative branch too: the negative prompt's projected text and the
    same seconds, or all zeros when there is no negative prompt."""

    block_type = "conditioner/stable_audio_projection"
    Config = ProjectionConfig
    default_subfolder = "projection_model"
    INPUTS = (
        Port("embedding", K.EMBEDDING, doc="T5's sequence of the prompt (B, L, d)"),
        Port("attention_mask", K.MASK, doc="the prompt's tokens (1) and padding (0), (B, L)"),
        Port("embedding_uncond", K.EMBEDDING, optional=True, doc="the negative prompt's T5 sequence"),
        Port("attention_mask_uncond", K.MASK, optional=True, doc="the negative prompt's attention mask"),
        Port("start", K.SCALAR, optional=True, default=0.0, doc="where the clip starts, in seconds"),
        Port("duration", K.SCALAR, doc="the clip's length in seconds (it ends at start + duration)"),
    )
    OUTPUTS = (
        Port("condition", K.EMBEDDING, doc="(B, L + 2, conditioning_dim): text, start, end"),
        Port("global_condition", K.EMBEDDING, doc="(B, 1, 2 x conditioning_dim): start and end"),
        Port("condition_uncond", K.EMBEDDING, doc="guidance: the negative branch's condition"),
        Port("global_condition_uncond", K.EMBEDDING, doc="guidance: the negative branch's global condition"),
    )

    def model_class(self) -> type:
        from diffusers import StableAudioProjectionModel

        return StableAudioProjectionModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "duration" not in inputs:
            return Work()  # the span comes from another node
        start = inputs.get("start")
        _, end = clip_span(0.0 if start is None else start, inputs["duration"])
        config = _unloaded_config(self)
        self._check_range(end, float(config["min_value"]), float(config["max_value"]))
        return Work()

    @staticmethod
    def _check_range(end: float, low: float, high: float) -> None:
        # The number conditioners clamp to this range, so the pipeline refuses a span outside it.
        if not low <= end <= high:
            raise ConfigError(
                f"the clip ends at {end} s, outside the seconds this model is conditioned on ({low} to {high})",
                path="duration",
            )

    def _text(self, model: Any, embedding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device, dtype = self.placement()
        mask = mask.to(device)
        embedding = embedding.to(device=device, dtype=dtype)
        # Padding's T5 states are zeroed before the projection (the pipeline does this to the negative prompt;
        # the projection acts per token, so the positive prompt's padding, zeroed after it, comes out the same).
        embedding = torch.where(mask.to(torch.bool).unsqueeze(2), embedding, 0.0)
        text = model(text_hidden_states=embedding).text_hidden_states
        return text * mask.unsqueeze(-1).to(text.dtype)

    @inference
    def forward(
        self,
        embedding: torch.Tensor,
        attention_mask: torch.Tensor,
        duration: float,
        embedding_uncond: torch.Tensor | None = None,
        attention_mask_uncond: torch.Tensor | None = None,
        start: float | None = 0.0,
    ) -> dict[str, Any]:
        model = self.model
        start_s, end_s = clip_span(0.0 if start is None else start, duration)
        self._check_range(end_s, float(model.config.min_value), float(model.config.max_value))
        text = self._text(model, embedding, attention_mask)
        batch, device = text.shape[0], text.device
        seconds = model(
            start_seconds=torch.tensor([start_s] * batch, device=device),
            end_seconds=torch.tensor([end_s] * batch, device=device),
        )
        begin, end = seconds.seconds_start_hidden_states, seconds.seconds_end_hidden_states
        condition = torch.cat([text, begin, end], dim=1)
        global_condition = torch.cat([begin, end], dim=2)
        out = {
            "condition": condition,
            "global_condition": global_condition,
            "condition_uncond": None,
            "global_condition_uncond": None,
        }
        if not self.config.guidance:
            return out
        if embedding_uncond is None:  # no negative prompt: the pipeline's negative branch is all zeros
            uncond = torch.zeros_like(condition)
        else:
            if attention_mask_uncond is None:
                raise ConfigError(
                    "a negative prompt's T5 sequence needs its attention mask", path="attention_mask_uncond"
                )
            text_u = self._text(model, embedding_uncond, attention_mask_uncond)
            if text_u.shape[0] == 1 and batch > 1:  # one negative prompt for several prompts
                text_u = text_u.expand(batch, *text_u.shape[1:])
            uncond = torch.cat([text_u, begin, end], dim=1)
        out |= {"condition_uncond": uncond, "global_condition_uncond": global_condition}
        return out


# ---- backbone ------------------------------------------------------------------------------------------
@register_block
class StableAudioDiTBackboneBlock(ModelBlock):
    """One prediction of Stable Audio's latent DiT (`StableAudioDiTModel`): the latent sequence (B, C, L), the
    timestep, the cross-attention condition and the global condition (prepended to the sequence), with the
    rotary position embedding the pipeline computes for L + 1 positions. With the `*_uncond` inputs both
    branches of classifier-free guidance run in one batched call (negative first), as the pipeline does."""

    block_type = "backbone/stable_audio_dit"
    # Self- and cross-attention projections of every DiT block, as peft users target them.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_subfolder = "transformer"
    INPUTS = (
        Port("sample", K.LATENT, doc="the (solver-scaled) latent sequence (B, in_channels, L)"),
        Port("timestep", K.TIMESTEP),
        Port("condition", K.EMBEDDING, doc="(B, tokens, cross_attention_input_dim)"),
        Port("global_condition", K.EMBEDDING, doc="(B, 1, global_states_input_dim)"),
        Port(
            "condition_uncond",
            K.EMBEDDING,
            optional=True,
            doc="the negative branch's condition, for guidance",
        ),
        Port(
            "global_condition_uncond",
            K.EMBEDDING,
            optional=True,
            doc="the negative branch's global condition",
        ),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT))

    def model_class(self) -> type:
        from diffusers import StableAudioDiTModel

        return StableAudioDiTModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if isinstance(inputs.get("sample"), torch.Tensor):
            self._check_sample(inputs["sample"], _unloaded_config(self))
        return Work()

    @staticmethod
    def _check_sample(sample: torch.Tensor, config: Mapping[str, Any]) -> None:
        channels = int(config["in_channels"])
        if sample.dim() != 3 or sample.shape[1] != channels:
            raise ConfigError(
                f"the latent must be (B, {channels}, L) for this DiT, got {tuple(sample.shape)}",
                path="sample",
            )

    def _on_model(self, value: torch.Tensor) -> torch.Tensor:
        device, dtype = self.placement()
        return value.to(device=device, dtype=dtype)

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        global_condition: torch.Tensor,
        condition_uncond: torch.Tensor | None = None,
        global_condition_uncond: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        dit = self.active_model()
        self._check_sample(sample, dit.config)
        sample, condition, global_condition = (
            self._on_model(v) for v in (sample, condition, global_condition)
        )
        if condition.shape[0] == 1 and sample.shape[0] > 1:  # one prompt for a batch of latents
            condition = condition.expand(sample.shape[0], *condition.shape[1:])
            global_condition = global_condition.expand(sample.shape[0], *global_condition.shape[1:])
        if condition.shape[0] != sample.shape[0]:
            raise ConfigError(
                f"{condition.shape[0]} prompts for {sample.shape[0]} latents (give the noise the prompts' count)",
                path="condition",
            )
        guided = condition_uncond is not None
        if guided:
            if global_condition_uncond is None:
                raise ConfigError(
                    "guidance needs the negative branch's global condition too",
                    path="global_condition_uncond",
                )
            uncond = self._on_model(condition_uncond).expand(condition.shape)
            global_u = self._on_model(global_condition_uncond).expand(global_condition.shape)
            sample = torch.cat([sample] * 2)
            condition = torch.cat([uncond, condition])
            global_condition = torch.cat([global_u, global_condition])
        device = sample.device
        # The pipeline's rotary embedding: half the head width, over the latent plus the prepended global token.
        rotary = get_1d_rotary_pos_embed(
            dit.config.attention_head_dim // 2,
            sample.shape[2] + global_condition.shape[1],
            use_real=True,
            repeat_interleave_real=False,
        )
        rotary = tuple(r.to(device) for r in rotary)
        # One timestep for the whole batch, shaped (1,) as the pipeline passes it.
        t = torch.as_tensor(timestep, device=device).reshape(-1)[:1]
        pred = dit(
            sample,
            t,
            encoder_hidden_states=condition,
            global_hidden_states=global_condition,
            rotary_embedding=rotary,
            return_dict=False,
        )[0]
        if not guided:
            return {"pred": pred, "pred_uncond": None}
        pred_uncond, pred_cond = pred.chunk(2)
        return {"pred": pred_cond, "pred_uncond": pred_uncond}


# ---- noise and solver ----------------------------------------------------------------------------------
class AudioNoiseConfig(BlockConfig):
    channels: int = Field(64, ge=1, description="latent channels (the DiT's in_channels)")
    length: int = Field(1024, ge=1, description="latent steps (the DiT's sample_size)")
    dtype: str = "float32"


@register_block
class AudioNoiseBlock(Block):
    """Seeded standard-normal audio latents (B, channels, length), drawn from `rng` as the pipeline's
    `prepare_latents` draws them (`latent/noise` is shaped by an image's height and width)."""

    block_type = "latent/audio_noise"
    Config = AudioNoiseConfig
    inline = True  # drawing a latent's noise is cheaper where the run is driven than as a task
    INPUTS = (Port("batch_size", K.INT, optional=True, default=1), Port("rng", K.RNG, optional=True))
    OUTPUTS = (Port("latent", K.LATENT), Port("rng", K.RNG))

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        batch = inputs.get("batch_size")
        batch = 1 if batch is None else batch
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(
                f"batch_size must be a whole number of at least 1, got {batch!r}", path="batch_size"
            )
        return Work(batch={"batch_size": batch})

    def forward(self, batch_size: int | None = 1, rng: RngState | None = None) -> dict[str, Any]:
        from diffusers.utils.torch_utils import randn_tensor

        from worldgen.models.loading import dtype_from_name

        shape = (int(batch_size or 1), self.config.channels, self.config.length)
        generator = generator_or_none(rng)
        latent = randn_tensor(
            shape, generator=generator, device=torch.device("cpu"), dtype=dtype_from_name(self.config.dtype)
        )
        return {"latent": latent, "rng": RngState.of(generator) if generator is not None else None}


# The scheduler's Brownian-tree noise is seeded with the generator's initial seed (`generator.initial_seed()`),
# which a run's RngState keeps, so a seeded run draws the pipeline's noise; the tree, built at the first step,
# travels in the solver's state to the later steps, as it stays on the pipeline's scheduler.
@register_block
class CosineDPMSolver(SchedulerSolver):
    """Cosine DPM-Solver++ (2M SDE), Stable Audio Open's: stochastic, its Brownian-tree noise seeded by the
    run (a subclass written out rather than `diffusion._solver`'s, so it pickles by this module's name)."""

    block_type = "solver/cosine_dpm"
    scheduler_class_name = "CosineDPMSolverMultistepScheduler"

    def _step(self, latent: Any, pred: Any, state: Any) -> dict[str, Any]:
        # diffusers builds the tree over [sigma_min, sigma_max] and asks it for the step down to sigma 0 (and,
        # in float32, for values a hair outside the ends): torchsde warns about each such query, every run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            return super()._step(latent, pred, state)


# ---- codec ---------------------------------------------------------------------------------------------
class OobleckConfig(ModelConfig):
    latent_length: int | None = Field(
        None,
        ge=1,
        description="the DiT's sample_size (latent steps the graph denoises): with the VAE's hop length and "
        "sampling rate it bounds the clip, checked before the run; None: not checked before the run",
    )


@register_block
class OobleckCodecBlock(ModelBlock):
    """AutoencoderOobleck decoding: a latent sequence → a waveform (B, audio_channels, samples), cut to the
    clip's span [start, start + duration) exactly as `StableAudioPipeline` cuts it (sample int(seconds x rate))
    and clamped to [-1, 1] as the AUDIO port promises; `sample_rate` is the VAE's."""

    block_type = "codec/oobleck"
    Config = OobleckConfig
    default_subfolder = "vae"
    INPUTS = (
        Port("latent", K.LATENT, doc="(B, decoder_input_channels, L)"),
        Port("start", K.SCALAR, optional=True, default=0.0, doc="where the clip starts, in seconds"),
        Port("duration", K.SCALAR, doc="the clip's length in seconds"),
    )
    OUTPUTS = (
        Port("audio", K.AUDIO, doc="(B, audio_channels, samples) in [-1, 1]"),
        Port("sample_rate", K.INT, doc="samples per second (the VAE's sampling_rate)"),
    )

    def model_class(self) -> type:
        from diffusers import AutoencoderOobleck

        return AutoencoderOobleck

    def _check_span(
        self, start: Any, duration: Any, config: Mapping[str, Any], latent_length: int | None
    ) -> None:
        start_s, end_s = clip_span(start, duration)
        rate = float(config["sampling_rate"])
        if int(end_s * rate) - int(start_s * rate) < 1:
            raise ConfigError(
                f"a clip of {duration} s from {start_s} s holds no sample at {rate:g} samples a second",
                path="duration",
            )
        if latent_length is None:
            return
        most = longest_clip(config, latent_length)
        model = self.config.model.source
        if end_s - start_s > most:
            raise ConfigError(
                f"duration {duration} s is longer than model '{model}' makes: at most {most:g} s (its DiT's "
                f"{latent_length} latent steps x the VAE's hop length / {rate:g} Hz)",
                path="duration",
            )
        if end_s > most:
            raise ConfigError(
                f"a clip of {duration} s from {start_s} s ends at {end_s:g} s, past the {most:g} s model '{model}' "
                "makes (the clip would come back short): start earlier",
                path="start",
            )

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "duration" not in inputs:
            return Work()  # the span comes from another node
        start = inputs.get("start")
        self._check_span(
            0.0 if start is None else start,
            inputs["duration"],
            _unloaded_config(self),
            self.config.latent_length,
        )
        return Work()

    @inference
    def forward(self, latent: torch.Tensor, duration: float, start: float | None = 0.0) -> dict[str, Any]:
        vae = self.model
        start = 0.0 if start is None else start
        self._check_span(start, duration, vae.config, self.config.latent_length or int(latent.shape[-1]))
        start_s, end_s = clip_span(start, duration)
        device, dtype = self.placement()
        audio = vae.decode(latent.to(device=device, dtype=dtype)).sample
        rate = vae.config.sampling_rate
        audio = audio[:, :, int(start_s * rate) : int(end_s * rate)]
        return {"audio": audio.clamp(-1.0, 1.0), "sample_rate": int(rate)}
