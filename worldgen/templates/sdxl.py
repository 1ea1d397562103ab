"""SDXL graph templates: text_to_image (`StableDiffusionXLPipeline`), image_to_image
(`StableDiffusionXLImg2ImgPipeline`, the refiner too), inpaint (`StableDiffusionXLInpaintPipeline`, its image and
mask side in worldgen/templates/inpaint.py) and base + refiner as a pipeline ("ensemble of experts").

The graphs are the diffusers pipelines written out as task nodes:

    prompt -----> tok ---> te ----.
    prompt_2 ---> tok_2 -> te_2 --+-> cond ----------------------------.
    negative_prompt(_2) -> tok_neg, tok_2_neg -> te, te_2 -> cond_neg --+
    [image -> vae_enc ->] noise -> schedule -> time_ids ---------------+-> unet -> cfg -> solver -> vae -> image
                                                  ^_____________________________________|  (the denoising loop)

`te_neg`/`te_2_neg` share the blocks of `te`/`te_2`; a negative prompt left out becomes zeros in `cond_neg`
when the model's `force_zeros_for_empty_prompt` is set (SDXL base), as in diffusers. The refiner has no first
text encoder: its graphs encode the prompt with text_encoder_2 alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worldgen.block import ModelRef
from worldgen.errors import ConfigError, ModelLoadError, did_you_mean
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.templates import register_template
from worldgen.templates.families import Family, family_components, model_index, register_family
from worldgen.templates.inpaint import add_inpaint_nodes, inpainting_unet, refuse_inpainting_unet
from worldgen.templates.loop import add_denoising_loop, solver_type

# Which node loads each component, and as what: errors about a component name the node that needs it.
_NODES: dict[str, tuple[str, str]] = {
    "unet": ("unet", "backbone/unet2d"),
    "vae": ("vae", "codec/vae"),
    "scheduler": ("schedule", "solver"),
    "tokenizer": ("tok", "tokenizer/clip"),
    "text_encoder": ("te", "conditioner/clip_text"),
    "tokenizer_2": ("tok_2", "tokenizer/clip"),
    "text_encoder_2": ("te_2", "conditioner/clip_text"),
}
_TIME_ID_PORTS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


@dataclass(frozen=True)
class _Model:
    """What the builders read from an SDXL model before adding nodes (configs only, no weights)."""

    refs: dict[str, dict[str, Any]]  # component -> model reference of the node that loads it
    unet: dict[str, Any]
    scale_factor: int  # the VAE's
    two_encoders: bool  # False for the refiner (text_encoder_2 only)
    force_zeros: bool  # force_zeros_for_empty_prompt
    aesthetic: bool  # requires_aesthetics_score
    solver: str
    dtype: str


def _component_ref(ref: Mapping[str, Any], name: str, components: Mapping[str, Any]) -> dict[str, Any]:
    """The reference a component loads from: the model's subfolder, or what `components` names instead (a
    source string for a component at the root of a directory or hub repo, or a model reference mapping)."""
    if name not in components:
        return {**ref, "subfolder": name}
    given = components[name]
    if isinstance(given, str):
        given = {"source": given}
    if not isinstance(given, Mapping) or "source" not in given:
        raise ConfigError(
            f"components.{name} must be a source (directory or hub id) or a model reference with `source`, "
            f"got {given!r}",
            path=f"components.{name}",
        )
    dtype = {"dtype": ref["dtype"]} if "dtype" in ref else {}
    return ModelRef(**{**dtype, **given}).model_dump(exclude_defaults=True) | {"source": given["source"]}


def _config(ref: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A component's config.json without its weights (a ConfigError naming the node when it cannot be read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from worldgen.models.loading import component_config

    source, subfolder, revision = ref["source"], ref.get("subfolder") or "", ref.get("revision")
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    try:
        return component_config(source, subfolder, revision, classes.get(name, CLIPTextModel))
    except ModelLoadError as err:  # component_config reports any failure to read as this
        node, block = _NODES[name]
        raise ConfigError(
            f"node '{node}' ({block}): cannot read the {name} config: {err}", path=f"{node}.model"
        ) from None


def _solver_name(index: Mapping[str, Any], source: str) -> str:
    """The worldgen solver for the scheduler class the model ships (the pipeline's default)."""
    from worldgen.nodes.diffusion import SOLVERS
    from worldgen.registry import block_class

    entry = index.get("scheduler")
    class_name = str(entry[-1]).rpartition(".")[2] if isinstance(entry, list) and entry[-1] else None
    for name, block_type in SOLVERS.items():
        if getattr(block_class(block_type), "scheduler_class_name", None) == class_name:
            return name
    raise ConfigError(
        f"model '{source}' ships a {class_name} scheduler, which no worldgen solver wraps; choose one with "
        f"`solver` ({', '.join(SOLVERS)})",
        path="solver",
    )


def _inspect(ref: Mapping[str, Any], task: str, solver: str | None, components: Mapping[str, Any]) -> _Model:
    """Read the model (model_index.json, component configs) and check it can make this task's graph."""
    source, revision = ref["source"], ref.get("revision")
    index = model_index(source, revision)
    present = family_components(source, revision) | set(components)
    unknown = sorted(set(components) - set(_NODES))
    if unknown:
        raise ConfigError(
            f"no SDXL component '{unknown[0]}'{did_you_mean(unknown[0], _NODES)}; components: {', '.join(_NODES)}",
            path=f"components.{unknown[0]}",
        )
    two = "text_encoder" in present
    needed = ["unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"]
    if task == "text_to_image" or two:  # text to image takes the base's prompt path: both encoders
        needed[3:3] = ["text_encoder", "tokenizer"]
    for name in needed:
        if name not in present:
            node, block = _NODES[name]
            why = (
                " (an SDXL refiner has only text_encoder_2: use image_to_image, or the base model)"
                if name in ("text_encoder", "tokenizer") and index.get("requires_aesthetics_score")
                else ""
            )
            raise ConfigError(
                f"node '{node}' ({block}) needs the model's {name}, and model '{source}' has none (model_index.json "
                f"lists no {name}: saved without it?){why}; {task} needs: {', '.join(needed)}",
                path=f"{node}.model",
            )
    refs = {name: _component_ref(ref, name, components) for name in needed}
    unet, vae = _config(refs["unet"], "unet"), _config(refs["vae"], "vae")
    if task != "inpaint":
        refuse_inpainting_unet(unet, vae["latent_channels"], task, source)
    aesthetic = task in ("image_to_image", "inpaint") and bool(index.get("requires_aesthetics_score", False))
    _check_unet(unet, refs, two, aesthetic, source)
    return _Model(
        refs=refs,
        unet=unet,
        scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        two_encoders=two,
        force_zeros=bool(index.get("force_zeros_for_empty_prompt", True)),
        aesthetic=aesthetic,
        solver=solver or _solver_name(index, source),
        dtype=ref.get("dtype", "float32"),
    )


def _check_unet(
    unet: Mapping[str, Any], refs: Mapping[str, Any], two: bool, aesthetic: bool, source: str
) -> None:
    """The UNet must take what the graph will give it (diffusers finds out only inside the model)."""
    if unet.get("addition_embed_type") != "text_time":
        raise ConfigError(
            f"model '{source}': its UNet has addition_embed_type {unet.get('addition_embed_type')!r}, not "
            "'text_time', so it is no SDXL UNet (use family 'sd' for SD 1.x/2.x)",
            path="unet.model",
        )
    te_2 = _config(refs["text_encoder_2"], "text_encoder_2")
    width = te_2["hidden_size"] + (_config(refs["text_encoder"], "text_encoder")["hidden_size"] if two else 0)
    if unet.get("cross_attention_dim") != width:
        raise ConfigError(
            f"model '{source}': the UNet attends to {unet.get('cross_attention_dim')} features but the text "
            f"encoders give {width}",
            path="unet.model",
        )
    ids = 5 if aesthetic else 6
    passed = unet["addition_time_embed_dim"] * ids + te_2["projection_dim"]
    expected = unet["projection_class_embeddings_input_dim"]
    if passed != expected:
        hint = (
            "its model_index.json should (not) set requires_aesthetics_score"
            if abs(passed - expected) == unet["addition_time_embed_dim"]
            else "check the UNet's and text_encoder_2's configs"
        )
        raise ConfigError(
            f"model '{source}': the UNet's added embedding takes {expected} features but {ids} time ids and "
            f"text_encoder_2's projection give {passed} ({hint}; a refiner UNet makes images from images only)",
            path="unet.model",
        )


# ---- graph parts ---------------------------------------------------------------------------------------
def _add_prompt_nodes(g: Graph, m: _Model) -> None:
    """The prompt's and the negative prompt's conditions (`cond`, `cond_neg`): embedding and pooled."""
    refs = m.refs
    clip = {"layer": "penultimate"}
    encoders = 2 if m.two_encoders else 1
    g.add_node("tokenizer/clip", id="tok_2", config={"model": refs["tokenizer_2"]}, auto_connect=False)
    g.add_node(
        "conditioner/clip_text",
        id="te_2",
        config={"model": refs["text_encoder_2"], **clip, "projection": True},
        auto_connect=False,
    )
    # A left-out negative prompt gives no tokens (then zeros) only where the model asks for zeros.
    neg = {"optional": m.force_zeros}
    g.add_node(
        "tokenizer/clip", id="tok_2_neg", config={"model": refs["tokenizer_2"], **neg}, auto_connect=False
    )
    g.add_node(g.block("te_2"), id="te_2_neg", auto_connect=False)
    g.add_node("conditioner/sdxl_text", id="cond", config={"encoders": encoders}, auto_connect=False)
    g.add_node(g.block("cond"), id="cond_neg", auto_connect=False)
    for suffix in ("", "_neg"):
        g.add_edge(f"tok_2{suffix}.token_ids", f"te_2{suffix}.token_ids")
        g.add_edge(f"te_2{suffix}.embedding", f"cond{suffix}.embedding_2")
        g.add_edge(f"te_2{suffix}.pooled", f"cond{suffix}.pooled_2")
    g.add_edge("cond.embedding", "cond_neg.like")
    g.add_edge("cond.pooled", "cond_neg.like_pooled")
    negative_default = None if m.force_zeros else ""
    if not m.two_encoders:  # the refiner: the prompt goes to text_encoder_2 (prompt_2 is not used)
        g.expose_input("prompt", "tok_2.text")
        g.expose_input("negative_prompt", "tok_2_neg.text", default=negative_default)
        return
    g.add_node("tokenizer/clip", id="tok", config={"model": refs["tokenizer"]}, auto_connect=False)
    g.add_node(
        "conditioner/clip_text", id="te", config={"model": refs["text_encoder"], **clip}, auto_connect=False
    )
    g.add_node("tokenizer/clip", id="tok_neg", config={"model": refs["tokenizer"], **neg}, auto_connect=False)
    g.add_node(g.block("te"), id="te_neg", auto_connect=False)
    for suffix in ("", "_neg"):
        g.add_edge(f"tok{suffix}.token_ids", f"te{suffix}.token_ids")
        g.add_edge(f"te{suffix}.embedding", f"cond{suffix}.embedding")
    # prompt_2 / negative_prompt_2 fall back to the first ones, as diffusers does.
    g.expose_input("prompt", ["tok.text", "tok_2.fallback"])
    g.expose_input("prompt_2", "tok_2.text", default=None)
    g.expose_input("negative_prompt", ["tok_neg.text", "tok_2_neg.fallback"], default=negative_default)
    g.expose_input("negative_prompt_2", "tok_2_neg.text", default=None)


def _add_time_ids(g: Graph, m: _Model, pipeline: str, latent: str | None) -> None:
    """The UNet's added time ids, sized from `latent` (a 'node.port'; None: the caller exposes it)."""
    g.add_node(
        "conditioner/sdxl_time_ids",
        id="time_ids",
        config={"pipeline": pipeline, "aesthetic": m.aesthetic, "scale_factor": m.scale_factor},
        auto_connect=False,
    )
    if latent is not None:
        g.add_edge(latent, "time_ids.latent")
    for port in _TIME_ID_PORTS:
        g.expose_input(port, f"time_ids.{port}", default=None)
    if m.aesthetic:
        g.expose_input("aesthetic_score", "time_ids.aesthetic_score", default=6.0)
        g.expose_input("negative_aesthetic_score", "time_ids.negative_aesthetic_score", default=2.5)


def _add_denoising_loop(
    g: Graph,
    m: _Model,
    steps: int,
    guidance_scale: float,
    guidance_rescale: float,
    solver_options: Mapping[str, Any] | None = None,
) -> None:
    add_denoising_loop(
        g,
        solver=solver_type(m.solver),
        solver_config={"model": m.refs["scheduler"], "num_inference_steps": steps, **(solver_options or {})},
        backbone="backbone/unet2d",
        backbone_id="unet",
        backbone_config={"model": m.refs["unet"]},
        conditions=[
            ("cond.embedding", "condition"),
            ("cond_neg.embedding", "condition_uncond"),
            ("cond.pooled", "pooled"),
            ("cond_neg.pooled", "pooled_uncond"),
            ("time_ids.time_ids", "time_ids"),
            ("time_ids.time_ids_uncond", "time_ids_uncond"),
        ],
        cfg_config={"scale": guidance_scale, "rescale": guidance_rescale},
    )
    g.expose_input("guidance_scale", "cfg.scale", default=guidance_scale)


def _add_output(g: Graph, m: _Model, output: str) -> None:
    """`image` (the VAE decodes the final latent) or `latent` (for another expert to finish)."""
    if output == "latent":
        g.expose_output("latent", "solver.latent")
        return
    if output != "image":
        raise ConfigError(f"output must be 'image' or 'latent', got {output!r}", path="output")
    g.add_node("codec/vae", id="vae", config={"model": m.refs["vae"], "mode": "decode"}, auto_connect=False)
    g.add_edge("solver.latent", "vae.latent")
    g.expose_output("image", "vae.image")


# ---- builders ------------------------------------------------------------------------------------------
def sdxl_text_to_image(
    ref: dict[str, Any],
    *,
    solver: str | None = None,
    steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    denoising_end: float | None = None,
    output: str = "image",
    components: Mapping[str, Any] | None = None,
) -> Graph:
    """SDXL text to image (`StableDiffusionXLPipeline`). `solver` defaults to the model's scheduler;
    `denoising_end` with `output="latent"` makes the first expert of a base + refiner hand-off; `components`
    loads some components from elsewhere (e.g. {"vae": <dir or hub id>}, as `from_pretrained(vae=...)`)."""
    m = _inspect(ref, "text_to_image", solver, components or {})
    default_size = m.unet["sample_size"] * m.scale_factor
    g = Graph("text_to_image")
    _add_prompt_nodes(g, m)
    g.add_node(
        "latent/noise",
        id="noise",
        config={
            "channels": m.unet["in_channels"],
            "scale_factor": m.scale_factor,
            "height": height or default_size,
            "width": width or default_size,
            "dtype": m.dtype,
        },
        auto_connect=False,
    )
    g.expose_input("height", "noise.height", default=None)
    g.expose_input("width", "noise.width", default=None)
    _add_time_ids(g, m, "text_to_image", "noise.latent")
    _add_denoising_loop(g, m, steps, guidance_scale, guidance_rescale)
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    g.expose_input("denoising_end", "schedule.denoising_end", default=denoising_end)
    _add_output(g, m, output)
    return g


def sdxl_image_to_image(
    ref: dict[str, Any],
    *,
    solver: str | None = None,
    steps: int = 50,
    strength: float = 0.3,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    denoising_start: float | None = None,
    output: str = "image",
    components: Mapping[str, Any] | None = None,
) -> Graph:
    """SDXL image to image (`StableDiffusionXLImg2ImgPipeline`; the refiner too). With `denoising_start` the
    graph is the second expert of a base + refiner hand-off: it takes `latent` (the base's part-denoised
    latents) instead of `image`, and continues the schedule from there without adding noise."""
    m = _inspect(ref, "image_to_image", solver, components or {})
    g = Graph("image_to_image")
    _add_prompt_nodes(g, m)
    if denoising_start is None:
        g.add_node(
            "codec/vae", id="vae_enc", config={"model": m.refs["vae"], "mode": "encode"}, auto_connect=False
        )
        g.add_node("latent/noise", id="noise", config={"dtype": m.dtype}, auto_connect=False)
        g.add_edge("vae_enc.latent", "noise.like")
        g.add_edge("vae_enc.rng", "noise.rng")
        g.expose_input("image", "vae_enc.image")
    _add_time_ids(g, m, "image_to_image", "vae_enc.latent" if denoising_start is None else None)
    _add_denoising_loop(g, m, steps, guidance_scale, guidance_rescale)
    if denoising_start is None:
        g.add_edge("vae_enc.latent", "schedule.latent")
        g.add_edge("noise.latent", "schedule.noise")
        g.add_edge("noise.rng", "schedule.rng")
        g.expose_input("strength", "schedule.strength", default=strength)
    else:
        g.expose_input("latent", ["schedule.latent", "time_ids.latent"])
        g.expose_input("denoising_start", "schedule.denoising_start", default=denoising_start)
    _add_output(g, m, output)
    return g


def sdxl_inpaint(
    ref: dict[str, Any],
    *,
    solver: str | None = None,
    steps: int = 50,
    strength: float = 0.9999,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    components: Mapping[str, Any] | None = None,
) -> Graph:
    """SDXL inpainting (`StableDiffusionXLInpaintPipeline`, with its defaults: strength 0.9999, guidance 7.5): an inpainting UNet
    (9 input channels) sees the mask and the masked image; a base UNet repaints the mask as image to image, the
    rest put back after each step. Images are resized to height x width (default: the UNet's size)."""
    m = _inspect(ref, "inpaint", solver, components or {})
    latent_channels = _config(m.refs["vae"], "vae").get("latent_channels", 4)
    default_size = m.unet["sample_size"] * m.scale_factor
    g = Graph("inpaint")
    _add_prompt_nodes(g, m)
    _add_time_ids(g, m, "image_to_image", None)  # the inpaint pipeline's ids are image to image's
    _add_denoising_loop(g, m, steps, guidance_scale, guidance_rescale, {"noise_at_full_strength": True})
    add_inpaint_nodes(
        g,
        vae=m.refs["vae"],
        inpainting=inpainting_unet(m.unet, latent_channels, ref["source"]),
        latent_channels=latent_channels,
        scale_factor=m.scale_factor,
        height=height or default_size,
        width=width or default_size,
        strength=strength,
        dtype=m.dtype,
    )
    g.add_edge("noise.latent", "time_ids.latent")  # sized by the output latent
    _add_output(g, m, "image")
    return g


register_family(
    Family(
        "sdxl",
        pipelines=(
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
        ),
        text_to_image=sdxl_text_to_image,
        image_to_image=sdxl_image_to_image,
        inpaint=sdxl_inpaint,
        description="Stable Diffusion XL: UNet with text_time conditioning, two CLIP text encoders (a refiner: one)",
    )
)


def _ref(source: str, revision: str | None, dtype: str) -> dict[str, Any]:
    ref = ModelRef(source=source, revision=revision, dtype=dtype)
    return ref.model_dump(exclude_defaults=True, exclude={"subfolder"}) | {"source": ref.source}


@register_template("sdxl_base_refiner", kind="pipeline")
def sdxl_base_refiner(
    model: str | None = None,
    refiner: str | None = None,
    preset: str | None = None,
    solver: str | None = None,
    steps: int = 50,
    high_noise_frac: float = 0.8,
    guidance_scale: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    revision: str | None = None,
    refiner_revision: str | None = None,
    dtype: str = "float32",
) -> Pipeline:
    """SDXL base + refiner as an ensemble of experts (diffusers' documented hand-off): the base denoises the
    first `high_noise_frac` of the schedule and hands its latents to the refiner, which finishes it. The refiner
    uses the base's VAE and text_encoder_2 (as diffusers' docs load it), so each is loaded once.

    `model` and `refiner` name the two checkpoints (directories or hub ids), or `preset` both (e.g. 'tiny':
    sdxl-tiny and sdxl-refiner-tiny)."""
    from worldgen.models.presets import PRESET_PREFIX, preset_name

    if preset is not None and (model is not None or refiner is not None):
        raise ConfigError("give either `preset` or `model` and `refiner`, not both", path="preset")
    if preset is not None:
        name = preset_name(preset, "sdxl")
        model, refiner = PRESET_PREFIX + name, PRESET_PREFIX + name.replace("sdxl-", "sdxl-refiner-", 1)
    if model is None or refiner is None:
        raise ConfigError(
            "give `model` (the SDXL base) and `refiner` (the SDXL refiner), or `preset`",
            path="model" if model is None else "refiner",
        )
    base_ref = _ref(model, revision, dtype)
    shared = {name: {**base_ref, "subfolder": name} for name in ("vae", "text_encoder_2")}
    common = {"solver": solver, "steps": steps, "guidance_scale": guidance_scale}
    base = sdxl_text_to_image(
        base_ref, **common, height=height, width=width, denoising_end=high_noise_frac, output="latent"
    )
    second = sdxl_image_to_image(
        _ref(refiner, refiner_revision, dtype), **common, denoising_start=high_noise_frac, components=shared
    )
    p = Pipeline("sdxl_base_refiner")
    p.add_graph(base, id="base")
    p.add_graph(second, id="refiner")
    p.connect("base.latent", "refiner.latent")
    p.expose_input("prompt", ["base.prompt", "refiner.prompt"])
    # Left out, each graph takes its own default (e.g. no negative prompt: zeros for the base, "" for the
    # refiner, whose force_zeros_for_empty_prompt is off).
    p.expose_input("prompt_2", "base.prompt_2")
    p.expose_input("negative_prompt", ["base.negative_prompt", "refiner.negative_prompt"])
    p.expose_input("high_noise_frac", ["base.denoising_end", "refiner.denoising_start"])
    p.expose_input("steps", ["base.steps", "refiner.steps"])
    p.expose_input("guidance_scale", ["base.guidance_scale", "refiner.guidance_scale"])
    p.expose_output("image", "refiner.image")
    return p
