"""Model families: which graph a diffusers model directory becomes, found from its `model_index.json`.

`DiffusionPipeline.from_pretrained` reads the `_class_name` a directory's (or hub id's) model_index.json names;
the `text_to_image` / `image_to_image` templates do the same and build that family's graph. Each family module
(worldgen/templates/diffusion.py for SD 1.x/2.x, sdxl.py, sd3.py, flux.py) registers a `Family` with its
builders; a builder gets the model reference (`source`, and `revision`/`dtype` when set: no subfolder) and the
template's keyword options, and checks them itself (`check_options` turns unknown ones into a clear error).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldgen.errors import ConfigError, did_you_mean

Builder = Callable[..., Any]  # (ref: dict, **options) -> Graph or Pipeline

_FAMILY_MODULES = (
    "worldgen.templates.diffusion",
    "worldgen.templates.sdxl",
    "worldgen.templates.sd3",
    "worldgen.templates.flux",
    "worldgen.templates.upscale",
    "worldgen.templates.stable_audio",
    "worldgen.templates.wan",
)
# Modules registering attachments (adapters a family graph takes as a template option), applied in this order.
_ATTACHMENT_MODULES: tuple[str, ...] = (
    "worldgen.templates.lora",
    "worldgen.templates.ip_adapter",
    "worldgen.templates.controlnet",
)


# The graphs a family may build.
TASKS = (
    "text_to_image",
    "image_to_image",
    "inpaint",
    "upscale",
    "text_to_video",
    "image_to_video",
    "text_to_audio",
)


@dataclass(frozen=True)
class Family:
    """A model family: the diffusers pipeline classes that mean it and the graphs built for it."""

    name: str
    pipelines: tuple[str, ...]  # `_class_name`s in model_index.json
    text_to_image: Builder | None = None
    image_to_image: Builder | None = None
    description: str = ""
    inpaint: Builder | None = None
    upscale: Builder | None = None  # the upscaler families' one graph
    text_to_audio: Builder | None = None  # the audio families' (Stable Audio Open)
    text_to_video: Builder | None = None  # video families (wan)
    image_to_video: Builder | None = None

    def builder(self, task: str) -> Builder:
        build = getattr(self, task)
        if build is None:
            can = [t for t in TASKS if getattr(self, t) is not None]
            raise ConfigError(f"the {self.name} family has no {task} graph; it has: {', '.join(can)}")
        return build


_FAMILIES: dict[str, Family] = {}
_loaded = False


@dataclass(frozen=True)
class Attachment:
    """An adapter a family graph takes as a template option (`controlnet: ...`, `lora: ...`): `attach` adds its
    nodes and edges to the graph the family built, by the family's node ids (`unet`/`transformer`/`flux`,
    `te`, `schedule`, `solver`, ...), and exposes its inputs."""

    option: str
    attach: Callable[..., None]  # (graph, family: Family, task: str, ref: dict, spec) -> None
    description: str = ""


_ATTACHMENTS: dict[str, Attachment] = {}


def register_attachment(attachment: Attachment) -> Attachment:
    """Make an attachment known (its module calls this at import)."""
    _ATTACHMENTS[attachment.option] = attachment
    return attachment


def attachments() -> dict[str, Attachment]:
    """Every registered attachment by option name, in the order they are applied."""
    for module in _ATTACHMENT_MODULES:
        importlib.import_module(module)
    return dict(_ATTACHMENTS)


def register_family(family: Family) -> Family:
    """Make a family known (its module calls this at import)."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family by name."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _FAMILY_MODULES:
            importlib.import_module(module)
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(
            f"unknown model family '{name}'{did_you_mean(name, known)}; supported: {', '.join(known)}",
            path="family",
        )
    return known[name]


def family_of_pipeline(class_name: str, source: str) -> Family:
    """The family a pipeline class belongs to; a ConfigError naming it and the supported ones otherwise."""
    for family in families().values():
        if class_name in family.pipelines:
            return family
    supported = ", ".join(f"{p} ({f.name})" for f in families().values() for p in f.pipelines)
    raise ConfigError(
        f"model '{source}' is a {class_name} (model_index.json `_class_name`), which worldgen cannot build a "
        f"graph for; supported pipelines: {supported} (or set `family:` if it is one of these under another name)",
        path="model",
    )


def model_index(source: str, revision: str | None = None) -> dict[str, Any]:
    """A model's model_index.json: a preset's (from its registration), a local directory's, or a hub id's
    (from the local Hugging Face cache, or the hub when it can be reached)."""
    from worldgen.models.presets import PRESET_PREFIX, get_preset

    if source.startswith(PRESET_PREFIX):
        preset = get_preset(source[len(PRESET_PREFIX) :])
        # The pipeline's flags (e.g. SDXL's force_zeros_for_empty_prompt), as save_pretrained records them.
        flags = {k: v for k, v in preset.pipeline_extra.items() if isinstance(v, (bool, int, float, str))}
        return {
            "_class_name": preset.pipeline_class,
            **flags,
            **{k: [None, v.cls] for k, v in preset.components.items()},
        }
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            raise ConfigError(
                f"'{source}' has no model_index.json, so it is not a diffusers pipeline directory (found: "
                f"{', '.join(found) or 'nothing'}); save one with `pipeline.save_pretrained(...)`",
                path="model",
            )
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {index}: {err}", path="model") from None
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except Exception as err:
        raise ConfigError(
            f"cannot read model_index.json of '{source}' (no local directory of that name, and not a hub id in "
            f"the local cache or reachable): {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            path="model",
        ) from None


def detect_family(source: str, revision: str | None = None) -> Family:
    """The family of a model, from the pipeline class its model_index.json names."""
    index = model_index(source, revision)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ConfigError(f"model_index.json of '{source}' names no `_class_name`", path="model")
    return family_of_pipeline(class_name, source)


def check_options(family: Family, task: str, options: Mapping[str, Any]) -> None:
    """A ConfigError for an option the family's builder does not take, naming the ones it does."""
    accepted = [name for name in inspect.signature(family.builder(task)).parameters if name != "ref"]
    accepted += list(attachments())
    for name in options:
        if name not in accepted:
            raise ConfigError(
                f"the {family.name} family's {task} has no parameter '{name}'{did_you_mean(name, accepted)}; "
                f"its parameters: {', '.join(accepted)}",
                path=name,
            )


def family_components(source: str, revision: str | None = None) -> set[str]:
    """The components (subfolders) a model has, by its model_index.json: a pipeline saved without an optional
    encoder names it `[null, null]`."""
    index = model_index(source, revision)
    return {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[-1] is not None
    }


def read_config(ref: Mapping[str, Any], subfolder: str, cls: type) -> dict[str, Any]:
    """A model component's config without its weights (templates size graphs by it); a ConfigError at `model`
    when it cannot be read."""
    from worldgen.errors import ModelLoadError
    from worldgen.models.loading import component_config

    try:
        return component_config(ref["source"], subfolder, ref.get("revision"), cls)
    except ModelLoadError as err:
        raise ConfigError(str(err), path="model") from None
