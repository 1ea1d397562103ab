"""Upscaler graph templates: the two Stable Diffusion upscalers as families of their own (the `upscale` template
finds which from the model's model_index.json), and `generate_and_upscale`.

x4 (`StableDiffusionUpscalePipeline`, family `upscale`): the latents are as large as the low-res image, which
enters every step as extra UNet channels, noised at `noise_level` (also the UNet's class label):

    prompt -> tok -> te ---------------------------------.
    negative_prompt -> tok_neg -> te_neg ---------------.|
    image, noise_level -> low_res --(image, class_labels)-> unet -> cfg -> solver -> vae -> image (4x)
                             `--(noise)-> schedule ------^______________|

x2 (`StableDiffusionLatentUpscalePipeline`, family `latent-upscale`): the image's latents, upscaled 2x, enter
every step; the UNet's own preconditioning makes its prediction the denoised sample an Euler solver steps with
(the UNet reads the solver's sigma from its state):

    image -> image_in --(upscaled latents)-> unet -> cfg -> solver -> vae -> image (2x)
                  `-> noise -> schedule ------^______________|
"""

from __future__ import annotations

from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.templates import register_template
from worldgen.templates.diffusion import text_to_image, upscale
from worldgen.templates.families import Family, model_index, read_config, register_family
from worldgen.templates.loop import add_denoising_loop, solver_type


def _add_text_nodes(g: Graph, ref: dict[str, Any], layer: str = "final") -> None:
    """Prompt and negative prompt through one CLIP tokenizer and text encoder (the negative branch shares the
    blocks, so each model loads once)."""
    g.add_node(
        "tokenizer/clip", id="tok", config={"model": {**ref, "subfolder": "tokenizer"}}, auto_connect=False
    )
    g.add_node(
        "conditioner/clip_text",
        id="te",
        config={"model": {**ref, "subfolder": "text_encoder"}, "layer": layer},
        auto_connect=False,
    )
    g.add_node(g.block("tok"), id="tok_neg", auto_connect=False)
    g.add_node(g.block("te"), id="te_neg", auto_connect=False)
    g.add_edge("tok.token_ids", "te.token_ids")
    g.add_edge("tok_neg.token_ids", "te_neg.token_ids")
    g.expose_input("prompt", "tok.text")
    g.expose_input("negative_prompt", "tok_neg.text", default="")


def _add_decoder(g: Graph, ref: dict[str, Any], vae: dict[str, Any]) -> None:
    # The x4 pipeline decodes in float32 when its VAE is float16 and says `force_upcast` (it overflows in
    # float16): here the decoder is a float32 model then.
    dtype = ref.get("dtype", "float32")
    if dtype == "float16" and vae.get("force_upcast", True):
        dtype = "float32"
    g.add_node(
        "codec/vae",
        id="vae",
        config={"model": {**ref, "subfolder": "vae", "dtype": dtype}, "mode": "decode"},
        auto_connect=False,
    )
    g.add_edge("solver.latent", "vae.latent")
    g.expose_output("image", "vae.image")


