"""Flux ControlNet on the Flux graphs (`FluxControlNetPipeline`): `attach_flux_controlnet` adds one chain of
nodes per ControlNet to the graph templates/flux.py built:

    control_image -> control_prep (image/flux_control: resize to the generation size)
                  -> control_enc (codec/vae encode) -> control_pack (latent/flux_pack) -.
    schedule/solver (latent, timestep, state), te/te_2, pack.img_ids -> controlnet (adapter/flux_controlnet)
    controlnet -> controlnet_2 -> ... -> flux.control   (each adds its residuals to the ones before)

The control images are encoded with a sample drawn from the run's generator, in order, before the initial
noise (control_enc.rng -> control_enc_2.rng -> noise.rng), as the pipeline draws them. On an image_to_image
graph (`FluxControlNetImg2ImgPipeline`) the control image takes the init image's size, and the init image is
encoded after the control images (-> vae_enc.rng). A ControlNet is
named by `model` (a directory or hub id of a FluxControlNetModel, or a ControlNet preset such as
`preset:flux-controlnet-tiny`), with `scale` (exposed as `controlnet_scale`, `controlnet_scale_2`, ...),
`start`/`end` (the fraction of the steps it acts in) and, for union ControlNets, `mode`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.templates.families import read_config
from worldgen.templates.flux import flux_spec

OPTION = "controlnet"  # the template option (and error path prefix) the specs come under


class FluxControlNetSpec(BaseModel):
    """One ControlNet on a Flux graph (the `controlnet:` option, or one item of a list of them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | dict[str, Any] = Field(
        description="a FluxControlNetModel: directory, hub id or preset ('preset:flux-controlnet-tiny'), or a "
        "model reference {source, subfolder, revision}"
    )
    scale: float = Field(
        1.0, ge=0.0, description="controlnet_conditioning_scale (an exposed input's default)"
    )
    start: float = Field(0.0, ge=0.0, le=1.0, description="control_guidance_start: fraction of the steps")
    end: float = Field(1.0, ge=0.0, le=1.0, description="control_guidance_end: fraction of the steps")
    mode: int | None = Field(None, ge=0, description="union ControlNets: the control type (control_mode)")

    @field_validator("end")
    @classmethod
    def _end_after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start", 0.0)
        if end <= start:
            raise ValueError(f"end must be above start ({start}): the control would act in no step")
        return end


def parse_specs(specs: Any) -> list[FluxControlNetSpec]:
    """The ControlNet specs of a `controlnet:` option (one mapping or a list); a ConfigError at
    `controlnet.<field>` (`controlnet.<i>.<field>` in a list) for a bad one."""
    items = list(specs) if isinstance(specs, Sequence) and not isinstance(specs, str) else [specs]
    if not items:
        raise ConfigError("give at least one ControlNet", path=OPTION)
    parsed = []
    for i, item in enumerate(items):
        prefix = OPTION if len(items) == 1 and not isinstance(specs, Sequence) else f"{OPTION}.{i}"
        if isinstance(item, FluxControlNetSpec):
            parsed.append(item)
            continue
        if isinstance(item, str):
            item = {"model": item}  # a bare model name: the defaults for the rest
        try:
            parsed.append(FluxControlNetSpec.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(
                f"{first['msg']} (got {first.get('input')!r})", path=".".join(p for p in (prefix, field) if p)
            ) from None
    return parsed


def controlnet_ref(model: str | Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """The ControlNet's model reference: a preset's at its 'controlnet' subfolder, a repository at its root;
    the dtype and device of the family's model unless given."""
    from worldgen.models.presets import PRESET_PREFIX
    from worldgen.models.tiny_flux import CONTROLNET_SUBFOLDER

    given = {"source": model} if isinstance(model, str) else dict(model)
    if given["source"].startswith(PRESET_PREFIX):
        given.setdefault("subfolder", CONTROLNET_SUBFOLDER)
    for key in ("dtype", "device"):
        if key in ref and key not in given:
            given[key] = ref[key]
    return given


def check_fits(cn_ref: Mapping[str, Any], ref: Mapping[str, Any], node: str, path: str) -> dict[str, Any]:
    """The ControlNet's config; a ConfigError at `path` (naming `node`) when it does not fit the Flux
    transformer (its residuals, inputs or conditioning would not match), before any weights load."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    try:
        config = read_config(cn_ref, cn_ref.get("subfolder") or "", FluxControlNetModel)
    except ConfigError as err:
        raise ConfigError(f"node '{node}' (adapter/flux_controlnet): {err.detail}", path=path) from None
    transformer = read_config(ref, "transformer", FluxTransformer2DModel)

    def inner(c: Mapping[str, Any]) -> int:
        return int(c.get("num_attention_heads", 24)) * int(c.get("attention_head_dim", 128))

    for field, mine, theirs in (
        ("num_attention_heads x attention_head_dim", inner(config), inner(transformer)),
        ("in_channels", config.get("in_channels", 64), transformer.get("in_channels", 64)),
        ("joint_attention_dim", config.get("joint_attention_dim"), transformer.get("joint_attention_dim")),
        (
            "pooled_projection_dim",
            config.get("pooled_projection_dim"),
            transformer.get("pooled_projection_dim"),
        ),
    ):
        if mine != theirs:
            raise ConfigError(
                f"node '{node}' (adapter/flux_controlnet): ControlNet '{cn_ref['source']}' has {field} {mine}, "
                f"but the Flux transformer of '{ref['source']}' has {theirs}: use a ControlNet made for this model",
                path=path,
            )
    if config.get("conditioning_embedding_channels") is not None:
        raise ConfigError(
            f"node '{node}' (adapter/flux_controlnet): ControlNet '{cn_ref['source']}' takes pixels through an "
            "input hint block (the XLabs kind); only ControlNets taking the control image's VAE latent (the "
            "InstantX kind) are supported",
            path=path,
        )
    return config


def attach_flux_controlnet(
    graph: Graph, specs: Any, ref: Mapping[str, Any], *, task: str = "text_to_image"
) -> Graph:
    """Add the ControlNets of `specs` (one spec or a list: model, scale, start, end, mode) to a Flux graph
    built by templates/flux.py for `task` (text_to_image or image_to_image), and expose `control_image`/`controlnet_scale` (`_2`, `_3`, ... for the
    following ones; `control_mode` for union ControlNets). Returns the graph."""
    if task not in ("text_to_image", "image_to_image"):
        raise ConfigError(
            f"a Flux ControlNet attaches to text_to_image and image_to_image graphs (FluxControlNetPipeline, "
            f"FluxControlNetImg2ImgPipeline), not {task}",
            path=OPTION,
        )
    parsed = parse_specs(specs)
    ref = dict(ref)
    spec = flux_spec(ref)
    # Text to image generates the noise node's size (unless given); image to image the init image's.
    default = graph.block("noise").config if task == "text_to_image" else None
    rng_source = None  # the previous encoder's generator state: the images are encoded in order
    control_source = None  # the previous ControlNet's residuals: each adds its own
    for i, item in enumerate(parsed):
        suffix = "" if i == 0 else f"_{i + 1}"
        node = f"controlnet{suffix}"
        path = f"{OPTION}.model" if len(parsed) == 1 else f"{OPTION}.{i}.model"
        cn_ref = controlnet_ref(item.model, ref)
        config = check_fits(cn_ref, ref, node, path)
        if item.mode is not None and config.get("num_mode") is None:
            raise ConfigError(
                f"node '{node}' (adapter/flux_controlnet): ControlNet '{cn_ref['source']}' is no union "
                "ControlNet (its config has no num_mode), so it takes no mode",
                path=path.replace(".model", ".mode"),
            )
        prep, enc, pack = f"control_prep{suffix}", f"control_enc{suffix}", f"control_pack{suffix}"
        graph.add_node(
            "image/flux_control",
            id=prep,
            config={
                "height": default.height if default else spec.default_size,
                "width": default.width if default else spec.default_size,
                "multiple": spec.size_multiple,
            },
            auto_connect=False,
        )
        graph.add_node(
            "codec/vae",
            id=enc,
            config={
                "model": {**ref, "subfolder": "vae"},
                "mode": "encode",
                "pixel_multiple": spec.size_multiple,
            },
            auto_connect=False,
        )
        graph.add_node("latent/flux_pack", id=pack, auto_connect=False)
        graph.add_node(
            "adapter/flux_controlnet",
            id=node,
            config={"model": cn_ref, "start": item.start, "end": item.end},
            auto_connect=False,
        )
        edges = [
            (f"{prep}.image", f"{enc}.image"),
            (f"{enc}.latent", f"{pack}.latent"),
            (f"{pack}.latent", f"{node}.controlnet_cond"),
            # The same inputs the transformer gets, at iteration 0 from the schedule, then from the solver.
            ("schedule.model_input", f"{node}.sample"),
            ("schedule.timestep", f"{node}.timestep"),
            ("schedule.state", f"{node}.state"),
            ("solver.model_input", f"{node}.sample"),
            ("solver.timestep", f"{node}.timestep"),
            ("solver.state", f"{node}.state"),
            ("te.pooled", f"{node}.pooled"),
            ("te_2.embedding", f"{node}.condition"),
            ("pack.img_ids", f"{node}.img_ids"),
        ]
        if rng_source is not None:
            edges.append((rng_source, f"{enc}.rng"))
        if control_source is not None:
            edges.append((control_source, f"{node}.control"))
        for source, target in edges:
            graph.add_edge(source, target)
        rng_source, control_source = f"{enc}.rng", f"{node}.control"
        graph.expose_input(f"control_image{suffix}", f"{prep}.image")
        graph.expose_input(f"controlnet_scale{suffix}", f"{node}.conditioning_scale", default=item.scale)
        if task == "text_to_image":
            graph.feed_from_input("height", f"{prep}.height")
            graph.feed_from_input("width", f"{prep}.width")
        else:
            graph.feed_from_input("image", f"{prep}.like")
        graph.feed_from_input("guidance_scale", f"{node}.guidance")
        if config.get("num_mode") is not None:
            graph.expose_input(f"control_mode{suffix}", f"{node}.control_mode", default=item.mode)
    # The pipelines encode every control image before they draw from the same generator for the initial latent:
    # the noise (text to image), or the init image's latent sample and then the noise (image to image).
    graph.add_edge(rng_source, "noise.rng" if task == "text_to_image" else "vae_enc.rng")
    graph.add_edge(control_source, "flux.control")
    return graph
