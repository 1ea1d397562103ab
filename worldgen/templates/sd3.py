"""Stable Diffusion 3 / 3.5 graph templates: `StableDiffusion3Pipeline` and `StableDiffusion3Img2ImgPipeline`
written out as task nodes.

    prompt   -> tok   -> te   (CLIP, penultimate + pooled) --.
    prompt_2 -> tok_2 -> te_2 (CLIP, penultimate + pooled) ---> joint -> transformer
    prompt_3 -> tok_3 -> te_3 (T5; absent: zeros) ----------'     (and the same for the negative prompts)
    [image -> vae_enc ->] noise -> schedule -> transformer -> cfg -> solver -> vae -> image
                                               ^_________________________|  (the denoising loop)

`prompt_2`/`prompt_3` (and the negative twins) fall back to the first prompt, as diffusers does (the tokenizers'
`fallback` port). The negative branch shares every block of the positive one, so each model loads once;
`schedule` and `solver` hold the same flow-matching solver block. Without guidance (scale <= 1, as turbo models
run) there is no negative branch at all, as the pipeline then encodes no negative prompt.
"""

from __future__ import annotations

from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.templates.families import Family, family_components, read_config, register_family
from worldgen.templates.loop import add_denoising_loop

# node id -> the model_index.json component it loads (what a missing one is reported as).
_TEXT_NODES = {
    "tok": "tokenizer",
    "tok_2": "tokenizer_2",
    "tok_3": "tokenizer_3",
    "te": "text_encoder",
    "te_2": "text_encoder_2",
    "te_3": "text_encoder_3",
}
_REQUIRED = {"transformer": "transformer", "schedule": "scheduler", "vae": "vae"} | {
    node: field for node, field in _TEXT_NODES.items() if not field.endswith("_3")
}
_T5_NODES = {"tok_3": "tokenizer_3", "te_3": "text_encoder_3"}
_MAX_SEQUENCE_LENGTH = 512  # the pipeline refuses longer T5 sequences


def _components(ref: dict[str, Any], text_encoder_3: bool | None) -> bool:
    """Check the model has every component the graph loads (before any weights load); True when T5 is used.

    T5 is optional, as in diffusers: a model saved without it (`text_encoder_3: null` in model_index.json) or
    `text_encoder_3: false/null` here gets zeros in its place. Every other component is required."""
    source = ref["source"]
    have = family_components(source, ref.get("revision"))
    for node, field in _REQUIRED.items():
        if field not in have:
            raise ConfigError(
                f"node '{node}' needs the model's `{field}` component, and '{source}' has none (model_index.json "
                f"names no {field}); an SD3 pipeline needs its transformer, VAE, scheduler and both CLIP text "
                "encoders with their tokenizers (only the T5 text_encoder_3/tokenizer_3 is optional)",
                path=f"{node}.model",
            )
    if text_encoder_3 is False or text_encoder_3 is None or "text_encoder_3" not in have:
        return False
    if "tokenizer_3" not in have:
        raise ConfigError(
            f"node 'tok_3' needs the model's `tokenizer_3` component for its T5 text_encoder_3, and '{source}' "
            "has none; add it, or run without T5 (option `text_encoder_3: false`)",
            path="tok_3.model",
        )
    return True


def _check_options(steps: int, guidance_scale: float, max_sequence_length: int) -> None:
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}", path="steps")
    if not 1 <= max_sequence_length <= _MAX_SEQUENCE_LENGTH:
        raise ConfigError(
            f"max_sequence_length must be 1 to {_MAX_SEQUENCE_LENGTH} (T5's limit in the pipeline), got "
            f"{max_sequence_length}",
            path="max_sequence_length",
        )
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be at least 0, got {guidance_scale}", path="guidance_scale")


