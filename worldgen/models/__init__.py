"""Model loading (presets, local directories, hub ids) and the in-process model pool.

Re-exports only, resolved lazily: importing `worldgen.models` does not import torch/diffusers, so the CLI's
`validate` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ModelPool": "worldgen.models.pool",
    "default_pool": "worldgen.models.pool",
    "load_component": "worldgen.models.loading",
    "build_preset_component": "worldgen.models.presets",
    "save_preset_pipeline": "worldgen.models.presets",
    "preset_pipeline_components": "worldgen.models.presets",
    "preset_pipeline": "worldgen.models.presets",
    "preset_names": "worldgen.models.presets",
    "get_preset": "worldgen.models.presets",
    "PRESETS": "worldgen.models.tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'worldgen.models' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
