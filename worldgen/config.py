"""Config files: YAML/JSON loading with precise errors, `${env:NAME}` secrets, `ref:` includes, schema_version."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from worldgen.errors import ConfigError
from worldgen.storage_io import atomic_write_text

SCHEMA_VERSION = 1
ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
# How a `ref:` name becomes a path: (name, directory of the file naming it) -> the file to read.
Locator = Callable[[str, Path], Path]


def load_config_file(path: str | Path, *, locate: Locator | None = None) -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping, its `ref:` includes resolved (by `locate`, default: relative
    to the file); syntax errors name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", file=str(path)) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"malformed YAML: {problem}", file=str(path), path=where) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed JSON: {err.msg}", file=str(path), path=f"line {err.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", file=str(path))
    return resolve_refs(data, base=path.parent, file=str(path), locate=locate)


def resolve_refs(
    data: Any, *, base: Path, file: str | None = None, path: str = "", locate: Locator | None = None
) -> Any:
    """Replace every `{ref: other.yaml}` (relative to `base`) with that file's content, recursively."""
    if isinstance(data, Mapping):
        if set(data) == {"ref"} and isinstance(data["ref"], str):
            if locate is not None:
                return load_config_file(locate(data["ref"], base), locate=locate)
            target = (base / data["ref"]).resolve()
            if not target.exists():
                raise ConfigError(
                    f"ref: file '{data['ref']}' does not exist (looked at {target})", file=file, path=path
                )
            return load_config_file(target)
        return {
            k: resolve_refs(v, base=base, file=file, path=f"{path}.{k}" if path else str(k), locate=locate)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [
            resolve_refs(v, base=base, file=file, path=f"{path}[{i}]", locate=locate)
            for i, v in enumerate(data)
        ]
    return data


def resolve_env(data: Any, *, file: str | None = None, path: str = "") -> Any:
    """Substitute `${env:NAME}` from the environment (at use time only: resolved values are never saved)."""
    if isinstance(data, str):

        def lookup(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"environment variable {name} is not set (needed by ${{env:{name}}})",
                    file=file,
                    path=path,
                )
            return os.environ[name]

        return ENV_REFERENCE.sub(lookup, data)
    if isinstance(data, Mapping):
        return {k: resolve_env(v, file=file, path=f"{path}.{k}" if path else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_env(v, file=file, path=f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def check_schema(data: Mapping[str, Any], kind: str, *, file: str | None = None) -> None:
    """Every config names its kind and schema version; newer versions than this package knows are refused."""
    found_kind = data.get("kind", kind)
    if found_kind != kind:
        raise ConfigError(f"expected a {kind} config, found kind '{found_kind}'", file=file, path="kind")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(
            f"schema_version must be a positive integer, got {version!r}", file=file, path="schema_version"
        )
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version {version} is newer than this worldgen supports ({SCHEMA_VERSION}); upgrade worldgen",
            file=file,
            path="schema_version",
        )


def dump_config(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write a config atomically as YAML (or JSON for a .json path)."""
    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=110)
    atomic_write_text(path, text)
    return path
