"""Registries: block types (`role/impl` → Block class), executors (name → run function) and templates (name →
builder); built-ins are loaded lazily by module name, plugins come from entry points. Registries sit below
what they hold: the levels ask them by name and never import the modules that register."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from worldgen.block import Block, BlockConfig
from worldgen.errors import ConfigError, GraphError, UnknownBlockTypeError, WorldgenError, did_you_mean

if TYPE_CHECKING:
    from worldgen.callbacks import RunOptions

ENTRY_POINT_GROUP = "worldgen.blocks"
_BUILTIN_MODULES = (
    "worldgen.nodes.text",
    "worldgen.nodes.diffusion",
    "worldgen.nodes.sd3",
    "worldgen.nodes.sdxl",
    "worldgen.nodes.llm",
    "worldgen.nodes.vision",
    "worldgen.nodes.endpoint",
    "worldgen.nodes.flux",
    "worldgen.nodes.upscale",
    "worldgen.nodes.inpaint",
    "worldgen.nodes.lora",
    "worldgen.nodes.controlnet",
    "worldgen.nodes.flux_controlnet",
    "worldgen.nodes.stable_audio",
    "worldgen.nodes.wan",
)
_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*/[a-z0-9][a-z0-9_.-]*$")
_EXECUTOR_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_blocks: dict[str, type[Block]] = {}
_loaded = False

B = TypeVar("B", bound=type[Block])


def register_block(cls: B) -> B:
    """Class decorator: make `cls.block_type` buildable from configs."""
    block_type = cls.block_type
    if not _TYPE_PATTERN.match(block_type or ""):
        raise WorldgenError(f"{cls.__qualname__}.block_type must look like 'role/impl', got {block_type!r}")
    existing = _blocks.get(block_type)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise WorldgenError(f"block type '{block_type}' is registered twice: {existing} and {cls}")
    _blocks[block_type] = cls
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    load_plugins()


def load_plugins() -> list[str]:
    """Import every installed plugin of the `worldgen.blocks` entry-point group; returns their names.

    An entry point names a module (importing it runs its `@register_block` decorators) or a Block class.
    """
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as err:  # a broken plugin must say which one it is
            raise WorldgenError(f"block plugin '{ep.name}' ({ep.value}) failed to load: {err}") from err
        if isinstance(loaded, type) and issubclass(loaded, Block) and loaded.block_type not in _blocks:
            register_block(loaded)
        names.append(ep.name)
    return names


def block_types() -> list[str]:
    _ensure_loaded()
    return sorted(_blocks)


def block_class(block_type: str) -> type[Block]:
    _ensure_loaded()
    try:
        return _blocks[block_type]
    except KeyError:
        hint = did_you_mean(block_type, _blocks)
        raise UnknownBlockTypeError(
            f"unknown block type '{block_type}'{hint}; registered types: {', '.join(sorted(_blocks))}"
        ) from None


def create_block(block_type: str, config: BlockConfig | Mapping[str, Any] | None = None) -> Block:
    """Build a block from its type and config (a mapping is validated against the type's `Config`)."""
    return block_class(block_type)(config)


# ---- executors ---------------------------------------------------------------------------------------
# An executor runs an engine: `run(engine, inputs, *, seed, iterations, callbacks, progress, fuse_loops)`
# returns its exposed outputs (see `Executor`). `local` is built in; other packages add theirs under the
# entry-point group below (worldgen's own `ray` lives in the Ray layer, actors/ray_executor.py). Names are
# known without importing an executor: the entry points list them, and one is loaded on first use.
EXECUTOR_GROUP = "worldgen.executors"
_BUILTIN_EXECUTORS = {"local": "worldgen.execution.local:run_local"}

_executors: dict[str, Executor] = {}
_declared: dict[str, EntryPoint] | None = None


class Executor(Protocol):
    """How an engine is run: returns the engine's exposed outputs for `inputs`."""

    def __call__(
        self, engine: Any, inputs: Mapping[str, Any] | None = None, options: RunOptions | None = None
    ) -> dict[str, Any]: ...


def register_executor(name: str, run: Executor) -> None:
    """Make `run` the executor called `name` (`Engine.run(executor=name)`, `executor: name` in configs)."""
    if not _EXECUTOR_NAME.match(name or ""):
        raise WorldgenError(f"executor name must be lowercase letters, digits and '_', got {name!r}")
    if not callable(run):
        raise WorldgenError(f"executor '{name}' must be callable, got {type(run).__name__}")
    _executors[name] = run


def executor_names() -> list[str]:
    """Every executor that can be named: built in, registered, or declared by an installed package."""
    return sorted(set(_BUILTIN_EXECUTORS) | set(_executors) | set(_declared_executors()))


def _declared_executors(refresh: bool = False) -> dict[str, EntryPoint]:
    """The entry points of the executor group, read once: scanning the installed packages takes ~20 ms, and
    every engine checks its executor's name when it is built. A name not found looks again (`refresh`)."""
    global _declared
    if _declared is None or refresh:
        _declared = {ep.name: ep for ep in entry_points(group=EXECUTOR_GROUP)}
    return _declared


def check_executor(name: str) -> str:
    """`name` when an executor has it (without loading the executor), else a GraphError with a suggestion."""
    if name in _BUILTIN_EXECUTORS or name in _executors or name in _declared_executors():
        return name
    if name in _declared_executors(refresh=True):  # installed since the first look (a plugin, a test)
        return name
    names = executor_names()
    raise GraphError(
        f"unknown executor {name!r}{did_you_mean(str(name), names)}; expected one of {names} (a package "
        f"declares one under the entry-point group '{EXECUTOR_GROUP}'; reinstall a package whose entry "
        "points changed)"
    )


def get_executor(name: str) -> Executor:
    """The executor called `name`, importing it on first use (a plugin that fails to load says which)."""
    if name in _executors:
        return _executors[name]
    check_executor(name)
    if name in _BUILTIN_EXECUTORS:
        module, _, attr = _BUILTIN_EXECUTORS[name].partition(":")
        run = getattr(importlib.import_module(module), attr)
    else:
        ep = _declared_executors()[name]
        try:
            run = ep.load()
        except Exception as err:  # a broken plugin must say which one it is
            raise WorldgenError(f"executor plugin '{name}' ({ep.value}) failed to load: {err}") from err
    register_executor(name, run)
    return run


# ---- templates ---------------------------------------------------------------------------------------
# Each template is registered with the kind of thing it builds, so a caller asking for a world can say which
# templates build one.
_TEMPLATES: dict[str, Callable[..., Any]] = {}
_TEMPLATE_KINDS: dict[str, str] = {}  # template name -> what it builds: "graph", "pipeline", "stage", "world"
_BUILTIN_TEMPLATE_MODULES = (
    "worldgen.templates.diffusion",
    "worldgen.templates.sdxl",
    "worldgen.templates.upscale",
    "worldgen.templates.controlnet",
    "worldgen.templates.worlds",
)
_templates_loaded = False


def register_template(name: str, kind: str = "graph") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a builder function available as `from_template(name, **params)`; `kind` says what it
    builds ("graph", "pipeline", "stage", or "world" for a function returning a world config)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TEMPLATES[name] = fn
        _TEMPLATE_KINDS[name] = kind
        return fn

    return register


def _ensure_templates() -> None:
    global _templates_loaded
    if not _templates_loaded:
        _templates_loaded = True
        for module in _BUILTIN_TEMPLATE_MODULES:
            importlib.import_module(module)


def _template(name: str) -> Callable[..., Any]:
    _ensure_templates()
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
    _ensure_templates()
    return {
        name: (inspect.getdoc(fn) or "").splitlines()[0]
        for name, fn in sorted(_TEMPLATES.items())
        if kind is None or _TEMPLATE_KINDS[name] == kind
    }


def built_kind(built: Any) -> str:
    """What a template built: an engine's level ("graph", "pipeline", "stage"), a config's `kind`, else its
    type's name."""
    if isinstance(built, Mapping):
        return str(built.get("kind") or "config without a kind")
    return str(getattr(built, "level", None) or type(built).__name__)


def build_template(name: str, **params: Any) -> Any:
    """What template `name` builds (a graph, a pipeline or a world config) from its keyword parameters."""
    fn = _template(name)
    accepted = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())  # it checks its options itself
    unknown = [] if takes_any else [p for p in params if p not in accepted]
    if unknown:
        raise ConfigError(
            f"template '{name}' has no parameter '{unknown[0]}'{did_you_mean(unknown[0], accepted)}; "
            f"its parameters are: {', '.join(accepted)}"
        )
    return fn(**params)


def build_world_template(name: str, **params: Any) -> dict[str, Any]:
    """The world config a world template builds; a template building anything else is a ConfigError naming
    what it builds and the world templates there are."""
    built = build_template(name, **params)
    kind = built_kind(built)
    if kind != "world":
        worlds = ", ".join(list_templates("world")) or "none"
        raise ConfigError(f"template '{name}' builds a {kind}, not a world; the world templates: {worlds}")
    return dict(built)
