"""SDXL task nodes: the prompt condition of its two CLIP encoders and the UNet's added time ids.

With the CLIP tokenizers/conditioners (text.py) and the UNet, solvers, guidance and VAE (diffusion.py) they write
`StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` as graphs:

    prompt   -> tok   -> te   --.                       (text_encoder: CLIPTextModel, penultimate layer)
    prompt_2 -> tok_2 -> te_2 --+-> cond (sdxl_text) ---> unet.condition, unet.pooled
                                                          (text_encoder_2: with projection -> pooled)
    the latent's size, original/target size, crop, aesthetic score -> time_ids (sdxl_time_ids) -> unet.time_ids

Both are light (a concatenation, a small tensor): they run where the graph is driven.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, Work
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


class SDXLTextConfig(BlockConfig):
    encoders: Literal[1, 2] = Field(
        2,
        description="2: text_encoder and text_encoder_2 (the base); 1: text_encoder_2 only (the refiner)",
    )


@register_block
class SDXLTextConditionBlock(Block):
    """SDXL's prompt condition, as `encode_prompt` builds it: the encoders' penultimate hidden states
    concatenated on the feature dim; pooled = text_encoder_2's projected embedding.

    A negative prompt left out reaches this block as no embedding (None, from an `optional` tokenizer); with `like`
    and `like_pooled` connected (the prompt's condition) it then gives zeros shaped like them, which is diffusers'
    `force_zeros_for_empty_prompt` (set for SDXL base)."""

    block_type = "conditioner/sdxl_text"
    Config = SDXLTextConfig
    inline = True
    INPUTS = (
        Port("embedding", K.EMBEDDING, optional=True, doc="text_encoder's penultimate hidden state"),
        Port("embedding_2", K.EMBEDDING, optional=True, doc="text_encoder_2's penultimate hidden state"),
        Port("pooled_2", K.EMBEDDING, optional=True, doc="text_encoder_2's projected (pooled) embedding"),
        Port("like", K.EMBEDDING, optional=True, doc="zeros of this shape when no prompt was given"),
        Port("like_pooled", K.EMBEDDING, optional=True, doc="pooled zeros of this shape, likewise"),
    )
    OUTPUTS = (Port("embedding", K.EMBEDDING), Port("pooled", K.EMBEDDING))

    def forward(
        self,
        embedding: torch.Tensor | None = None,
        embedding_2: torch.Tensor | None = None,
        pooled_2: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
        like_pooled: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        # The first encoder's prompt decides, as diffusers checks `negative_prompt is None` only.
        first = embedding if self.config.encoders == 2 else embedding_2
        if first is None:
            if like is None or like_pooled is None:
                raise ConfigError(
                    "no prompt was encoded and no `like`/`like_pooled` to shape zeros by: give a prompt, or "
                    "connect the prompt's condition (negative prompts only)",
                    path="embedding" if self.config.encoders == 2 else "embedding_2",
                )
            return {"embedding": torch.zeros_like(like), "pooled": torch.zeros_like(like_pooled)}
        if embedding_2 is None or pooled_2 is None:
            raise ConfigError(
                "text_encoder_2's embedding and pooled embedding are needed", path="embedding_2"
            )
        parts = [embedding, embedding_2] if self.config.encoders == 2 else [embedding_2]
        return {"embedding": torch.cat(parts, dim=-1), "pooled": pooled_2}


class SDXLTimeIdsConfig(BlockConfig):
    pipeline: Literal["text_to_image", "image_to_image"] = Field(
        "text_to_image",
        description="whose rules build the negative ids (the two SDXL pipelines differ in when the negative "
        "sizes and crop are used)",
    )
    aesthetic: bool = Field(
        False,
        description="the refiner's ids (`requires_aesthetics_score`): the aesthetic score instead of the target size",
    )
    scale_factor: int = Field(8, ge=1, description="image pixels per latent pixel (the VAE's downsampling)")


def _pair(value: Any, port: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(
            f"{port} must be a pair of numbers [height, width] or [top, left], got {value!r}", path=port
        )
    return (value[0], value[1])


def _score(value: Any, port: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{port} must be a number, got {value!r}", path=port)
    return float(value)


_PAIRS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


@register_block
class SDXLTimeIdsBlock(Block):
    """The UNet's added time ids (SDXL's micro-conditioning) for both guidance branches, as the SDXL pipelines'
    `_get_add_time_ids`: original size + crop top-left + target size (base), or + aesthetic score (refiner).
    Sizes default to the image's, read from the latent."""

    block_type = "conditioner/sdxl_time_ids"
    Config = SDXLTimeIdsConfig
    inline = True
    INPUTS = (
        Port(
            "latent",
            K.LATENT,
            doc="the latent being denoised: its size times the scale factor is the image's",
        ),
        Port("original_size", K.JSON, optional=True, doc="[height, width]; default: the image's"),
        Port("crops_coords_top_left", K.JSON, optional=True, default=(0, 0)),
        Port("target_size", K.JSON, optional=True, doc="[height, width]; default: the image's"),
        Port("negative_original_size", K.JSON, optional=True),
        Port("negative_crops_coords_top_left", K.JSON, optional=True, default=(0, 0)),
        Port("negative_target_size", K.JSON, optional=True),
        Port("aesthetic_score", K.SCALAR, optional=True, default=6.0),
        Port("negative_aesthetic_score", K.SCALAR, optional=True, default=2.5),
    )
    OUTPUTS = (Port("time_ids", K.EMBEDDING), Port("time_ids_uncond", K.EMBEDDING))

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        for port in _PAIRS:
            _pair(inputs.get(port), port)
        for port in ("aesthetic_score", "negative_aesthetic_score"):
            if inputs.get(port) is not None:
                _score(inputs[port], port)
        return Work()

    def forward(
        self,
        latent: torch.Tensor,
        original_size: Any = None,
        crops_coords_top_left: Any = (0, 0),
        target_size: Any = None,
        negative_original_size: Any = None,
        negative_crops_coords_top_left: Any = (0, 0),
        negative_target_size: Any = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> dict[str, Any]:
        f = self.config.scale_factor
        size = (int(latent.shape[-2]) * f, int(latent.shape[-1]) * f)
        original = _pair(original_size, "original_size") or size
        crop = _pair(crops_coords_top_left, "crops_coords_top_left") or (0, 0)
        target = _pair(target_size, "target_size") or size
        neg_original = _pair(negative_original_size, "negative_original_size")
        neg_crop = _pair(negative_crops_coords_top_left, "negative_crops_coords_top_left") or (0, 0)
        neg_target = _pair(negative_target_size, "negative_target_size")
        if self.config.pipeline == "text_to_image":
            ids = original + crop + target
            # StableDiffusionXLPipeline uses the negative sizes (and crop) only when both sizes are given.
            both = neg_original is not None and neg_target is not None
            neg_ids = neg_original + neg_crop + neg_target if both else ids
        elif self.config.aesthetic:
            ids = original + crop + (_score(aesthetic_score, "aesthetic_score"),)
            neg_score = _score(negative_aesthetic_score, "negative_aesthetic_score")
            neg_ids = (neg_original or original) + neg_crop + (neg_score,)
        else:
            ids = original + crop + target
            # StableDiffusionXLImg2ImgPipeline builds the negative ids with the positive crop.
            neg_ids = (neg_original or original) + crop + (neg_target or target)
        return {
            "time_ids": torch.tensor([list(ids)], dtype=latent.dtype),
            "time_ids_uncond": torch.tensor([list(neg_ids)], dtype=latent.dtype),
        }
