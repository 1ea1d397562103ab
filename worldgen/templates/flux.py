"""Flux.1 (schnell and dev) graph templates: text_to_image (`FluxPipeline`) and image_to_image
(`FluxImg2ImgPipeline`), the pipelines written out as task nodes:

    prompt -> tok -> te (CLIP pooled) ----------------------------------------.
    prompt_2 (default: prompt) -> tok_2 -> te_2 (T5 sequence) ------------------.|
    negative_prompt(_2) -> tok_neg/tok_2_neg -> te_neg/te_2_neg (only when given)||
    noise -> pack -> schedule -> flux -> cfg -> solver -> unpack -> vae -> image
                                  ^_____________|  (the denoising loop)

Image to image encodes the image (`vae_enc`), packs it and noise drawn like it, and starts the schedule part
way down (`strength`). `te_neg`/`te_2_neg` share the blocks of `te`/`te_2`, so each model is loaded and stored
once; the negative tokenizers are `optional`: without a negative prompt they give no tokens, the negative
branch stays empty and the transformer runs once per step (true CFG needs a negative prompt and
`true_cfg_scale` > 1, as in diffusers). The defaults follow the model: a transformer with guidance
embeddings is Flux.1-dev (28 steps, guidance 3.5, 512 T5 tokens), one without is schnell (4 steps, no
guidance, 256 tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.templates.families import Family, family_components, read_config, register_family
from worldgen.templates.loop import add_denoising_loop

# The components a Flux graph loads, by subfolder, with the node that loads each (for errors).
_COMPONENT_NODES: dict[str, tuple[str, str]] = {
    "transformer": ("flux", "backbone/flux_transformer"),
    "vae": ("vae", "codec/vae"),
    "text_encoder": ("te", "conditioner/clip_text"),
    "tokenizer": ("tok", "tokenizer/clip"),
    "text_encoder_2": ("te_2", "conditioner/t5_text"),
    "tokenizer_2": ("tok_2", "tokenizer/t5"),
    "scheduler": ("schedule", "solver/flow_match_euler"),
}
T5_LIMIT = 512  # the most T5 tokens the Flux pipelines take (`max_sequence_length`)


@dataclass(frozen=True)
class FluxSpec:
    """What a Flux graph is sized by, read from the model's component configs (no weights loaded)."""

    guidance_embeds: bool  # Flux.1-dev's distilled guidance (schnell has none)
    latent_channels: int  # the transformer's in_channels / 4: it takes 2x2 patches
    vae_scale_factor: int
    default_size: int  # pixels (the VAE's sample_size: 1024 for FLUX.1, the pipeline's default)

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # a 2x2 latent patch per token

    @property
    def defaults(self) -> dict[str, Any]:
        """The model cards' settings: dev 28 steps at guidance 3.5 with 512 T5 tokens, schnell 4 steps, no
        guidance, 256 tokens."""
        if self.guidance_embeds:
            return {"steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512}
        return {"steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}


def flux_spec(ref: Mapping[str, Any]) -> FluxSpec:
    """The model's Flux spec; a ConfigError naming the node and its `model` field when a component the
    graph needs is missing (a pipeline saved without a text encoder), before any weights load."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    source, revision = ref["source"], ref.get("revision")
    present = family_components(source, revision)
    for subfolder, (node, block_type) in _COMPONENT_NODES.items():
        if subfolder not in present:
            raise ConfigError(
                f"node '{node}' ({block_type}) loads the model's '{subfolder}', but '{source}' has none "
                f"(model_index.json: {subfolder} is missing or null); the Flux graph needs every one of "
                f"{', '.join(_COMPONENT_NODES)}: save the pipeline with its {subfolder}",
                path=f"nodes.{node}.config.model",
            )
    transformer = read_config(ref, "transformer", FluxTransformer2DModel)
    vae = read_config(ref, "vae", AutoencoderKL)
    scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return FluxSpec(
        guidance_embeds=bool(transformer.get("guidance_embeds", False)),
        latent_channels=int(transformer.get("in_channels", 64)) // 4,
        vae_scale_factor=scale_factor,
        default_size=int(vae.get("sample_size") or 128 * scale_factor),
    )


def _settings(spec: FluxSpec, **given: Any) -> dict[str, Any]:
    """The builder's options with the model's defaults filled in, checked as the pipelines check them."""
    settings = {k: spec.defaults[k] if given.get(k) is None else given[k] for k in spec.defaults}
    length = settings["max_sequence_length"]
    if not 1 <= int(length) <= T5_LIMIT:
        raise ConfigError(
            f"max_sequence_length must be 1 to {T5_LIMIT} (T5 tokens the Flux pipelines take), got {length}",
            path="max_sequence_length",
        )
    return settings


def _add_text_nodes(g: Graph, ref: dict[str, Any], max_sequence_length: int) -> None:
    """CLIP's pooled output and T5's sequence for the prompt, and the same blocks for the negative prompt."""
    for suffix, tokenizer, encoder, config in (
        ("", "tokenizer/clip", "conditioner/clip_text", {}),  # CLIP: tokenizer/, text_encoder/
        ("_2", "tokenizer/t5", "conditioner/t5_text", {"max_length": max_sequence_length}),  # T5: *_2/
    ):
        tok, te = f"tok{suffix}", f"te{suffix}"
        model = {**ref, "subfolder": f"tokenizer{suffix}"}
        g.add_node(tokenizer, id=tok, config={"model": model, **config}, auto_connect=False)
        # The negative prompt's tokenizer is optional: no negative prompt, no tokens, no negative branch.
        g.add_node(
            tokenizer,
            id=f"{tok}_neg",
            config={"model": model, **config, "optional": True},
            auto_connect=False,
        )
        g.add_node(
            encoder,
            id=te,
            config={"model": {**ref, "subfolder": f"text_encoder{suffix}"}},
            auto_connect=False,
        )
        g.add_node(g.block(te), id=f"{te}_neg", auto_connect=False)
        g.add_edge(f"{tok}.token_ids", f"{te}.token_ids")
        g.add_edge(f"{tok}_neg.token_ids", f"{te}_neg.token_ids")
    g.expose_input("prompt", ["tok.text", "tok_2.fallback"])
    g.expose_input("prompt_2", "tok_2.text", default=None)  # None: the prompt (as `prompt_2 or prompt`)
    g.expose_input("negative_prompt", ["tok_neg.text", "tok_2_neg.fallback"], default=None)
    g.expose_input("negative_prompt_2", "tok_2_neg.text", default=None)


def _add_denoising_loop(
    g: Graph, ref: dict[str, Any], steps: int, guidance_scale: float, true_cfg_scale: float
) -> None:
    """The shared loop around the Flux transformer (true CFG through `cfg`); then unpack and decode."""
    add_denoising_loop(
        g,
        solver="solver/flow_match_euler",
        solver_config={
            "model": {**ref, "subfolder": "scheduler"},
            "num_inference_steps": steps,
            "sigmas": "linear",
        },
        backbone="backbone/flux_transformer",
        backbone_id="flux",
        backbone_config={"model": {**ref, "subfolder": "transformer"}},
        conditions=[
            ("te.pooled", "pooled"),
            ("te_2.embedding", "condition"),
            ("te_neg.pooled", "pooled_uncond"),
            ("te_2_neg.embedding", "condition_uncond"),
            ("pack.img_ids", "img_ids"),
        ],
        cfg_config={"scale": 1.0},
    )
    g.add_node("latent/flux_unpack", id="unpack", auto_connect=False)
    g.add_node(
        "codec/vae",
        id="vae",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "decode"},
        auto_connect=False,
    )
    g.add_edge("solver.latent", "unpack.latent")
    g.add_edge("pack.img_ids", "unpack.img_ids")
    g.add_edge("unpack.latent", "vae.latent")
    g.expose_input("guidance_scale", "flux.guidance", default=guidance_scale)
    g.expose_input("true_cfg_scale", ["flux.true_cfg_scale", "cfg.scale"], default=true_cfg_scale)
    g.expose_output("image", "vae.image")


def flux_text_to_image(
    ref: dict[str, Any],
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
) -> Graph:
    """Flux.1 text to image (`FluxPipeline`). Unset options follow the model: dev (guidance embeddings) 28
    steps, guidance 3.5, 512 T5 tokens; schnell 4 steps, guidance 0, 256 tokens."""
    spec = flux_spec(ref)
    s = _settings(spec, steps=steps, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
    g = Graph("text_to_image")
    # Noise in the pipeline's unpacked shape, then packed: the same seed draws the same noise. It runs
    # first, so a size the transformer cannot take is refused before any text encoder loads.
    g.add_node(
        "latent/noise",
        id="noise",
        config={
            "channels": spec.latent_channels,
            "scale_factor": spec.vae_scale_factor,
            "multiple_of": spec.size_multiple,
            "height": height or spec.default_size,
            "width": width or spec.default_size,
            "dtype": ref.get("dtype", "float32"),
        },
        auto_connect=False,
    )
    g.add_node("latent/flux_pack", id="pack", auto_connect=False)
    g.add_edge("noise.latent", "pack.latent")
    g.expose_input("height", "noise.height", default=None)
    g.expose_input("width", "noise.width", default=None)
    _add_text_nodes(g, ref, s["max_sequence_length"])
    _add_denoising_loop(g, ref, s["steps"], s["guidance_scale"], true_cfg_scale)
    g.add_edge("pack.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    return g


def flux_image_to_image(
    ref: dict[str, Any],
    *,
    steps: int | None = None,
    strength: float = 0.6,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
    max_sequence_length: int | None = None,
) -> Graph:
    """Flux.1 image to image (`FluxImg2ImgPipeline`): the image is resized down to a multiple of 16 pixels
    (twice the VAE's scale factor) as the pipeline does. Unset options follow the model as for text to image."""
    spec = flux_spec(ref)
    s = _settings(spec, steps=steps, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
    g = Graph("image_to_image")
    _add_text_nodes(g, ref, s["max_sequence_length"])
    g.add_node(
        "codec/vae",
        id="vae_enc",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "encode", "pixel_multiple": spec.size_multiple},
        auto_connect=False,
    )
    g.add_node("latent/noise", id="noise", config={"dtype": ref.get("dtype", "float32")}, auto_connect=False)
    g.add_node("latent/flux_pack", id="pack", auto_connect=False)
    g.add_node(g.block("pack"), id="pack_noise", auto_connect=False)
    # The encoder samples its latent first, then the noise is drawn from the same generator (as diffusers).
    g.add_edge("vae_enc.latent", "noise.like")
    g.add_edge("vae_enc.rng", "noise.rng")
    g.add_edge("vae_enc.latent", "pack.latent")
    g.add_edge("noise.latent", "pack_noise.latent")
    g.expose_input("image", "vae_enc.image")
    _add_denoising_loop(g, ref, s["steps"], s["guidance_scale"], true_cfg_scale)
    g.add_edge("pack.latent", "schedule.latent")
    g.add_edge("pack_noise.latent", "schedule.noise")
    g.add_edge("noise.rng", "schedule.rng")
    g.expose_input("strength", "schedule.strength", default=strength)
    return g


register_family(
    Family(
        "flux",
        pipelines=("FluxPipeline", "FluxImg2ImgPipeline"),
        text_to_image=flux_text_to_image,
        image_to_image=flux_image_to_image,
        description="Flux.1 schnell and dev: Flux transformer on packed latents, CLIP pooled + T5 conditioning, "
        "flow matching",
    )
)
