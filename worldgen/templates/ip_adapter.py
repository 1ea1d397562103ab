"""The `ip_adapter:` template option: an IP-Adapter on an SD 1.x/2.x or SDXL graph (text_to_image and
image_to_image), as `pipe.load_ip_adapter(model, subfolder=..., weight_name=...)` + `pipe.set_ip_adapter_scale`.

    Graph.from_template("text_to_image", preset="tiny", ip_adapter={"model": "preset:ip-adapter-tiny"})
    Graph.from_template("text_to_image", model="<sd 1.5>", ip_adapter={"model": "h94/IP-Adapter",
        "subfolder": "models", "weight_name": "ip-adapter_sd15.safetensors", "scale": 0.6})

adds an `adapter/ip_adapter` node `ip_adapter` (the CLIP vision encoder) feeding the backbone `unet`'s
`ip_adapter` input, and exposes `ip_adapter_image` (the reference image; required) and `ip_adapter_scale`.
The weights are checked against the UNet's config when the graph is built (no weights are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.model_ref import ModelRef
from worldgen.templates.families import Attachment, Family, register_attachment

OPTION = "ip_adapter"
FAMILIES = ("sd", "sdxl")
BACKBONE = "unet"


class IPAdapterSpec(BaseModel):
    """The `ip_adapter:` option: `load_ip_adapter`'s arguments and the scale."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="folder or hub id holding the weights (e.g. h94/IP-Adapter), or preset:<name>"
    )
    subfolder: str = Field(
        "", description="where the weights file is under `model` (h94: 'models', 'sdxl_models')"
    )
    weight_name: str | None = Field(
        None, description="the weights file (e.g. ip-adapter_sd15.safetensors); a preset's own by default"
    )
    image_encoder: str | dict[str, Any] = Field(
        "image_encoder",
        description="the CLIP vision encoder: a folder name under `subfolder` (as diffusers' image_encoder_folder), "
        "a path with '/' under `model`, or a model reference {source, subfolder}",
    )
    scale: float = Field(
        1.0, description="the image prompt's weight (the `ip_adapter_scale` input's default)"
    )
    revision: str | None = None


def _spec(value: Any) -> IPAdapterSpec:
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"ip_adapter must be a mapping {{model, subfolder, weight_name, image_encoder, scale}} or a model "
            f"name, got {type(value).__name__}",
            path=OPTION,
        )
    try:
        return IPAdapterSpec.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"ip_adapter.{field}: {first['msg']}", path=f"{OPTION}.{field}") from None


def _weight_name(spec: IPAdapterSpec) -> str:
    from worldgen.models.presets import PRESET_PREFIX
    from worldgen.models.tiny_ip_adapter import WEIGHT_NAME

    if spec.weight_name is not None:
        return spec.weight_name
    if spec.model.startswith(PRESET_PREFIX):
        return WEIGHT_NAME
    raise ConfigError(
        f"ip_adapter.weight_name: name the weights file in '{spec.model}' (e.g. ip-adapter_sd15.safetensors)",
        path=f"{OPTION}.weight_name",
    )


def _encoder_ref(spec: IPAdapterSpec, dtype: str) -> dict[str, Any]:
    """The image encoder's model reference, by diffusers' `image_encoder_folder` rule."""
    given = spec.image_encoder
    if isinstance(given, dict):
        try:
            return ModelRef(**{"dtype": dtype, **given}).model_dump(exclude_defaults=True) | {
                "source": given["source"]
            }
        except (ValidationError, TypeError, KeyError) as err:
            raise ConfigError(
                f"ip_adapter.image_encoder must be a model reference with `source`: {err}",
                path=f"{OPTION}.image_encoder",
            ) from None
    folder = Path(spec.subfolder, given) if given.count("/") == 0 else Path(given)
    ref = {"source": spec.model, "subfolder": folder.as_posix(), "dtype": dtype}
    return ref | ({"revision": spec.revision} if spec.revision else {})


def _check_against_unet(graph: Graph, weights: Any, where: str) -> None:
    """The weights must fit the graph's UNet: checked on its config (a UNet without weights, on the meta
    device), so a mismatch is an error when the graph is built rather than mid-run."""
    import torch
    from diffusers import UNet2DConditionModel

    from worldgen.nodes.ip_adapter import check_fits, read_weights
    from worldgen.templates.families import read_config

    unet_ref = graph.block(BACKBONE).config.model
    config = read_config(unet_ref.model_dump(), unet_ref.subfolder or "unet", UNet2DConditionModel)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        check_fits(read_weights(weights), unet, where)
    except ConfigError as err:
        raise ConfigError(err.detail, path=f"{OPTION}.model") from None


def attach(graph: Graph, *, family: Family, task: str, ref: dict[str, Any], spec: Any) -> None:
    """Add the IP-Adapter's encoder node to a family graph and feed its image prompt to the UNet."""
    if family.name not in FAMILIES:
        raise ConfigError(
            f"ip_adapter is supported on the {', '.join(FAMILIES)} families' UNets, not on {family.name} "
            "(its backbone takes no IP-Adapter here)",
            path=OPTION,
        )
    from worldgen.nodes.ip_adapter import IPAdapterWeights

    s = _spec(spec)
    weights = IPAdapterWeights(
        source=s.model, subfolder=s.subfolder, weight_name=_weight_name(s), revision=s.revision
    )
    _check_against_unet(graph, weights, weights.location())
    config = {
        "model": _encoder_ref(s, ref.get("dtype", "float32")),
        "weights": weights.model_dump(exclude_defaults=True),
        "scale": s.scale,
    }
    graph.add_node("adapter/ip_adapter", id="ip_adapter", config=config, auto_connect=False)
    graph.add_edge("ip_adapter.ip_adapter", f"{BACKBONE}.ip_adapter")
    graph.expose_input("ip_adapter_image", "ip_adapter.image")
    graph.expose_input("ip_adapter_scale", "ip_adapter.scale", default=s.scale)


register_attachment(
    Attachment(
        OPTION,
        attach,
        "IP-Adapter: a reference image's subject or style through image cross-attention (SD 1.x/2.x, SDXL); "
        "spec {model, subfolder, weight_name, image_encoder, scale}",
    )
)
