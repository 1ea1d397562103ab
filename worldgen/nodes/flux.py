"""Flux.1 task nodes: the Flux transformer backbone and the latent packing around it.

Flux's transformer sees a latent as a sequence of tokens, one per 2x2 patch, each with its (0, row, column)
position id. `latent/flux_pack` turns a (B, C, H, W) latent into those tokens and ids, `latent/flux_unpack`
turns tokens back (before the VAE decoder). With the text nodes (CLIP's pooled output, T5's sequence),
`latent/noise`, `solver/flow_match_euler` and `codec/vae` they reproduce `FluxPipeline` and
`FluxImg2ImgPipeline` step for step (worldgen/templates/flux.py wires them).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from worldgen.block import Block, ModelBlock, Work, inference
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


# ---- latent packing ------------------------------------------------------------------------------------
def image_ids(rows: int, columns: int, *, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """(rows·columns, 3) position ids of a packed latent's tokens: (0, row, column), row-major, as
    `FluxPipeline._prepare_latent_image_ids` makes them."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def refuse_non_numbers(inputs: Mapping[str, Any], ports: tuple[str, ...]) -> None:
    """A ConfigError at the first of `ports` whose known value is not a number (bools are not numbers)."""
    for port in ports:
        value = inputs.get(port)
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise ConfigError(f"{port} must be a number, got {value!r}", path=port)


