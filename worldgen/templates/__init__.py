"""Templates: named builders of graphs, pipelines and worlds (a world template returns a world config), with
keyword parameters. Each is registered with the kind of thing it builds, so a caller asking for a world can say
which templates build one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from worldgen.errors import ConfigError, did_you_mean

_TEMPLATES: dict[str, Callable[..., Any]] = {}
_KINDS: dict[str, str] = {}  # template name -> what it builds: "graph", "pipeline", "stage" or "world"
_BUILTIN_MODULES = ("worldgen.templates.diffusion", "worldgen.templates.worlds")
_loaded = False


def register_template(name: str, kind: str = "graph") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a builder function available as `from_template(name, **params)`; `kind` says what it
    builds ("graph", "pipeline", "stage", or "world" for a function returning a world config)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TEMPLATES[name] = fn
        _KINDS[name] = kind
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


def list_templates(kind: str | None = None) -> dict[str, str]:
    """Template name -> first line of its description (only the templates building a `kind`, if given)."""
    _ensure_loaded()
    return {
        name: (inspect.getdoc(fn) or "").splitlines()[0]
        for name, fn in sorted(_TEMPLATES.items())
        if kind is None or _KINDS[name] == kind
    }


def built_kind(built: Any) -> str:
    """What a template built: an engine's level ("graph", "pipeline", "stage"), a config's `kind`, else its
    type's name."""
    if isinstance(built, Mapping):
        return str(built.get("kind") or "config without a kind")
    return str(getattr(built, "level", None) or type(built).__name__)


def build_world_template(name: str, **params: Any) -> dict[str, Any]:
    """The world config a world template builds; a template building anything else is a ConfigError naming
    what it builds and the world templates there are."""
    built = build_template(name, **params)
    kind = built_kind(built)
    if kind != "world":
        worlds = ", ".join(list_templates("world")) or "none"
        raise ConfigError(f"template '{name}' builds a {kind}, not a world; the world templates: {worlds}")
    return dict(built)


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
