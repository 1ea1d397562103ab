"""Block-type registry: `role/impl` → Block class, built-ins loaded lazily, plugins via entry points."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

from worldgen.block import Block, BlockConfig
from worldgen.errors import UnknownBlockTypeError, WorldgenError, did_you_mean

ENTRY_POINT_GROUP = "worldgen.blocks"
_BUILTIN_MODULES = (
    "worldgen.nodes.diffusion",
    "worldgen.nodes.llm",
    "worldgen.nodes.vision",
    "worldgen.nodes.endpoint",
)
_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*/[a-z0-9][a-z0-9_.-]*$")

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
