"""Stable-Diffusion-family graph templates: text_to_image, image_to_image and inpaint (whose image and mask side
is in worldgen/templates/inpaint.py); the dispatching templates that pick the family's graph are here too.

The graphs are the diffusers pipelines written out as task nodes:

    prompt -> tok -> te ----------------------------.
    negative_prompt -> tok_neg -> te_neg ----------.|
    [image -> vae_enc ->] noise -> schedule -> unet -> cfg -> solver -> vae -> image
                                              ^______________|  (the denoising loop)

`schedule` and `solver` hold the same solver block: its first call sets up the schedule, the loop steps it.
`tok_neg`/`te_neg` share the blocks of `tok`/`te`, so each model is loaded and stored once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worldgen.block import ModelRef
from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.templates import register_template
from worldgen.templates.families import (
    Family,
    attachments,
    check_options,
    detect_family,
    get_family,
    read_config,
    register_family,
)
from worldgen.templates.inpaint import add_inpaint_nodes, inpainting_unet, refuse_inpainting_unet
from worldgen.templates.loop import add_denoising_loop, solver_type


def _source(model: str | None, preset: str | None) -> str:
    if (model is None) == (preset is None):
        raise ConfigError(
            "give exactly one of `model` (a local diffusers directory or hub id) or `preset` (e.g. 'tiny')"
        )
    return model if model is not None else f"preset:{preset}"


def _add_text_nodes(g: Graph, ref: dict[str, Any]) -> None:
    g.add_node(
        "tokenizer/clip", id="tok", config={"model": {**ref, "subfolder": "tokenizer"}}, auto_connect=False
    )
    g.add_node(
        "conditioner/clip_text",
        id="te",
        config={"model": {**ref, "subfolder": "text_encoder"}},
        auto_connect=False,
    )
    g.add_node(g.block("tok"), id="tok_neg", auto_connect=False)
    g.add_node(g.block("te"), id="te_neg", auto_connect=False)
    g.add_edge("tok.token_ids", "te.token_ids")
    g.add_edge("tok_neg.token_ids", "te_neg.token_ids")
    g.expose_input("prompt", "tok.text")
    g.expose_input("negative_prompt", "tok_neg.text", default="")


def _add_denoising_loop(
    g: Graph,
    ref: dict[str, Any],
    solver: str,
    steps: int,
    guidance_scale: float,
    solver_options: dict[str, Any] | None = None,
) -> None:
    add_denoising_loop(
        g,
        solver=solver_type(solver),
        solver_config={
            "model": {**ref, "subfolder": "scheduler"},
            "num_inference_steps": steps,
            **(solver_options or {}),
        },
        backbone="backbone/unet2d",
        backbone_id="unet",
        backbone_config={"model": {**ref, "subfolder": "unet"}},
        conditions=[("te.embedding", "condition"), ("te_neg.embedding", "condition_uncond")],
        cfg_config={"scale": guidance_scale},
    )
    g.add_node(
        "codec/vae",
        id="vae",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "decode"},
        auto_connect=False,
    )
    g.add_edge("solver.latent", "vae.latent")
    g.expose_input("guidance_scale", "cfg.scale", default=guidance_scale)
    g.expose_output("image", "vae.image")


def _model_ref(model: str | None, preset: str | None, revision: str | None, dtype: str) -> dict[str, Any]:
    ref = ModelRef(source=_source(model, preset), revision=revision, dtype=dtype)
    return ref.model_dump(exclude_defaults=True, exclude={"subfolder"}) | {"source": ref.source}


def sd_text_to_image(
    ref: dict[str, Any],
    *,
    solver: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> Graph:
    """Stable Diffusion 1.x/2.x text to image (`StableDiffusionPipeline`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = ref.get("dtype", "float32")

    unet = read_config(ref, "unet", UNet2DConditionModel)
    vae = read_config(ref, "vae", AutoencoderKL)
    refuse_inpainting_unet(unet, vae["latent_channels"], "text_to_image", ref["source"])
    scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    default_size = unet["sample_size"] * scale_factor
    g = Graph("text_to_image")
    _add_text_nodes(g, ref)
    g.add_node(
        "latent/noise",
        id="noise",
        config={
            "channels": unet["in_channels"],
            "scale_factor": scale_factor,
            "height": height or default_size,
            "width": width or default_size,
            "dtype": dtype,
        },
        auto_connect=False,
    )
    g.expose_input("height", "noise.height", default=None)
    g.expose_input("width", "noise.width", default=None)
    _add_denoising_loop(g, ref, solver, steps, guidance_scale)
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    return g


def sd_image_to_image(
    ref: dict[str, Any],
    *,
    solver: str = "ddim",
    steps: int = 50,
    strength: float = 0.8,
    guidance_scale: float = 7.5,
) -> Graph:
    """Stable Diffusion 1.x/2.x image to image (`StableDiffusionImg2ImgPipeline`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    latent_channels = read_config(ref, "vae", AutoencoderKL)["latent_channels"]
    refuse_inpainting_unet(
        read_config(ref, "unet", UNet2DConditionModel), latent_channels, "image_to_image", ref["source"]
    )
    g = Graph("image_to_image")
    _add_text_nodes(g, ref)
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
    _add_denoising_loop(g, ref, solver, steps, guidance_scale)
    g.add_edge("vae_enc.latent", "schedule.latent")
    g.add_edge("noise.latent", "schedule.noise")
    g.add_edge("noise.rng", "schedule.rng")
    g.expose_input("strength", "schedule.strength", default=strength)
    return g


def sd_inpaint(
    ref: dict[str, Any],
    *,
    solver: str = "ddim",
    steps: int = 50,
    strength: float = 1.0,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> Graph:
    """Stable Diffusion 1.x/2.x inpainting (`StableDiffusionInpaintPipeline`): an inpainting UNet (9 input
    channels) sees the mask and the masked image; a base UNet repaints the mask as image to image, the rest put
    back after each step. Images are resized to height x width (default: the UNet's size, as the pipeline)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = read_config(ref, "unet", UNet2DConditionModel)
    vae = read_config(ref, "vae", AutoencoderKL)
    scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    inpainting = inpainting_unet(unet, vae["latent_channels"], ref["source"])
    g = Graph("inpaint")
    _add_text_nodes(g, ref)
    _add_denoising_loop(g, ref, solver, steps, guidance_scale, {"noise_at_full_strength": True})
    add_inpaint_nodes(
        g,
        vae={**ref, "subfolder": "vae"},
        inpainting=inpainting,
        latent_channels=vae["latent_channels"],
        scale_factor=scale_factor,
        height=height or unet["sample_size"] * scale_factor,
        width=width or unet["sample_size"] * scale_factor,
        strength=strength,
        dtype=ref.get("dtype", "float32"),
    )
    return g


register_family(
    Family(
        "sd",
        pipelines=(
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
        ),
        text_to_image=sd_text_to_image,
        image_to_image=sd_image_to_image,
        inpaint=sd_inpaint,
        description="Stable Diffusion 1.x/2.x: UNet, one CLIP text encoder",
    )
)


def _family_graph(
    task: str,
    model: str | None,
    preset: str | None,
    family: str | None,
    revision: str | None,
    dtype: str,
    options: dict[str, Any],
) -> Any:
    """The graph `task` builds for the model's family (found from model_index.json unless `family` is given)."""
    from worldgen.models.presets import PRESET_PREFIX, preset_name

    if preset is not None and model is None:
        preset = preset_name(preset, family)
    ref = _model_ref(model, preset, revision, dtype)
    chosen = get_family(family) if family is not None else detect_family(ref["source"], revision)
    if ref["source"].startswith(PRESET_PREFIX) and family is not None:
        from worldgen.models.presets import get_preset

        found = get_preset(ref["source"][len(PRESET_PREFIX) :]).family
        if found != chosen.name:
            raise ConfigError(
                f"preset '{preset}' is a {found} model, not {chosen.name}; drop `family` or pick a "
                f"{chosen.name} preset",
                path="family",
            )
    check_options(chosen, task, options)
    adapters = {name: options.pop(name) for name in list(options) if name in attachments()}
    graph = chosen.builder(task)(ref, **options)
    for name, attachment in attachments().items():
        if adapters.get(name) is not None:
            attachment.attach(graph, family=chosen, task=task, ref=ref, spec=adapters[name])
    return graph


def _task_template(task: str, doc: str) -> Callable[..., Graph]:
    """The template of one task for every family that builds it: the family found from the model (or `family:`),
    `options` the family builder's, attachments (`controlnet:`, `ip_adapter:`, `lora:`) applied after."""

    def template(
        model: str | None = None,
        preset: str | None = None,
        family: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        **options: Any,
    ) -> Graph:
        return _family_graph(task, model, preset, family, revision, dtype, options)

    template.__name__ = template.__qualname__ = task
    template.__doc__ = doc
    return register_template(task)(template)


text_to_image = _task_template(
    "text_to_image",
    """Text to image for SD 1.x/2.x, SDXL, SD3 and Flux (the family found from the model): prompt -> image.
    `options` are the family's (steps, guidance_scale, height, width, ...).""",
)
image_to_image = _task_template(
    "image_to_image",
    """Image to image for SD 1.x/2.x, SDXL, SD3 and Flux (the family found from the model): image, prompt,
    strength -> image. `options` are the family's (steps, strength, guidance_scale, ...).""",
)
inpaint = _task_template(
    "inpaint",
    """Inpainting for SD 1.x/2.x and SDXL (the family found from the model; an inpainting UNet or a base one):
    image, mask_image (white = repaint), prompt, strength -> image. `options` are the family's (steps,
    strength, guidance_scale, height, width, ...).""",
)
upscale = _task_template(
    "upscale",
    """Upscaling with a Stable Diffusion upscaler (x4 `StableDiffusionUpscalePipeline` or the x2 latent upscaler,
    found from the model): image, prompt -> image. `options` are the family's (steps, guidance_scale, ...).""",
)
text_to_audio = _task_template(
    "text_to_audio",
    """Text to audio with Stable Audio Open (the family found from the model): prompt -> audio, sample_rate.
    `options` are the family's (steps, guidance_scale, duration, start).""",
)

text_to_video = _task_template(
    "text_to_video",
    """Text to video for Wan 2.x (the family found from the model): prompt -> video (B, F, C, H, W) in [0, 1].
    `options` are the family's (solver, steps, guidance_scale, height, width, frames, ...).""",
)
image_to_video = _task_template(
    "image_to_video",
    """Image to video for Wan 2.1 image-to-video models (the family found from the model): image (the first
    frame), prompt -> video. `options` are the family's (solver, steps, guidance_scale, height, width, frames).""",
)


@register_template("generate_and_refine", kind="pipeline")
def generate_and_refine(
    model: str | None = None,
    preset: str | None = None,
    family: str | None = None,
    solver: str | None = None,
    steps: int | None = None,
    refine_steps: int | None = None,
    strength: float = 0.5,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    revision: str | None = None,
    dtype: str = "float32",
) -> Pipeline:
    """Text to image, then image to image on the result (one checkpoint, each model loaded once; any family,
    settings left unset as the family's defaults)."""
    given = {"solver": solver, "guidance_scale": guidance_scale}
    common = {
        "model": model,
        "preset": preset,
        "family": family,
        "revision": revision,
        "dtype": dtype,
        **{k: v for k, v in given.items() if v is not None},
    }
    size = {k: v for k, v in {"steps": steps, "height": height, "width": width}.items() if v is not None}
    refine = {"steps": refine_steps or steps} if (refine_steps or steps) is not None else {}
    p = Pipeline("generate_and_refine")
    p.add_graph(text_to_image(**size, **common), id="generate")
    p.add_graph(image_to_image(**refine, strength=strength, **common), id="refine")
    p.connect("generate.image", "refine.image")
    p.expose_input("prompt", ["generate.prompt", "refine.prompt"])
    p.expose_input("negative_prompt", ["generate.negative_prompt", "refine.negative_prompt"], default="")
    p.expose_input("strength", "refine.strength", default=strength)
    p.expose_output("draft", "generate.image")
    p.expose_output("image", "refine.image")
    return p


@register_template("text_to_image_to_video", kind="pipeline")
def text_to_image_to_video(
    model: str | None = None,
    preset: str | None = None,
    video_model: str | None = None,
    video_preset: str | None = None,
    family: str | None = None,
    steps: int | None = None,
    video_steps: int | None = None,
    guidance_scale: float | None = None,
    video_guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    solver: str | None = None,
    video_solver: str | None = None,
    dtype: str = "float32",
) -> Pipeline:
    """The canon's text -> image -> video: a picture drawn from the prompt (any image family), then a clip
    that starts from it (an image-to-video model: Wan 2.x). One prompt for both; the picture's size is the
    clip's (a Wan model needs multiples of 16). Outputs `image` (the first frame as drawn) and `video`."""

    def given(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None}

    size = given(height=height, width=width)
    p = Pipeline("text_to_image_to_video")
    p.add_graph(
        text_to_image(
            model=model,
            preset=preset,
            family=family,
            dtype=dtype,
            **given(steps=steps, guidance_scale=guidance_scale, solver=solver),
            **size,
        ),
        id="picture",
    )
    p.add_graph(
        image_to_video(
            model=video_model,
            preset=video_preset,
            dtype=dtype,
            **given(
                steps=video_steps, guidance_scale=video_guidance_scale, solver=video_solver, frames=frames
            ),
            **size,
        ),
        id="clip",
    )
    p.connect("picture.image", "clip.image")
    p.expose_input("prompt", ["picture.prompt", "clip.prompt"])
    p.expose_input("negative_prompt", ["picture.negative_prompt", "clip.negative_prompt"], default="")
    for name in ("width", "height"):  # one size for both: the clip starts from the picture
        picture, clip = p.item("picture").exposed_inputs[name], p.item("clip").exposed_inputs[name]
        p.expose_input(name, [f"picture.{name}", f"clip.{name}"], default=clip.default or picture.default)
    p.expose_input("frames", "clip.frames", default=p.item("clip").exposed_inputs["frames"].default)
    p.expose_output("image", "picture.image")
    p.expose_output("video", "clip.video")
    return p