def x4_upscale(
    ref: dict[str, Any],
    *,
    solver: str = "ddim",
    steps: int = 75,
    guidance_scale: float = 9.0,
    noise_level: int = 20,
) -> Graph:
    """The x4 upscaler (`StableDiffusionUpscalePipeline`): image, prompt, noise_level -> image 4x larger."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = read_config(ref, "unet", UNet2DConditionModel)
    vae = read_config(ref, "vae", AutoencoderKL)
    if unet["in_channels"] != vae["latent_channels"] + 3:
        raise ConfigError(
            f"the upscaler's UNet takes {unet['in_channels']} channels, but the latents ({vae['latent_channels']}) "
            f"and the RGB image make {vae['latent_channels'] + 3}: not an x4 upscaler's UNet",
            path="model",
        )
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    max_noise_level = int(model_index(ref["source"], ref.get("revision")).get("max_noise_level", 350))
    g = Graph("upscale")
    _add_text_nodes(g, ref)
    g.add_node(
        "image/low_res_noise",
        id="low_res",
        config={
            "model": {**ref, "subfolder": "low_res_scheduler"},
            "max_noise_level": max_noise_level,
            "pixel_multiple": scale,
            "upscale": scale,
            "latent_channels": vae["latent_channels"],
            "dtype": ref.get("dtype", "float32"),
        },
        auto_connect=False,
    )
    g.expose_input("image", "low_res.image")
    g.expose_input("noise_level", "low_res.noise_level", default=noise_level)
    add_denoising_loop(
        g,
        solver=solver_type(solver),
        solver_config={"model": {**ref, "subfolder": "scheduler"}, "num_inference_steps": steps},
        backbone="backbone/unet2d",
        backbone_id="unet",
        backbone_config={"model": {**ref, "subfolder": "unet"}},
        conditions=[
            ("te.embedding", "condition"),
            ("te_neg.embedding", "condition_uncond"),
            ("low_res.image", "concat"),
            ("low_res.class_labels", "class_labels"),
        ],
        cfg_config={"scale": guidance_scale},
    )
    g.add_edge("low_res.noise", "schedule.latent")
    g.add_edge("low_res.rng", "schedule.rng")
    g.expose_input("guidance_scale", "cfg.scale", default=guidance_scale)
    _add_decoder(g, ref, vae)
    return g


def latent_upscale(
    ref: dict[str, Any],
    *,
    steps: int = 75,
    guidance_scale: float = 9.0,
) -> Graph:
    """The x2 latent upscaler (`StableDiffusionLatentUpscalePipeline`): image (or SD latents), prompt -> image
    2x larger. Guidance 0 upscales without the prompt (the negative prompt's branch, empty by default)."""
    from diffusers import AutoencoderKL

    vae = read_config(ref, "vae", AutoencoderKL)
    g = Graph("upscale")
    _add_text_nodes(g, ref, layer="last_raw")  # the pipeline takes the last hidden state before the norm
    g.add_node(
        "codec/latent_upscale_image",
        id="image_in",
        config={"model": {**ref, "subfolder": "vae"}},
        auto_connect=False,
    )
    g.add_node("latent/noise", id="noise", config={"dtype": ref.get("dtype", "float32")}, auto_connect=False)
    g.add_edge("image_in.latent", "noise.like")
    g.add_edge("image_in.rng", "noise.rng")
    g.expose_input("image", "image_in.image")
    add_denoising_loop(
        g,
        solver=solver_type("euler"),
        solver_config={"model": {**ref, "subfolder": "scheduler"}, "num_inference_steps": steps},
        backbone="backbone/latent_upscale_unet",
        backbone_id="unet",
        backbone_config={"model": {**ref, "subfolder": "unet"}},
        conditions=[
            ("te.embedding", "condition"),
            ("te_neg.embedding", "condition_uncond"),
            ("te.pooled", "pooled"),
            ("te_neg.pooled", "pooled_uncond"),
            ("image_in.latent", "concat"),
        ],
        cfg_config={"scale": guidance_scale},
    )
    # The preconditioning needs the unscaled latents and the solver's sigma: the loop's latent and state.
    for source, target in [
        ("schedule.latent", "unet.latent"),
        ("solver.latent", "unet.latent"),
        ("schedule.state", "unet.state"),
        ("solver.state", "unet.state"),
    ]:
        g.add_edge(source, target)
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    g.expose_input("guidance_scale", ["cfg.scale", "unet.guidance_scale"], default=guidance_scale)
    _add_decoder(g, ref, vae)
    return g


register_family(
    Family(
        "upscale",
        pipelines=("StableDiffusionUpscalePipeline",),
        upscale=x4_upscale,
        description="Stable Diffusion x4 upscaler: UNet on latents + the noised low-res image, 3-block VAE",
    )
)
register_family(
    Family(
        "latent-upscale",
        pipelines=("StableDiffusionLatentUpscalePipeline",),
        upscale=latent_upscale,
        description="Stable Diffusion x2 latent upscaler: K-diffusion UNet on SD 1.x latents, Euler",
    )
)


@register_template("generate_and_upscale", kind="pipeline")
def generate_and_upscale(
    model: str | None = None,
    preset: str | None = None,
    upscaler: str | None = None,
    upscaler_preset: str | None = None,
    family: str | None = None,
    steps: int | None = None,
    upscale_steps: int | None = None,
    guidance_scale: float | None = None,
    upscale_guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
) -> Pipeline:
    """Text to image, then the image upscaled (x4 or the x2 latent upscaler, found from the upscaler model):
    one prompt for both. Settings left unset are each family's defaults."""
    first = {"steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width}
    second = {"steps": upscale_steps, "guidance_scale": upscale_guidance_scale}
    p = Pipeline("generate_and_upscale")
    p.add_graph(
        text_to_image(
            model=model,
            preset=preset,
            family=family,
            dtype=dtype,
            **{k: v for k, v in first.items() if v is not None},
        ),
        id="generate",
    )
    p.add_graph(
        upscale(
            model=upscaler,
            preset=upscaler_preset,
            dtype=dtype,
            **{k: v for k, v in second.items() if v is not None},
        ),
        id="upscale",
    )
    p.connect("generate.image", "upscale.image")
    p.expose_input("prompt", ["generate.prompt", "upscale.prompt"])
    p.expose_input("negative_prompt", ["generate.negative_prompt", "upscale.negative_prompt"], default="")
    p.expose_output("draft", "generate.image")
    p.expose_output("image", "upscale.image")
    return p
