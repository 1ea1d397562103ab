"""Templates: named builders of graphs (and later pipelines and worlds) with keyword parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from worldgen.errors import ConfigError, did_you_mean

_TEMPLATES: dict[str, Callable[..., Any]] = {}
_BUILTIN_MODULES = ("worldgen.templates.diffusion", "worldgen.templates.worlds")
_loaded = False


def register_template(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a builder function available as `from_template(name, **params)`."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TEMPLATES[name] = fn
        return fn

    return register


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def _template(name: str) -> Callable[..., Any]:
    _ensure_loaded()
    if name not in _TEMPLATES:
        raise ConfigError(
            f"unknown template '{name}'{did_you_mean(name, _TEMPLATES)}; available: {', '.join(sorted(_TEMPLATES))}"
        )
    return _TEMPLATES[name]


def template_params(name: str) -> list[str]:
    """The keyword parameters a template accepts."""
    return list(inspect.signature(_template(name)).parameters)


def list_templates() -> dict[str, str]:
    """Template name -> first line of its description."""
    _ensure_loaded()
    return {name: (inspect.getdoc(fn) or "").splitlines()[0] for name, fn in sorted(_TEMPLATES.items())}


def build_template(name: str, **params: Any) -> Any:
    fn = _template(name)
    accepted = inspect.signature(fn).parameters
    unknown = [p for p in params if p not in accepted]
    if unknown:
        raise ConfigError(
            f"template '{name}' has no parameter '{unknown[0]}'{did_you_mean(unknown[0], accepted)}; "
            f"its parameters are: {', '.join(accepted)}"
        )
    return fn(**params)
