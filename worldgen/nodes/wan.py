"""Wan 2.x task nodes: text to video (`WanPipeline`) and image to video (`WanImageToVideoPipeline`) as blocks.

    prompt -> tokenizer/umt5 -> conditioner/umt5 (trimmed to its tokens, zero-padded) ------------.
    latent/video_noise -> solver -> backbone/wan_transformer -> guidance/cfg -> solver ... -> codec/wan_vae -> video
    image -> conditioner/clip_vision (penultimate hidden states) -------------------------------^ (image to video)
    image -> video/first_frame_clip -> codec/wan_vae (encode) -> latent/wan_i2v_condition ------^

A latent is (B, 16, F', H/8, W/8) with F' = (F - 1) / 4 + 1: the Wan VAE compresses 4k+1 frames into k+1
latent frames and 8x8 pixels into one; the transformer takes (1, 2, 2) patches, so sizes are multiples of 16.
Latents travel normalised (the VAE's latents_mean / latents_std), as the pipelines keep them between the codec
and the transformer. Videos are (B, F, C, H, W) in [0, 1] (PortKind.VIDEO).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any, Literal

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.nodes.text import T5TokenizerBlock
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block
from worldgen.rng import RngState, generator_or_none

K = PortKind
TEMPORAL_SCALE = 4  # the Wan 2.1 VAE: 4 frames per latent frame after the first
SPATIAL_SCALE = 8


def valid_frames(frames: int, temporal: int = TEMPORAL_SCALE) -> bool:
    """Whether a clip of `frames` frames fits the VAE's time compression (4k+1 frames)."""
    return frames >= 1 and (frames - 1) % temporal == 0