def _add_text_nodes(
    g: Graph, ref: dict[str, Any], t5: bool, max_sequence_length: int, t5_width: int, guided: bool
) -> None:
    """The three tokenizers and encoders and the joining block, for the prompt and (guided) the negative one.
    The tokenizers come first so a prompt too long for T5 is refused before any encoder loads."""
    branches = [("", "prompt")] + ([("_neg", "negative_prompt")] if guided else [])
    tokenizers = {"tok": ("tokenizer/clip", {}), "tok_2": ("tokenizer/clip", {})}
    encoders = {"te": ("conditioner/clip_text", {"layer": "penultimate", "projection": True})}
    encoders["te_2"] = encoders["te"]
    if t5:
        tokenizers["tok_3"] = ("tokenizer/t5", {"max_length": max_sequence_length})
        encoders["te_3"] = ("conditioner/t5_text", {})
    for suffix, _ in branches:
        for node, (block_type, config) in tokenizers.items():
            _add_shared(g, ref, node, suffix, block_type, config)
    for suffix, name in branches:
        joint = "joint" + suffix
        for node, (block_type, config) in encoders.items():
            _add_shared(g, ref, node, suffix, block_type, config)
            g.add_edge(f"{node.replace('te', 'tok')}{suffix}.token_ids", f"{node}{suffix}.token_ids")
        if suffix:
            g.add_node(g.block("joint"), id=joint, auto_connect=False)
        else:
            config = {"t5_length": max_sequence_length, "t5_width": t5_width}
            g.add_node("conditioner/sd3_joint", id=joint, config=config, auto_connect=False)
        for source, port in [("te", "clip"), ("te_2", "clip_2")]:
            g.add_edge(f"{source}{suffix}.embedding", f"{joint}.{port}_embedding")
            g.add_edge(f"{source}{suffix}.pooled", f"{joint}.{port}_pooled")
        if t5:
            g.add_edge(f"te_3{suffix}.embedding", f"{joint}.t5_embedding")
        # prompt_2/prompt_3 fall back to the prompt (negative_prompt_2/_3 to the negative prompt, itself "").
        others = [node for node in tokenizers if node != "tok"]
        targets = [f"tok{suffix}.text"] + [f"{node}{suffix}.fallback" for node in others]
        g.expose_input(name, targets, **({"default": ""} if suffix else {}))
        for node in others:
            g.expose_input(f"{name}_{node[-1]}", f"{node}{suffix}.text", default=None)


def _add_shared(
    g: Graph, ref: dict[str, Any], node: str, suffix: str, block_type: str, config: dict[str, Any]
) -> None:
    """Node `node + suffix`: a new block loading the node's component, or (negative branch) the positive
    node's block again, so each model is loaded and stored once."""
    if suffix:
        g.add_node(g.block(node), id=node + suffix, auto_connect=False)
        return
    model = {**ref, "subfolder": _TEXT_NODES[node]}
    g.add_node(block_type, id=node, config={"model": model, **config}, auto_connect=False)


def _add_denoising_loop(g: Graph, ref: dict[str, Any], steps: int, guidance_scale: float, patch: int) -> None:
    guided = guidance_scale > 1  # as the pipeline: no negative branch (and no guidance input) at a scale <= 1
    conditions = [("joint.embedding", "condition"), ("joint.pooled", "pooled")]
    if guided:
        conditions += [("joint_neg.embedding", "condition_uncond"), ("joint_neg.pooled", "pooled_uncond")]
    add_denoising_loop(
        g,
        solver="solver/flow_match_euler",
        solver_config={
            "model": {**ref, "subfolder": "scheduler"},
            "num_inference_steps": steps,
            "patch_size": patch,
        },
        backbone="backbone/sd3_transformer",
        backbone_id="transformer",
        backbone_config={"model": {**ref, "subfolder": "transformer"}},
        conditions=conditions,
        cfg_config={"scale": guidance_scale},
    )
    g.add_node(
        "codec/vae",
        id="vae",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "decode"},
        auto_connect=False,
    )
    g.add_edge("solver.latent", "vae.latent")
    if guided:
        g.expose_input("guidance_scale", "cfg.scale", default=guidance_scale)
    g.expose_output("image", "vae.image")


