"""Errors worldgen raises on bad input: each one says what is wrong, where, and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorldgenError(Exception):
    """Base class of every error worldgen raises on purpose (the CLI prints these without a traceback)."""

    def __reduce__(self) -> tuple:
        # Errors cross processes (a Ray task's error, a world driver's answer to the gateway): rebuild them from
        # their message and attributes, not by calling __init__ again with the message, which fails for
        # subclasses whose __init__ takes other arguments (LimitExceeded(limit, message), ...).
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[WorldgenError], args: tuple, state: dict) -> WorldgenError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ConfigError(WorldgenError):
    """A config file or mapping is malformed; the message names the file and the YAML path."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file, self.path, self.detail = file, path, message
        where = ", ".join(p for p in (str(file) if file else None, f"at {path}" if path else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownBlockTypeError(ConfigError):
    """No block is registered under the requested `role/impl` type."""


class GraphError(WorldgenError):
    """A graph (or pipeline) is malformed: unknown node or port, kind mismatch, missing input, bad loop."""

    def __init__(self, message: str, problems: list | None = None):
        self.problems = problems or []
        super().__init__(message)


class ModelLoadError(WorldgenError):
    """A model reference could not be resolved to weights/configs."""


class ExecutionError(WorldgenError):
    """A node failed while a graph ran; the message names the node (and loop iteration)."""


class StepInFlightError(ExecutionError):
    """A world was asked for something its step in flight does not allow (a new state, or a new action once
    Development has run): finish that step with `step()` first. A conflict with the world's state, not a
    failure (the gateway answers 409)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_TAGS = frozenset({"image", "video", "audio"})  # the kinds of block 2's requests (worldgen.state)


def format_validation_error(err, prefix: str = "") -> str:
    """One line per pydantic error: 'prefix.field.sub: message (got value)'."""
    lines = []
    for e in err.errors():
        parts = list(e.get("loc", ()))
        # a tagged union's member is named in the location after the item's index (`generation.0.video.frames`):
        # the tag is the item's own `kind`, so the path a user wrote is `generation.0.frames`
        parts = [p for i, p in enumerate(parts) if not (i and isinstance(parts[i - 1], int) and p in _TAGS)]
        loc = ".".join(str(p) for p in parts)
        path = ".".join(p for p in (prefix, loc) if p) or "(root)"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        lines.append(f"{path}: {e['msg']}{got}")
    return "; ".join(lines)
