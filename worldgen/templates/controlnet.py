"""The `controlnet:` template option and the `controlled` template: one or several ControlNets on a family graph.

    Graph.from_template("text_to_image", preset="tiny", controlnet={"model": "preset:controlnet-tiny"})
    Graph.from_template("controlled", preset="tiny", controlnet=[{...}, {...}])   # multi-ControlNet

The spec is a mapping (one ControlNet; `guess_mode` may sit beside its fields), a list of mappings (several), or
`{"nets": [...], "guess_mode": bool}`. Each ControlNet's fields: `model` (a ControlNetModel directory or hub id,
`preset:<name>` for a preset's `controlnet` subfolder, or a model reference mapping), `scale`, `start`, `end`
(fractions of the steps, as diffusers' control_guidance_start/end) and `preprocess` (`none`, `canny`, or
`{type: canny, low_threshold, high_threshold}`).

What it adds, per ControlNet k (ids and input names without a suffix for the first, `_2`, `_3`... after):

    control_image(_k) -> [canny(_k) ->] control(_k) -> controlnet(_k) -> ... -> <backbone>.control
    the entering latent -> control(_k).latent          (the generation size and batch)
    the backbone's inputs -> controlnet(_k)            (the same model input, timestep and conditions)
    schedule.state / solver.state -> controlnet(_k).state   (which step of how many: start/end)

and exposes `control_image(_k)` and `controlnet_scale(_k)`. Each family that takes ControlNets has a branch in
`_BRANCHES` (SD 1.x/2.x and SDXL share the UNet's; Flux's is worldgen/templates/flux_controlnet.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worldgen.errors import ConfigError, ModelLoadError, format_validation_error
from worldgen.graph import Graph
from worldgen.model_ref import ModelRef
from worldgen.templates import register_template
from worldgen.templates.families import Attachment, Family, register_attachment

OPTION = "controlnet"


class CannySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["canny"] = "canny"
    low_threshold: int = Field(100, ge=0, le=255)
    high_threshold: int = Field(200, ge=0, le=255)


class NetSpec(BaseModel):
    """One ControlNet of the spec."""

    model_config = ConfigDict(extra="forbid")
    model: str | dict[str, Any]
    scale: float = Field(1.0, ge=0.0, description="controlnet_conditioning_scale")
    start: float = Field(0.0, ge=0.0, le=1.0, description="control_guidance_start (fraction of the steps)")
    end: float = Field(1.0, ge=0.0, le=1.0, description="control_guidance_end (fraction of the steps)")
    preprocess: Literal["none", "canny"] | CannySpec = "none"

    @model_validator(mode="after")
    def _ordered(self) -> NetSpec:
        if self.start >= self.end:
            raise ValueError(f"start {self.start} must be below end {self.end}")
        return self


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nets: list[NetSpec] = Field(min_length=1)
    guess_mode: bool = False


def _validated(cls: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        # The field, not where inside it (pydantic's loc adds union branch tags after it).
        field = err.errors()[0].get("loc", ())[:1]
        path = ".".join([prefix, *(str(p) for p in field)])
        raise ConfigError(format_validation_error(err, prefix), path=path) from None


def parse_spec(spec: Any) -> Spec:
    """The `controlnet:` option's value as a Spec; a ConfigError at `controlnet.<field>` for a bad one."""
    if isinstance(spec, Mapping) and "nets" in spec:
        outer = _validated(Spec, {**spec, "nets": [{"model": "-"}]}, OPTION)  # the graph-level fields
        items, prefix = spec["nets"], f"{OPTION}.nets"
        if not isinstance(items, list) or not items:
            raise ConfigError(
                "controlnet.nets must be a non-empty list of ControlNets", path=f"{OPTION}.nets"
            )
        nets = [_validated(NetSpec, item, f"{prefix}.{i}") for i, item in enumerate(items)]
        return Spec(nets=nets, guess_mode=outer.guess_mode)
    if isinstance(spec, Mapping):
        fields = {k: v for k, v in spec.items() if k != "guess_mode"}
        guess = _validated(
            Spec, {"nets": [{"model": "-"}], "guess_mode": spec.get("guess_mode", False)}, OPTION
        )
        return Spec(nets=[_validated(NetSpec, fields, OPTION)], guess_mode=guess.guess_mode)
    if isinstance(spec, list) and spec:
        for i, item in enumerate(spec):
            if isinstance(item, Mapping) and "guess_mode" in item:
                raise ConfigError(
                    "guess_mode applies to every ControlNet of a graph: give {nets: [...], guess_mode: ...}",
                    path=f"{OPTION}.{i}.guess_mode",
                )
        return Spec(nets=[_validated(NetSpec, item, f"{OPTION}.{i}") for i, item in enumerate(spec)])
    raise ConfigError(
        f"controlnet must be a ControlNet (a mapping with `model`), a list of them, or {{nets: [...], guess_mode}}; "
        f"got {type(spec).__name__}",
        path=OPTION,
    )