@register_block
class FluxPackBlock(Block):
    """(B, C, H, W) latent → (B, H/2·W/2, 4C) tokens of 2x2 patches and their position ids (`img_ids`)."""

    block_type = "latent/flux_pack"
    inline = True  # a reshape: cheaper where the run is driven than as a task of its own
    INPUTS = (Port("latent", K.LATENT, doc="(B, C, H, W), H and W even"),)
    OUTPUTS = (
        Port("latent", K.LATENT, doc="(B, H/2·W/2, 4C) packed tokens"),
        Port("img_ids", K.ANY, doc="(H/2·W/2, 3) position ids of the tokens: (0, row, column)"),
    )

    def forward(self, latent: torch.Tensor) -> dict[str, Any]:
        if latent.dim() != 4 or latent.shape[-2] % 2 or latent.shape[-1] % 2:
            raise ConfigError(
                f"a latent (B, C, H, W) with even H and W is packed into 2x2 patches, got {tuple(latent.shape)} "
                "(the image must be a multiple of twice the VAE's scale factor)",
                path="latent",
            )
        batch, channels, height, width = latent.shape
        rows, columns = height // 2, width // 2
        # Each token holds one 2x2 patch: channels first, then the patch's row and column (as diffusers packs).
        tokens = latent.view(batch, channels, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(batch, rows * columns, channels * 4)
        return {
            "latent": tokens,
            "img_ids": image_ids(rows, columns, dtype=latent.dtype, device=latent.device),
        }


@register_block
class FluxUnpackBlock(Block):
    """(B, tokens, 4C) packed latent → (B, C, H, W), the patch grid read from the tokens' position ids."""

    block_type = "latent/flux_unpack"
    inline = True
    INPUTS = (
        Port("latent", K.LATENT, doc="(B, tokens, 4C) packed tokens"),
        Port("img_ids", K.ANY, doc="the tokens' position ids (from latent/flux_pack)"),
    )
    OUTPUTS = (Port("latent", K.LATENT, doc="(B, C, H, W)"),)

    def forward(self, latent: torch.Tensor, img_ids: torch.Tensor) -> dict[str, Any]:
        rows, columns = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
        if latent.dim() != 3 or latent.shape[1] != rows * columns or latent.shape[2] % 4:
            raise ConfigError(
                f"packed latent {tuple(latent.shape)} does not fit its position ids ({rows}x{columns} patches "
                "of 4·C values)",
                path="latent",
            )
        batch, _, packed = latent.shape
        channels = packed // 4
        grid = latent.view(batch, rows, columns, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return {"latent": grid.reshape(batch, channels, rows * 2, columns * 2)}


# ---- backbone ------------------------------------------------------------------------------------------
@register_block
class FluxTransformerBackboneBlock(ModelBlock):
    """One `FluxTransformer2DModel` prediction (the velocity) for packed latent tokens.

    The model gets the solver's timestep / 1000, the distilled guidance scale when it has guidance embeddings
    (Flux.1-dev; schnell has none and ignores it), CLIP's pooled output, T5's sequence with zero text ids and
    the tokens' image ids. With a negative prompt's embeddings and `true_cfg_scale` > 1 it also predicts the
    negative branch, in a second call as FluxPipeline does (true CFG: `guidance/cfg` combines the two).
    With `control` (adapter/flux_controlnet's residuals) it adds them after its blocks, in both calls, as
    FluxControlNetPipeline does.
    """

    block_type = "backbone/flux_transformer"
    # The projections diffusers' Flux LoRA training scripts target: joint attention (image and text
    # streams), the single blocks' attention (their to_q/k/v) and the double blocks' feed-forwards.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    default_subfolder = "transformer"
    INPUTS = (
        Port("sample", K.LATENT, doc="packed latent tokens (B, tokens, in_channels)"),
        Port("timestep", K.TIMESTEP, doc="the solver's timestep (0 to 1000)"),
        Port("condition", K.EMBEDDING, doc="T5 sequence (B, seq, joint_attention_dim)"),
        Port("pooled", K.EMBEDDING, doc="CLIP pooled output (B, pooled_projection_dim)"),
        Port("img_ids", K.ANY, doc="position ids of the latent tokens (latent/flux_pack)"),
        Port(
            "guidance", K.SCALAR, optional=True, doc="distilled guidance scale (models with guidance embeds)"
        ),
        Port("condition_uncond", K.EMBEDDING, optional=True, doc="negative prompt's T5 sequence"),
        Port("pooled_uncond", K.EMBEDDING, optional=True, doc="negative prompt's CLIP pooled output"),
        Port(
            "true_cfg_scale",
            K.SCALAR,
            optional=True,
            default=1.0,
            doc="the negative branch runs when this is over 1 and a negative prompt is given",
        ),
        Port("control", K.ANY, optional=True, doc="ControlNet residuals (adapter/flux_controlnet)"),
    )
    OUTPUTS = (Port("pred", K.LATENT), Port("pred_uncond", K.LATENT, doc="None without true CFG"))

    def model_class(self) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        refuse_non_numbers(inputs, ("guidance", "true_cfg_scale"))
        return Work()

    @inference
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        pooled: torch.Tensor,
        img_ids: torch.Tensor,
        guidance: float | None = None,
        condition_uncond: torch.Tensor | None = None,
        pooled_uncond: torch.Tensor | None = None,
        true_cfg_scale: float | None = 1.0,
        control: Any = None,
    ) -> dict[str, Any]:
        model = self.model
        device, dtype = self.placement()
        sample = sample.to(device=device, dtype=dtype)
        batch = sample.shape[0]
        t, embedded_guidance = step_embedding_inputs(
            model, timestep, guidance, batch, (device, dtype), "this Flux transformer (Flux.1-dev)"
        )
        ids = img_ids.to(device=device, dtype=dtype)
        residuals = _control_residuals(control, model, device, dtype)

        def predict(sequence: torch.Tensor, pooled_output: torch.Tensor) -> torch.Tensor:
            sequence = batched(sequence.to(device=device, dtype=dtype), batch)
            pooled_output = batched(pooled_output.to(device=device, dtype=dtype), batch)
            return model(
                hidden_states=sample,
                timestep=t,
                guidance=embedded_guidance,
                pooled_projections=pooled_output,
                encoder_hidden_states=sequence,
                txt_ids=torch.zeros(sequence.shape[1], 3, device=device, dtype=dtype),
                img_ids=ids,
                # As FluxControlNetPipeline: the positive prompt's residuals in both calls of true CFG.
                **residuals,
                return_dict=False,
            )[0]

        pred = predict(condition, pooled)
        # As FluxPipeline: true CFG needs a negative prompt (its CLIP pooled output: a negative_prompt_2 alone
        # does not count) and a scale over 1.
        scale = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
        if condition_uncond is None or pooled_uncond is None or scale <= 1:
            return {"pred": pred, "pred_uncond": None}
        return {"pred": pred, "pred_uncond": predict(condition_uncond, pooled_uncond)}


def _control_residuals(control: Any, model: Any, device: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The transformer's ControlNet arguments for `control` (a FluxControl, or None: no control); a
    ConfigError at `control` for residuals of a ControlNet whose width is not the transformer's."""
    if control is None:
        return {}
    if control.width != model.inner_dim:
        raise ConfigError(
            f"the ControlNet's residuals are {control.width} wide but this transformer's blocks are "
            f"{model.inner_dim} (num_attention_heads x attention_head_dim): use a ControlNet made for this model",
            path="control",
        )
    control = control.to(device, dtype)
    return {
        "controlnet_block_samples": list(control.block_samples) or None,
        "controlnet_single_block_samples": list(control.single_block_samples) or None,
    }


def step_embedding_inputs(
    model: Any, timestep: Any, guidance: float | None, batch: int, placement: tuple[Any, Any], what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Flux model's timestep and distilled-guidance inputs for one step, as the pipelines pass them: t
    broadcast to the batch in the latent's dtype and scaled to 0-1, the guidance scale per latent (models with
    guidance embeddings only; `what` names the model in the error when it is missing)."""
    device, dtype = placement
    t = torch.as_tensor(timestep, device=device).expand(batch).to(dtype) / 1000
    if not model.config.guidance_embeds:
        return t, None
    if guidance is None:
        raise ConfigError(f"{what} has guidance embeddings: give it a guidance scale", path="guidance")
    return t, torch.full([batch], float(guidance), device=device, dtype=torch.float32)


def batched(value: torch.Tensor, batch: int) -> torch.Tensor:
    """One prompt's embedding for a batch of latents (e.g. of init images), as the pipelines repeat it."""
    if value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    return value
