"""Preset models: seeded, random-initialised pipelines of every supported family, built from configs (no network).

A preset has the exact architecture and interfaces of a real checkpoint of its family, at tiny widths, so tests,
benchmarks and the offline default world run in milliseconds on a CPU. Presets are named `<name>` for Stable
Diffusion 1.x (`tiny`, `small`) and `<family>-<name>` for the others (`sdxl-tiny`, `flux-small`); a model
reference names one as `preset:<preset>`.

Each family's presets live in their own module (worldgen/models/tiny*.py) and register here; the registry loads
them on first use, so importing it stays light.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worldgen.errors import ModelLoadError, did_you_mean

PRESET_PREFIX = "preset:"
# The family whose presets keep their bare names (`preset: tiny`), as before there were other families.
DEFAULT_FAMILY = "sd"
_BUILTIN_MODULES = (
    "worldgen.models.tiny",
    "worldgen.models.tiny_sdxl",
    "worldgen.models.tiny_sd3",
    "worldgen.models.tiny_flux",
    "worldgen.models.tiny_upscale",
    "worldgen.models.tiny_inpaint",
    "worldgen.models.tiny_ip_adapter",
    "worldgen.models.tiny_controlnet",
    "worldgen.models.tiny_stable_audio",
    "worldgen.models.tiny_wan",
)


@dataclass(frozen=True)
class Component:
    """One component of a preset (a subfolder of its diffusers directory).

    `cls` is "diffusers.<Class>" or "transformers.<Class>"; a model is `cls(**config)` (diffusers) or
    `cls(cls.config_class(**config))` (transformers), its weights drawn under `seed`. `build` replaces that for
    what a config cannot describe (a tokenizer built from a vocabulary, an encoder that must agree with it);
    it gets the config and returns the component.
    """

    cls: str
    config: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    build: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True)
class Preset:
    """A named preset: the diffusers pipeline it stands for and its components by subfolder."""

    name: str
    family: str
    pipeline_class: str  # the `_class_name` a diffusers directory of it carries in model_index.json
    description: str
    components: Mapping[str, Component]
    # Pipeline constructor arguments besides the components (optional parts left out, flags), for saving it.
    pipeline_extra: Mapping[str, Any] = field(default_factory=dict)


_PRESETS: dict[str, Preset] = {}
_loaded = False


def register_preset(preset: Preset) -> Preset:
    """Make a preset known by its name (a family module calls this at import)."""
    _PRESETS[preset.name] = preset
    return preset


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def preset_names(family: str | None = None) -> list[str]:
    """The registered presets (of one family, if given)."""
    _ensure_loaded()
    return [name for name, p in _PRESETS.items() if family is None or p.family == family]


def preset_name(preset: str, family: str | None = None) -> str:
    """The registered name of `preset` for `family`: 'tiny' + 'flux' -> 'flux-tiny'; a full name stays."""
    _ensure_loaded()
    if family in (None, DEFAULT_FAMILY) or preset.startswith(f"{family}-"):
        return preset
    return f"{family}-{preset}"


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ModelLoadError naming the presets there are otherwise."""
    _ensure_loaded()
    if name not in _PRESETS:
        raise ModelLoadError(
            f"unknown model preset '{name}'{did_you_mean(name, _PRESETS)}; choices: {', '.join(_PRESETS)}"
        )
    return _PRESETS[name]


def _component(name: str, subfolder: str) -> Component:
    preset = get_preset(name)
    if subfolder not in preset.components:
        choices = list(preset.components)
        raise ModelLoadError(
            f"model preset '{name}' has no component '{subfolder}'{did_you_mean(str(subfolder), choices)}; "
            f"choices: {', '.join(choices)}"
        )
    return preset.components[subfolder]


def preset_config(name: str, subfolder: str) -> dict[str, Any]:
    """A preset component's config (what its config.json would hold), without building it."""
    return copy.deepcopy(dict(_component(name, subfolder).config))


def _import_class(path: str) -> type:
    library, _, class_name = path.partition(".")
    return getattr(importlib.import_module(library), class_name)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run `build()` under a fixed CPU seed without disturbing the caller's global RNG."""
    import torch

    # fork_rng restores the global CPU generator afterwards; devices=[] avoids touching (or warning about) CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_preset_component(name: str, subfolder: str) -> Any:
    """Build one component of a preset: models float32 in eval mode, the same weights in any order of building."""
    component = _component(name, subfolder)
    config = copy.deepcopy(dict(component.config))
    if component.build is not None:
        obj = _seeded(component.seed, lambda: component.build(config))
    else:
        cls = _import_class(component.cls)
        if hasattr(cls, "from_config") and "Scheduler" in cls.__name__:
            return cls.from_config(config)
        if component.cls.startswith("transformers."):
            obj = _seeded(component.seed, lambda: cls(cls.config_class(**config)))
        else:
            obj = _seeded(component.seed, lambda: cls(**config))
    return obj.eval() if hasattr(obj, "eval") else obj


def preset_pipeline_components(name: str) -> dict[str, Any]:
    """Every component of a preset, keyed like its diffusers pipeline's constructor arguments."""
    return {subfolder: build_preset_component(name, subfolder) for subfolder in get_preset(name).components}


def preset_pipeline(name: str) -> Any:
    """The diffusers pipeline a preset stands for, built from its components."""
    import diffusers

    preset = get_preset(name)
    cls = getattr(diffusers, preset.pipeline_class)
    return cls(**preset_pipeline_components(name), **preset.pipeline_extra)


def save_preset_pipeline(name: str, directory: str | Path) -> Path:
    """Write a preset as a diffusers directory (model_index.json, safetensors) and return its path."""
    path = Path(directory)
    preset_pipeline(name).save_pretrained(path, safe_serialization=True)
    return path
