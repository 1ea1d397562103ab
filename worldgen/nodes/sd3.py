"""Stable Diffusion 3 / 3.5 task nodes: the MMDiT backbone (`SD3Transformer2DModel`) and the light block that
joins the three text encoders' outputs into the transformer's condition (the tokenizers, CLIP and T5 conditioners
are in text.py, the flow-matching solver and the VAE in diffusion.py).

With those they reproduce `StableDiffusion3Pipeline` step for step: two CLIP encoders (penultimate hidden state,
projected pooled embedding), T5 optional (zeros in its place, as diffusers does without it), batched
classifier-free guidance, the flow-matching Euler solver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from worldgen.block import Block, BlockConfig, ModelBlock, Work, inference
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


# ---- conditioning --------------------------------------------------------------------------------------
class SD3JointConfig(BlockConfig):
    t5_length: int = Field(
        256, ge=1, description="tokens of the T5 sequence (the pipeline's max_sequence_length): zeros' length"
    )
    t5_width: int = Field(
        4096, ge=1, description="the T5 embedding width (the transformer's joint_attention_dim): zeros' width"
    )


@register_block
class SD3JointConditionerBlock(Block):
    """Two CLIP outputs and T5's sequence → the MMDiT's condition, as `StableDiffusion3Pipeline.encode_prompt`:
    the CLIP per-token embeddings concatenated on the feature axis and padded to T5's width, then T5's sequence
    appended on the token axis; pooled = both CLIP pooled embeddings concatenated. Without `t5` (a model
    without its third text encoder) zeros of T5's shape (config `t5_length` x `t5_width`) stand in for it."""

    block_type = "conditioner/sd3_joint"
    Config = SD3JointConfig
    inline = True  # a concatenation: cheaper where the run is driven than as a task of its own
    INPUTS = (
        Port("clip_embedding", K.EMBEDDING, doc="first CLIP's penultimate hidden state (B, 77, d1)"),
        Port("clip_pooled", K.EMBEDDING, doc="first CLIP's projected pooled embedding (B, p1)"),
        Port("clip_2_embedding", K.EMBEDDING, doc="second CLIP's penultimate hidden state (B, 77, d2)"),
        Port("clip_2_pooled", K.EMBEDDING, doc="second CLIP's projected pooled embedding (B, p2)"),
        Port("t5_embedding", K.EMBEDDING, optional=True, doc="T5's sequence (B, L, t5_width); absent: zeros"),
    )
    OUTPUTS = (Port("embedding", K.EMBEDDING), Port("pooled", K.EMBEDDING))

    @inference
    def forward(
        self,
        clip_embedding: torch.Tensor,
        clip_pooled: torch.Tensor,
        clip_2_embedding: torch.Tensor,
        clip_2_pooled: torch.Tensor,
        t5_embedding: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        if clip_2_embedding.device != clip_embedding.device:  # the encoders may sit on different devices
            clip_2_embedding = clip_2_embedding.to(clip_embedding.device)
            clip_2_pooled = clip_2_pooled.to(clip_embedding.device)
        _check_same_rows(clip_embedding, clip_2_embedding, "clip_2_embedding", dims=2)
        if t5_embedding is not None:
            _check_same_rows(clip_embedding, t5_embedding, "t5_embedding", dims=1)
        clip = torch.cat([clip_embedding, clip_2_embedding], dim=-1)
        if t5_embedding is None:
            # The pipeline's zeros without T5 take the first text encoder's dtype.
            batch = clip.shape[0]
            shape = (batch, self.config.t5_length, self.config.t5_width)
            t5_embedding = torch.zeros(shape, device=clip.device, dtype=clip_embedding.dtype)
        else:
            t5_embedding = t5_embedding.to(clip.device)
        # F.pad exactly as the pipeline (a T5 narrower than both CLIPs would crop them, as it does there).
        clip = torch.nn.functional.pad(clip, (0, t5_embedding.shape[-1] - clip.shape[-1]))
        embedding = torch.cat([clip, t5_embedding], dim=-2)
        pooled = torch.cat([clip_pooled, clip_2_pooled.to(clip_pooled.device)], dim=-1)
        return {"embedding": embedding, "pooled": pooled}


def _check_same_rows(first: torch.Tensor, other: torch.Tensor, port: str, dims: int) -> None:
    """`other` must agree with the first CLIP embedding on its leading `dims` axes (batch; and tokens for the
    two CLIPs, which are concatenated feature-wise), else a ConfigError naming `port`."""
    if other.dim() != 3 or tuple(other.shape[:dims]) != tuple(first.shape[:dims]):
        what = "batch and token count" if dims == 2 else "batch"
        raise ConfigError(
            f"{port} {tuple(other.shape)} does not match the first CLIP embedding {tuple(first.shape)} in "
            f"{what} (both prompts' encoders must see the same prompts)",
            path=port,
        )


# ---- backbone ------------------------------------------------------------------------------------------
@register_block
class SD3TransformerBackboneBlock(ModelBlock):
    """One MMDiT prediction (`SD3Transformer2DModel`): the latent, the timestep expanded to the batch, the joint
    text sequence and the pooled embedding. With the `*_uncond` inputs it predicts both branches of
    classifier-free guidance in one batched call (negative first), as `StableDiffusion3Pipeline` does."""

    block_type = "backbone/sd3_transformer"
    # Image-stream attention projections and the text stream's (context) ones, as peft users target them.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )
    default_subfolder = "transformer"
    INPUTS = (
        Port("sample", K.LATENT, doc="the latent (B, C, H, W); H and W multiples of the patch size"),
        Port("timestep", K.TIMESTEP),
        Port("condition", K.EMBEDDING, doc="the joint CLIP+T5 sequence (B, tokens, joint_attention_dim)"),
        Port("pooled", K.EMBEDDING, doc="the pooled CLIP embeddings (B, pooled_projection_dim)"),
        Port("condition_uncond", K.EMBEDDING, optional=True, doc="negative prompt's sequence, for guidance"),
        Port("pooled_uncond", K.EMBEDDING, optional=True, doc="negative prompt's pooled embedding"),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT))

    def _on_model(self, value: torch.Tensor) -> torch.Tensor:
        device, dtype = self.placement()
        return value.to(device=device, dtype=dtype)

    def model_class(self) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if "sample" in inputs and isinstance(inputs["sample"], torch.Tensor):
            self._check_sample(inputs["sample"], self._config_unloaded())
        return Work()

    def _config_unloaded(self) -> Mapping[str, Any]:
        """The transformer's config, without loading its weights unless they are loaded already."""
        if self.model_loaded:
            return self.model.config
        from diffusers import SD3Transformer2DModel

        from worldgen.models.loading import component_config

        ref = self.config.model
        return component_config(ref.source, ref.subfolder or "", ref.revision, SD3Transformer2DModel)

    @staticmethod
    def _check_sample(sample: torch.Tensor, config: Mapping[str, Any]) -> None:
        """The latent must fit the transformer: its channels, whole patches, and within the position grid."""
        channels, patch = int(config["in_channels"]), int(config["patch_size"])
        most = config.get("pos_embed_max_size")
        if sample.dim() != 4 or sample.shape[1] != channels:
            raise ConfigError(
                f"the latent must be (B, {channels}, H, W) for this transformer, got {tuple(sample.shape)}",
                path="sample",
            )
        height, width = int(sample.shape[-2]), int(sample.shape[-1])
        if height % patch or width % patch:
            raise ConfigError(
                f"the latent's height and width must be multiples of the patch size {patch}, got "
                f"{height}x{width} (image sizes: multiples of the VAE's scale factor x {patch})",
                path="sample",
            )
        if most is not None and max(height, width) > most * patch:
            raise ConfigError(
                f"the latent is {height}x{width}, larger than this transformer's position grid takes "
                f"({most} patches of {patch}: at most {most * patch} a side)",
                path="sample",
            )

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        pooled: torch.Tensor,
        condition_uncond: torch.Tensor | None = None,
        pooled_uncond: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        transformer = self.model  # its adapter was activated by the call
        self._check_sample(sample, transformer.config)
        sample, condition, pooled = (self._on_model(v) for v in (sample, condition, pooled))
        if condition.shape[0] == 1 and sample.shape[0] > 1:  # one prompt for a batch (e.g. of init images)
            condition = condition.expand(sample.shape[0], *condition.shape[1:])
            pooled = pooled.expand(sample.shape[0], *pooled.shape[1:])
        guided = condition_uncond is not None
        if guided:
            if pooled_uncond is None:
                raise ConfigError(
                    "guidance needs the negative prompt's pooled embedding too", path="pooled_uncond"
                )
            uncond, pooled_u = self._on_model(condition_uncond), self._on_model(pooled_uncond)
            if uncond.shape[0] != condition.shape[0]:  # one negative prompt for several prompts
                uncond = uncond.expand(condition.shape[0], *uncond.shape[1:])
                pooled_u = pooled_u.expand(pooled.shape[0], *pooled_u.shape[1:])
            sample = torch.cat([sample] * 2)
            condition, pooled = torch.cat([uncond, condition]), torch.cat([pooled_u, pooled])
        device = self.placement()[0]
        t = torch.as_tensor(timestep, device=device).reshape(-1)[:1].expand(sample.shape[0])
        pred = transformer(
            hidden_states=sample,
            timestep=t,
            encoder_hidden_states=condition,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if not guided:
            return {"pred": pred, "pred_uncond": None}
        pred_uncond, pred_cond = pred.chunk(2)
        return {"pred": pred_cond, "pred_uncond": pred_uncond}