def refuse_frames(frames: Any, temporal: int = TEMPORAL_SCALE, most: int | None = None) -> int:
    """`frames` as an int; a ConfigError at `frames` naming the nearest valid counts when it is no 4k+1."""
    if isinstance(frames, bool) or not isinstance(frames, Real) or int(frames) != frames:
        raise ConfigError(f"frames must be a whole number of frames (4k+1), got {frames!r}", path="frames")
    frames = int(frames)
    if not valid_frames(frames, temporal):
        below = max((frames - 1) // temporal * temporal + 1, 1)
        nearest = sorted({below, below + temporal} if frames > 1 else {1, 1 + temporal})
        raise ConfigError(
            f"frames must be {temporal}k+1 (the video VAE packs {temporal} frames per latent frame after the "
            f"first), got {frames}; nearest valid: {' or '.join(map(str, nearest))}",
            path="frames",
        )
    if most is not None and frames > most:
        raise ConfigError(
            f"frames must be at most {most} (the transformer's position embedding), got {frames}",
            path="frames",
        )
    return frames


# ---- text ----------------------------------------------------------------------------------------------
@register_block
class UMT5TokenizerBlock(T5TokenizerBlock):
    """UMT5's tokenizer as the Wan pipelines read prompts: cleaned first (ftfy, HTML entities, whitespace, by
    the pipelines' own `prompt_clean`), padded to `max_length` (512). A longer prompt is refused, as for T5."""

    block_type = "tokenizer/umt5"
    default_subfolder = "tokenizer"

    def model_class(self) -> type:
        from transformers import AutoTokenizer

        return AutoTokenizer

    def _text(self, text: Any, fallback: Any) -> tuple[Any, str]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        text, port = super()._text(text, fallback)
        if isinstance(text, str):
            return prompt_clean(text), port
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [prompt_clean(t) for t in text], port
        return text, port


@register_block
class UMT5ConditionerBlock(ModelBlock):
    """Token ids → UMT5 encoder sequence as the Wan pipelines make it: the encoder attends only to the prompt's
    tokens (the mask is passed), and the sequence is cut to them and padded back with zeros."""

    block_type = "conditioner/umt5"
    lora_targets = ("q", "k", "v", "o")  # the encoder's attention projections
    Config = ModelConfig
    default_subfolder = "text_encoder"
    INPUTS = (Port("token_ids", K.TOKENS), Port("attention_mask", K.MASK))
    OUTPUTS = (
        Port("embedding", K.EMBEDDING, doc="(B, max_length, d_model), zeros after each prompt's tokens"),
    )

    def model_class(self) -> type:
        from transformers import UMT5EncoderModel

        return UMT5EncoderModel

    @inference
    def forward(self, token_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        if token_ids is None:  # an optional prompt that was not given
            return {"embedding": None}
        if attention_mask is None:
            raise ConfigError("the UMT5 encoder needs the tokenizer's attention_mask", path="attention_mask")
        encoder = self.active_model()
        hidden = encoder(token_ids.to(encoder.device), attention_mask.to(encoder.device)).last_hidden_state
        lengths = attention_mask.gt(0).sum(dim=1).tolist()
        # Zero every position after the prompt's own tokens (the pipelines' trim and re-pad).
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        keep = positions < torch.tensor(lengths, device=hidden.device)[:, None]
        embedding = torch.where(keep[..., None], hidden, hidden.new_zeros(()))
        return {"embedding": embedding.to(dtype=encoder.dtype)}


# ---- image conditioning --------------------------------------------------------------------------------
class CLIPVisionConfig(ModelConfig):
    processor_subfolder: str = Field(
        "image_processor", description="the model's CLIPImageProcessor, a sibling of the encoder's subfolder"
    )


@register_block
class CLIPVisionConditionerBlock(ModelBlock):
    """Image → CLIP vision encoder's penultimate hidden states (B, tokens, hidden), read through the model's
    own image processor, as WanImageToVideoPipeline's `encode_image`."""

    block_type = "conditioner/clip_vision"
    Config = CLIPVisionConfig
    default_subfolder = "image_encoder"
    INPUTS = (Port("image", K.IMAGE, doc="PIL image(s), or a float tensor (B, 3, H, W) in [0, 1]"),)
    OUTPUTS = (Port("embedding", K.EMBEDDING, doc="(B, tokens, hidden): hidden_states[-2]"),)

    def __init__(self, config: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._processor: Any = None

    def model_class(self) -> type:
        from transformers import CLIPVisionModel

        return CLIPVisionModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "image" in inputs:  # else it comes from another node
            check_image(inputs["image"])
        return Work()

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoImageProcessor

            from worldgen.models.loading import load_component

            ref = self.config.model.model_copy(update={"subfolder": self.config.processor_subfolder})
            self._processor = load_component(ref, AutoImageProcessor)
        return self._processor

    @inference
    def forward(self, image: Any) -> dict[str, Any]:
        check_image(image)
        encoder = self.active_model()
        # A float tensor is already in [0, 1]: the processor must not divide it by 255 again.
        rescale = {"do_rescale": False} if isinstance(image, torch.Tensor) else {}
        pixels = self.processor(images=image, return_tensors="pt", **rescale).pixel_values
        out = encoder(
            pixel_values=pixels.to(device=encoder.device, dtype=encoder.dtype), output_hidden_states=True
        )
        return {"embedding": out.hidden_states[-2]}


def check_image(image: Any) -> None:
    """A ConfigError at `image` for a value that is no picture: a tensor must be float (B, 3, H, W) in [0, 1]."""
    if image is None:
        raise ConfigError("image to video needs an `image` (its first frame)", path="image")
    if isinstance(image, torch.Tensor):
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3 or not image.dtype.is_floating_point:
            raise ConfigError(
                f"image must be a float tensor (B, 3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}",
                path="image",
            )
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ConfigError("image values must lie in [0, 1]", path="image")


class VideoSizeConfig(BlockConfig):
    height: int = Field(480, ge=16, description="default height in pixels (WanPipeline's)")
    width: int = Field(832, ge=16, description="default width in pixels")
    frames: int = Field(81, ge=1, description="default number of frames (4k+1)")
    multiple_of: int = Field(16, ge=1, description="sizes must be multiples of this (VAE x8, patch x2)")
    temporal_scale_factor: int = Field(
        TEMPORAL_SCALE, ge=1, description="frames per latent frame (the VAE's)"
    )
    max_side: int | None = Field(None, ge=1, description="the largest height or width the transformer takes")
    max_frames: int | None = Field(None, ge=1, description="the most frames the transformer takes")


class _VideoSized(Block):
    """A block sized by a clip's height, width and frame count: checked before any model runs."""

    Config = VideoSizeConfig

    def size(self, height: Any, width: Any, frames: Any) -> tuple[int, int, int]:
        """(height, width, frames): the config's where not given; a ConfigError naming the bad one."""
        c = self.config
        height = c.height if height is None else height
        width = c.width if width is None else width
        frames = refuse_frames(c.frames if frames is None else frames, c.temporal_scale_factor, c.max_frames)
        f = c.multiple_of
        for port, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, Real) or int(value) != value:
                raise ConfigError(f"{port} must be a whole number of pixels, got {value!r}", path=port)
            if value <= 0 or value % f:
                raise ConfigError(
                    f"{port} must be a positive multiple of {f} (the VAE's 8x and the transformer's 2x2 "
                    f"patches), got {value}; nearest valid: {max(int(value) // f * f, f)} or "
                    f"{(int(value) // f + 1) * f}",
                    path=port,
                )
            if c.max_side is not None and value > c.max_side:
                raise ConfigError(
                    f"{port} must be at most {c.max_side} (the transformer's position embedding), got {value}",
                    path=port,
                )
        return int(height), int(width), frames

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        height, width, _ = self.size(inputs.get("height"), inputs.get("width"), inputs.get("frames"))
        return Work(width=width, height=height)


_SIZE_PORTS = (
    Port("height", K.INT, optional=True, doc="pixels, a multiple of 16"),
    Port("width", K.INT, optional=True, doc="pixels, a multiple of 16"),
    Port("frames", K.INT, optional=True, doc="frames of the clip: 4k+1"),
)


class VideoNoiseConfig(VideoSizeConfig):
    channels: int = Field(16, ge=1, description="latent channels (the VAE's z_dim)")
    scale_factor: int = Field(SPATIAL_SCALE, ge=1, description="pixels per latent pixel (the VAE's)")


@register_block
class VideoNoiseBlock(_VideoSized):
    """Seeded standard-normal video latents (B, C, (F-1)/4+1, H/8, W/8), drawn as the Wan pipelines draw them."""

    block_type = "latent/video_noise"
    Config = VideoNoiseConfig
    inline = True  # drawing noise is cheaper where the run is driven than as a task
    INPUTS = (
        *_SIZE_PORTS,
        Port("batch_size", K.INT, optional=True, default=1),
        Port("rng", K.RNG, optional=True),
    )
    OUTPUTS = (Port("latent", K.LATENT), Port("rng", K.RNG))

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        work = super().check_inputs(inputs)
        batch = inputs.get("batch_size")
        batch = 1 if batch is None else int(batch)
        if batch < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch}", path="batch_size")
        work.batch = {"batch_size": batch}
        return work

    def forward(
        self, height=None, width=None, frames=None, batch_size=1, rng: RngState | None = None
    ) -> dict[str, Any]:
        from diffusers.utils.torch_utils import randn_tensor

        height, width, frames = self.size(height, width, frames)
        c = self.config
        latent_frames = (frames - 1) // c.temporal_scale_factor + 1
        shape = (
            int(batch_size or 1),
            c.channels,
            latent_frames,
            height // c.scale_factor,
            width // c.scale_factor,
        )
        generator = generator_or_none(rng)
        # float32 whatever the models' dtype, as the pipelines draw it.
        latent = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return {"latent": latent, "rng": RngState.of(generator) if generator is not None else None}


class FirstFrameClipConfig(VideoSizeConfig):
    first_frame_only: bool = Field(
        False,
        description="the clip is the image alone (Wan 2.2's expand_timesteps models encode only the first frame)",
    )


@register_block
class FirstFrameClipBlock(_VideoSized):
    """Image → the clip WanImageToVideoPipeline encodes as its condition: the image resized to height x width
    (the pipeline's video processor) as frame 0, then frames - 1 empty frames (0 in the VAE's [-1, 1], 0.5 here);
    with `first_frame_only` (Wan 2.2) the image alone."""

    block_type = "video/first_frame_clip"
    Config = FirstFrameClipConfig
    inline = True  # a resize and a concatenation
    INPUTS = (Port("image", K.IMAGE, doc="PIL image, or a float tensor (1, 3, H, W) in [0, 1]"), *_SIZE_PORTS)
    OUTPUTS = (Port("video", K.VIDEO, doc="(B, frames, 3, height, width) in [0, 1]"),)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "image" in inputs:
            check_image(inputs["image"])
        return super().check_inputs(inputs)

    def forward(self, image: Any, height=None, width=None, frames=None) -> dict[str, Any]:
        from diffusers.video_processor import VideoProcessor

        check_image(image)
        height, width, frames = self.size(height, width, frames)
        first = VideoProcessor(vae_scale_factor=SPATIAL_SCALE).preprocess(image, height=height, width=width)
        first = first.to(torch.float32) / 2 + 0.5  # [-1, 1] -> [0, 1] (the codec maps it back exactly)
        if self.config.first_frame_only:
            return {"video": first.unsqueeze(1)}
        rest = first.new_full((first.shape[0], frames - 1, *first.shape[1:]), 0.5)
        return {"video": torch.cat([first.unsqueeze(1), rest], dim=1)}


class I2VConditionConfig(BlockConfig):
    temporal_scale_factor: int = Field(
        TEMPORAL_SCALE, ge=1, description="frames per latent frame (the VAE's)"
    )


@register_block
class I2VConditionBlock(Block):
    """Encoded first-frame clip → what Wan 2.1 image to video concatenates to its latent each step: a mask of
    which frames are given (4 channels: one per frame a latent frame holds; only the first frame) and the clip's
    latent, (B, 4 + C, F', h, w)."""

    block_type = "latent/wan_i2v_condition"
    Config = I2VConditionConfig
    inline = True
    INPUTS = (Port("latent", K.LATENT, doc="the encoded clip (codec/wan_vae, normalised)"),)
    OUTPUTS = (Port("condition", K.LATENT),)

    def forward(self, latent: torch.Tensor) -> dict[str, Any]:
        if latent.dim() != 5:
            raise ConfigError(
                f"a video latent (B, C, F', h, w) is needed, got {tuple(latent.shape)}", path="latent"
            )
        batch, _, latent_frames, h, w = latent.shape
        mask = latent.new_zeros(batch, self.config.temporal_scale_factor, latent_frames, h, w)
        mask[:, :, 0] = 1  # the first latent frame holds the given image (repeated over its 4 channels)
        return {"condition": torch.cat([mask, latent], dim=1)}


def first_frame_mask(latent: torch.Tensor) -> torch.Tensor:
    """Wan 2.2's (1, 1, F', h, w) mask: 0 on the first latent frame (given by the image), 1 on those generated."""
    mask = torch.ones(1, 1, *latent.shape[2:], dtype=torch.float32, device=latent.device)
    mask[:, :, 0] = 0
    return mask


@register_block
class FirstFrameBlendBlock(Block):
    """Wan 2.2 image to video after its denoising loop: the first latent frame replaced by the image's latent,
    as WanImageToVideoPipeline does with `expand_timesteps` before decoding."""

    block_type = "latent/wan_first_frame_blend"
    inline = True
    INPUTS = (
        Port("latent", K.LATENT, doc="the denoised latent (B, C, F', h, w)"),
        Port("first_frame", K.LATENT, doc="the image's latent (B, C, 1, h, w), normalised"),
    )
    OUTPUTS = (Port("latent", K.LATENT),)

    def forward(self, latent: torch.Tensor, first_frame: torch.Tensor) -> dict[str, Any]:
        mask = first_frame_mask(latent)
        return {"latent": (1 - mask) * first_frame.to(latent) + mask * latent}


# ---- codec ---------------------------------------------------------------------------------------------
class WanVAEConfig(ModelConfig):
    mode: Literal["encode", "decode"] = "decode"
    sample: bool = Field(
        False, description="encode: sample the latent distribution (default: its mode, as Wan)"
    )


@register_block
class WanVAECodecBlock(ModelBlock):
    """AutoencoderKLWan as a video codec: VIDEO (B, F, C, H, W) in [0, 1] ↔ normalised latents (B, C, F', h, w)
    (the pipelines' (z - latents_mean) / latents_std). Decoding gives the video as
    `VideoProcessor.postprocess_video(output_type="pt")` does."""

    block_type = "codec/wan_vae"
    Config = WanVAEConfig
    default_subfolder = "vae"

    def model_class(self) -> type:
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan

    def input_ports(self) -> dict[str, Port]:
        if self.config.mode == "decode":
            return {"latent": Port("latent", K.LATENT)}
        return {
            "video": Port("video", K.VIDEO, doc="(B, F, 3, H, W) in [0, 1], F = 4k+1"),
            "rng": Port("rng", K.RNG, optional=True),
        }

    def output_ports(self) -> dict[str, Port]:
        if self.config.mode == "decode":
            return {"video": Port("video", K.VIDEO, doc="(B, F, 3, H, W) in [0, 1]")}
        return {"latent": Port("latent", K.LATENT), "rng": Port("rng", K.RNG)}

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        video = inputs.get("video")
        if self.config.mode == "decode" or not isinstance(video, torch.Tensor):
            return Work()
        if video.dim() != 5 or video.shape[2] != 3 or not video.dtype.is_floating_point:
            raise ConfigError(
                f"video must be a float tensor (B, F, 3, H, W) in [0, 1], got {video.dtype} {tuple(video.shape)}",
                path="video",
            )
        refuse_frames(video.shape[1])
        return Work(width=video.shape[-1], height=video.shape[-2], batch={"video": video.shape[0]})

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std) shaped to broadcast over (B, C, F', h, w), as the pipelines make them."""
        config = self.model.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(
            like.device, like.dtype
        )
        return mean, inv_std

    @torch.no_grad()
    def forward(self, **inputs: Any) -> dict[str, Any]:
        return self._decode(**inputs) if self.config.mode == "decode" else self._encode(**inputs)

    def training_latent(self, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A clip (B, F, 3, H, W) in [0, 1] -> its normalised latent sampled from the encoder's distribution with
        `generator` (what a denoising loss trains on, as diffusers' training scripts sample it); no gradient: the
        latent is data."""
        vae = self.model
        device, dtype = self.placement()
        pixels = (video.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=device, dtype=dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist.sample(generator=generator).to(torch.float32)
        mean, inv_std = self._statistics(latent)
        return (latent - mean) * inv_std

    def _decode(self, latent: torch.Tensor) -> dict[str, Any]:
        from diffusers.video_processor import VideoProcessor

        vae = self.model
        device, dtype = self.placement()
        latent = latent.to(device=device, dtype=dtype)
        mean, inv_std = self._statistics(latent)
        video = vae.decode(latent / inv_std + mean, return_dict=False)[0]
        processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
        return {"video": processor.postprocess_video(video, output_type="pt")}

    def _encode(self, video: torch.Tensor, rng: RngState | None = None) -> dict[str, Any]:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.model
        device, dtype = self.placement()
        pixels = (video.permute(0, 2, 1, 3, 4) * 2 - 1).to(device=device, dtype=dtype)  # (B, C, F, H, W)
        generator = generator_or_none(rng)
        mode = "sample" if self.config.sample else "argmax"
        latent = retrieve_latents(vae.encode(pixels), generator=generator, sample_mode=mode).to(torch.float32)
        mean, inv_std = self._statistics(latent)
        return {
            "latent": (latent - mean) * inv_std,
            "rng": RngState.of(generator) if generator is not None else rng,
        }


# ---- backbone ------------------------------------------------------------------------------------------
class WanTransformerConfig(ModelConfig):
    expand_timesteps: bool = Field(
        False,
        description="Wan 2.2 TI2V: one timestep per latent token (0 on a given first frame), as the pipelines' "
        "`expand_timesteps`",
    )


@register_block
class WanTransformerBackboneBlock(ModelBlock):
    """One `WanTransformer3DModel` prediction (the flow velocity) for a video latent.

    As the Wan pipelines: the conditional and (with guidance over 1) the unconditional prediction are two calls
    — the negative prompt's sequence in the second — never one batched call. For Wan 2.1 image to video, the
    first-frame `condition` (latent/wan_i2v_condition) is concatenated to the latent along the channels and the
    CLIP-vision `image_embeds` go into both calls.
    """

    block_type = "backbone/wan_transformer"
    Config = WanTransformerConfig
    # What diffusers' Wan LoRAs train: self- and cross-attention projections and the feed-forward.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    default_subfolder = "transformer"
    INPUTS = (
        Port("sample", K.LATENT, doc="(B, C, F', h, w)"),
        Port("timestep", K.TIMESTEP, doc="the solver's timestep (0 to 1000)"),
        Port("condition", K.EMBEDDING, doc="UMT5 sequence (B, seq, text_dim)"),
        Port("condition_uncond", K.EMBEDDING, optional=True, doc="the negative prompt's UMT5 sequence"),
        Port(
            "guidance_scale",
            K.SCALAR,
            optional=True,
            default=5.0,
            doc="the unconditional call runs when this is over 1 (as do_classifier_free_guidance)",
        ),
        Port("image_embeds", K.EMBEDDING, optional=True, doc="CLIP-vision hidden states (image to video)"),
        Port(
            "latent_condition",
            K.LATENT,
            optional=True,
            doc="mask + first-frame latent (Wan 2.1 image to video)",
        ),
        Port(
            "first_frame",
            K.LATENT,
            optional=True,
            doc="the image's latent (B, C, 1, h, w): Wan 2.2 image to video (expand_timesteps) puts it in place "
            "of the first latent frame, at timestep 0",
        ),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT, doc="None without guidance"))

    def model_class(self) -> type:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        scale = inputs.get("guidance_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, Real)):
            raise ConfigError(f"guidance_scale must be a number, got {scale!r}", path="guidance_scale")
        return Work()

    def _expanded(
        self, sample: torch.Tensor, timestep: Any, first_frame: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent and the model's timestep: t for the batch, or (expand_timesteps) t per latent token with
        the image's latent in place of the first frame at t = 0, as the pipelines compute them. `timestep` is one
        for the batch (sampling) or one per clip (B,) (a training loss's random timesteps)."""
        t = torch.as_tensor(timestep, device=sample.device)
        if not self.config.expand_timesteps:
            return sample, t.expand(sample.shape[0])
        mask = torch.ones(1, 1, *sample.shape[2:], dtype=torch.float32, device=sample.device)
        if first_frame is not None:
            mask = first_frame_mask(sample)
            sample = (1 - mask) * first_frame.to(sample) + mask * sample
        _, rows, columns = self.model.config.patch_size
        if t.numel() > 1:  # one timestep per clip: each clip's tokens at its own
            tokens = mask[0][0][:, ::rows, ::columns].flatten()
            return sample, tokens.unsqueeze(0) * t.reshape(-1, 1)
        tokens = (mask[0][0][:, ::rows, ::columns] * t.reshape(())).flatten()
        return sample, tokens.unsqueeze(0).expand(sample.shape[0], -1)

    def _model_input(self, sample: torch.Tensor, latent_condition: torch.Tensor | None) -> torch.Tensor:
        """The latent (with the image condition's channels); a ConfigError when they are not the model's."""
        expected = int(self.model.config.in_channels)
        channels = sample.shape[1] + (0 if latent_condition is None else latent_condition.shape[1])
        if channels != expected:
            need = "an image condition (image to video)" if latent_condition is None else "no image condition"
            raise ConfigError(
                f"this Wan transformer takes {expected} latent channels, got {channels}: it needs {need}",
                path="latent_condition",
            )
        if latent_condition is None:
            return sample
        return torch.cat([sample, latent_condition.to(sample)], dim=1)

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        condition_uncond: torch.Tensor | None = None,
        guidance_scale: float | None = 5.0,
        image_embeds: torch.Tensor | None = None,
        latent_condition: torch.Tensor | None = None,
        first_frame: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        model = self.active_model()
        device, dtype = self.placement()
        batch = sample.shape[0]
        if first_frame is not None and not self.config.expand_timesteps:
            raise ConfigError(
                "a `first_frame` is taken by Wan 2.2 expand_timesteps models only (config expand_timesteps)",
                path="first_frame",
            )
        sample, t = self._expanded(sample, timestep, first_frame)
        hidden = self._model_input(sample, latent_condition).to(device=device, dtype=dtype)
        if (image_embeds is None) != (model.config.image_dim is None):
            raise ConfigError(
                "this Wan transformer takes CLIP-vision image embeddings (an image-to-video model): give "
                "`image_embeds`"
                if image_embeds is None
                else "this Wan transformer takes no image embeddings (a text-to-video model)",
                path="image_embeds",
            )
        if image_embeds is not None:
            image_embeds = image_embeds.repeat(batch // image_embeds.shape[0], 1, 1).to(
                device=device, dtype=dtype
            )
        t = t.to(device)

        def predict(sequence: torch.Tensor) -> torch.Tensor:
            sequence = sequence.to(device=device, dtype=dtype)
            if sequence.shape[0] == 1 and batch > 1:
                sequence = sequence.expand(batch, *sequence.shape[1:])
            return model(
                hidden_states=hidden,
                timestep=t,
                encoder_hidden_states=sequence,
                encoder_hidden_states_image=image_embeds,
                return_dict=False,
            )[0]

        pred = predict(condition)
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        if condition_uncond is None or scale <= 1.0:
            return {"pred": pred, "pred_uncond": None}
        return {"pred": pred, "pred_uncond": predict(condition_uncond)}