def _start(
    name: str,
    ref: dict[str, Any],
    steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    text_encoder_3: bool | None,
) -> tuple[Graph, dict[str, Any], int]:
    """The graph with its text nodes, the transformer's config and the VAE's scale factor."""
    _check_options(steps, guidance_scale, max_sequence_length)
    t5 = _components(ref, text_encoder_3)
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = read_config(ref, "transformer", SD3Transformer2DModel)
    vae = read_config(ref, "vae", AutoencoderKL)
    g = Graph(name)
    guided = guidance_scale > 1
    _add_text_nodes(g, ref, t5, max_sequence_length, int(transformer["joint_attention_dim"]), guided)
    return g, transformer, 2 ** (len(vae["block_out_channels"]) - 1)


def sd3_text_to_image(
    ref: dict[str, Any],
    *,
    steps: int = 28,
    guidance_scale: float = 7.0,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int = 256,
    text_encoder_3: bool | None = True,
) -> Graph:
    """Stable Diffusion 3 / 3.5 text to image (`StableDiffusion3Pipeline`). Inputs: prompt, prompt_2, prompt_3,
    negative_prompt (and _2, _3), steps, guidance_scale, height, width. `text_encoder_3: false` runs without T5
    (zeros in its place, as diffusers with `text_encoder_3=None`); `max_sequence_length` is T5's length."""
    g, transformer, scale = _start(
        "text_to_image", ref, steps, guidance_scale, max_sequence_length, text_encoder_3
    )
    patch = int(transformer["patch_size"])
    default_size = int(transformer["sample_size"]) * scale
    max_patches = transformer.get("pos_embed_max_size")
    g.add_node(
        "latent/noise",
        id="noise",
        config={
            "channels": transformer["in_channels"],
            "scale_factor": scale,
            "height": height or default_size,
            "width": width or default_size,
            "dtype": ref.get("dtype", "float32"),
            # The pipeline's check: whole patches; the position grid bounds the size.
            "multiple_of": scale * patch,
            "max_side": max_patches * patch * scale if max_patches else None,
        },
        auto_connect=False,
    )
    g.expose_input("height", "noise.height", default=None)
    g.expose_input("width", "noise.width", default=None)
    _add_denoising_loop(g, ref, steps, guidance_scale, patch)
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    return g


def sd3_image_to_image(
    ref: dict[str, Any],
    *,
    steps: int = 50,
    strength: float = 0.6,
    guidance_scale: float = 7.0,
    max_sequence_length: int = 256,
    text_encoder_3: bool | None = True,
) -> Graph:
    """Stable Diffusion 3 / 3.5 image to image (`StableDiffusion3Img2ImgPipeline`): the image is encoded, noised
    to the schedule's first remaining step (`strength`) and denoised. Inputs as text_to_image, plus image and
    strength (no height/width: the image's size)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be 0 to 1, got {strength}", path="strength")
    g, transformer, _ = _start(
        "image_to_image", ref, steps, guidance_scale, max_sequence_length, text_encoder_3
    )
    g.add_node(
        "codec/vae",
        id="vae_enc",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "encode"},
        auto_connect=False,
    )
    g.add_node("latent/noise", id="noise", config={"dtype": ref.get("dtype", "float32")}, auto_connect=False)
    g.add_edge("vae_enc.latent", "noise.like")
    g.add_edge("vae_enc.rng", "noise.rng")
    g.expose_input("image", "vae_enc.image")
    _add_denoising_loop(g, ref, steps, guidance_scale, int(transformer["patch_size"]))
    g.add_edge("vae_enc.latent", "schedule.latent")
    g.add_edge("noise.latent", "schedule.noise")
    g.add_edge("noise.rng", "schedule.rng")
    g.expose_input("strength", "schedule.strength", default=strength)
    return g


register_family(
    Family(
        "sd3",
        pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
        text_to_image=sd3_text_to_image,
        image_to_image=sd3_image_to_image,
        description="Stable Diffusion 3 / 3.5: MMDiT transformer, two CLIP + optional T5, flow matching",
    )
)