def model_ref(net: NetSpec, base: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The ControlNet's model reference: a preset's `controlnet` subfolder, a directory / hub id (its root), or the
    mapping given; the base model's dtype unless it says otherwise."""
    given = {"source": net.model} if isinstance(net.model, str) else dict(net.model)
    source = given.get("source")
    if isinstance(source, str) and source.startswith("preset:"):
        given.setdefault("subfolder", "controlnet")
    if "dtype" in base:
        given.setdefault("dtype", base["dtype"])
    try:
        return ModelRef(**given).model_dump(exclude_defaults=True) | {"source": given["source"]}
    except (ValidationError, TypeError, KeyError) as err:
        raise ConfigError(f"{path}: not a model reference ({err})", path=path) from None


# ---- checks (configs only: no weights are loaded to build a graph) ---------------------------------------
def _config(ref: Mapping[str, Any], cls: type, path: str) -> dict[str, Any]:
    from worldgen.models.loading import component_config

    try:
        return component_config(ref["source"], ref.get("subfolder") or "", ref.get("revision"), cls)
    except ModelLoadError as err:
        raise ConfigError(f"{path}: cannot read the model's config: {err}", path=path) from None


_LAYOUT = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")
_ADDED = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def check_fits(
    net: Mapping[str, Any], unet: Mapping[str, Any], scale_factor: int, node: str, path: str
) -> None:
    """A ConfigError naming the node and the field when a ControlNet config does not fit the UNet and VAE."""
    where = f"node '{node}' (adapter/controlnet)"
    for key in (*_LAYOUT, *_ADDED):
        if net.get(key) != unet.get(key):
            raise ConfigError(
                f"{where}: the ControlNet's {key} is {net.get(key)!r} but the UNet's is {unet.get(key)!r}; a "
                "ControlNet must be made for its UNet's block layout and conditioning (e.g. SD 1.5 ControlNets "
                "for SD 1.5, SDXL ones for SDXL)",
                path=path,
            )
    if net.get("conditioning_channels", 3) != 3:
        raise ConfigError(
            f"{where}: the ControlNet takes {net.get('conditioning_channels')}-channel control images "
            "(conditioning_channels); image/control prepares RGB ones (3)",
            path=path,
        )
    factor = 2 ** (len(net.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
    if factor != scale_factor:
        raise ConfigError(
            f"{where}: the ControlNet's conditioning embedding downsamples control images {factor}x but the "
            f"VAE's latents are {scale_factor}x smaller than the image (conditioning_embedding_out_channels)",
            path=path,
        )


# ---- the UNet families (SD 1.x/2.x, SDXL) -----------------------------------------------------------------
# The backbone's ports a ControlNet takes too, with the same values.
_SHARED_PORTS = ("sample", "timestep", "condition", "condition_uncond", "pooled", "pooled_uncond", "time_ids")
_SHARED_PORTS += ("time_ids_uncond",)


def _suffix(k: int) -> str:
    return "" if k == 1 else f"_{k}"


def _entering_latent(g: Graph, task: str) -> str:
    """The latent the loop starts from ('node.port'): the ControlNet's image is sized and batched like it."""
    for edge in g.edges:
        if edge.target == "schedule" and edge.target_port == "latent" and edge.source != "solver":
            return f"{edge.source}.{edge.source_port}"
    raise ConfigError(
        f"controlnet: not yet for a {task} graph that starts from a given latent (an SDXL refiner hand-off)",
        path=OPTION,
    )


def _vae_factor(g: Graph) -> int:
    from diffusers import AutoencoderKL

    vae = next(b for n, b in g.blocks() if b.block_type == "codec/vae")
    config = _config(vae.config.model.model_dump(), AutoencoderKL, "vae.model")
    return 2 ** (len(config["block_out_channels"]) - 1)


def attach_unet(g: Graph, task: str, ref: Mapping[str, Any], spec: Spec, backbone: str = "unet") -> None:
    """ControlNets on a UNet backbone (StableDiffusion(XL)ControlNet(Img2Img)Pipeline), chained in spec order."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = _config(g.block(backbone).config.model.model_dump(), UNet2DConditionModel, f"{backbone}.model")
    factor = _vae_factor(g)
    latent = _entering_latent(g, task)
    several = len(spec.nets) > 1
    previous = None
    for k, net in enumerate(spec.nets, start=1):
        s = _suffix(k)
        path = f"{OPTION}.{k - 1}.model" if several else f"{OPTION}.model"
        cn_ref = model_ref(net, ref, path)
        check_fits(_config(cn_ref, ControlNetModel, path), unet, factor, f"controlnet{s}", path)
        g.add_node("image/control", id=f"control{s}", config={"scale_factor": factor}, auto_connect=False)
        g.add_edge(latent, f"control{s}.latent")
        if net.preprocess == "none":
            g.expose_input(f"control_image{s}", f"control{s}.image")
        else:
            canny = net.preprocess if isinstance(net.preprocess, CannySpec) else CannySpec()
            config = canny.model_dump(exclude={"type"})
            g.add_node("image/canny", id=f"canny{s}", config=config, auto_connect=False)
            g.add_edge(f"canny{s}.image", f"control{s}.image")
            g.expose_input(f"control_image{s}", f"canny{s}.image")
        config = {
            "model": cn_ref,
            "scale": net.scale,
            "start": net.start,
            "end": net.end,
            "guess_mode": spec.guess_mode,
        }
        node = f"controlnet{s}"
        g.add_node("adapter/controlnet", id=node, config=config, auto_connect=False)
        for edge in g.edges:  # the same model input, timestep and conditions as the backbone
            if edge.target == backbone and edge.target_port in _SHARED_PORTS:
                g.add_edge(f"{edge.source}.{edge.source_port}", f"{node}.{edge.target_port}")
        g.add_edge(f"control{s}.image", f"{node}.image")
        g.add_edge("schedule.state", f"{node}.state")
        g.add_edge("solver.state", f"{node}.state")
        if previous is not None:
            g.add_edge(f"{previous}.residuals", f"{node}.residuals")
        g.expose_input(f"controlnet_scale{s}", f"{node}.scale", default=net.scale)
        previous = node
    g.add_edge(f"{previous}.residuals", f"{backbone}.control")


def _attach_unet_spec(g: Graph, task: str, ref: Mapping[str, Any], spec: Any) -> None:
    attach_unet(g, task, ref, parse_spec(spec))


def _attach_flux(g: Graph, task: str, ref: Mapping[str, Any], spec: Any) -> None:
    from worldgen.templates.flux_controlnet import attach_flux_controlnet

    attach_flux_controlnet(g, spec, ref, task=task)


# Family name -> how ControlNets attach to its graph: (graph, task, ref, the option's raw value) -> None; each
# branch parses the spec fields its ControlNets take (Flux: `mode` for union ControlNets, no `preprocess` yet).
_BRANCHES: dict[str, Callable[[Graph, str, Mapping[str, Any], Any], None]] = {
    "sd": _attach_unet_spec,
    "sdxl": _attach_unet_spec,
    "flux": _attach_flux,
}


def attach(g: Graph, *, family: Family, task: str, ref: Mapping[str, Any], spec: Any) -> None:
    """The `controlnet:` attachment: the family's branch parses the spec and adds the nodes."""
    if family.name not in _BRANCHES:
        raise ConfigError(
            f"controlnet: not yet for the {family.name} family (ControlNets attach to: {', '.join(_BRANCHES)})",
            path=OPTION,
        )
    _BRANCHES[family.name](g, task, ref, spec)


register_attachment(
    Attachment(
        OPTION,
        attach,
        "ControlNet(s): a control image (edges, depth, pose, a previous picture) steers the layout",
    )
)


@register_template("controlled")
def controlled(
    controlnet: Any,
    model: str | None = None,
    preset: str | None = None,
    family: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    **options: Any,
) -> Graph:
    """Text to image steered by ControlNet(s) (`StableDiffusion(XL)ControlNetPipeline`, `FluxControlNetPipeline`):
    prompt + control_image -> image. `controlnet` is required (see the module doc); `options` are the family's text_to_image options."""
    from worldgen.templates.diffusion import text_to_image

    if controlnet is None:
        raise ConfigError("the controlled template needs a `controlnet` spec", path=OPTION)
    graph = text_to_image(model, preset, family, revision, dtype, controlnet=controlnet, **options)
    graph.name = "controlled"
    return graph
