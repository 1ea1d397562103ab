"""What a config from the network may ask of the server that runs it.

A config file an operator runs with `worldgen run` or the Python API is trusted: its author owns the machine.
A config posted over HTTP (the world gateway's `POST /v1/worlds`) is not: it could otherwise make the server
send its own keys to any host, read files outside the world, or call addresses inside the cluster. Such a
config is *admitted* first (`admit_config`), against the server's `TrustPolicy`:

| in the config                         | over HTTP                                                             |
|---------------------------------------|-----------------------------------------------------------------------|
| `${env:NAME}`                         | only in a secret field (`api_key`) and only for a NAME on `env`        |
| `headers_env: NAME`                   | only for a NAME on `env`                                              |
| `{ref: file}`, `prompts:`, `base:`, `adapters:`, LoRA files (`lora:`, `adapter/lora`'s `path`) | a relative path (no `..`) to something under one of `roots` |
| `file:NAME.j2` prompts                | a relative name (no `..`), found in the world's admitted `prompts:` or the built-in prompt library |
| `base_url`, `endpoint`, `url`         | only URLs under a prefix on `urls` (a vendor's default URL is fine)   |
| a model block's `model`, a template's `model`, its ControlNets' and IP-Adapter's | a built-in `preset:`, or a source on `models` |

Admitting returns the *resolved* config: every `ref:` is inlined and every path made absolute, so the world
stored from it never reads another file on reload. A refusal is a `TrustError` (a ConfigError: 400 over HTTP)
naming the field and the rule; it never quotes a file, a resolved secret, or whether a refused path exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worldgen.config import ENV_REFERENCE, load_config_file
from worldgen.errors import ConfigError

PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECRET_FIELDS = frozenset({"api_key"})
URL_FIELDS = frozenset({"base_url", "endpoint", "url"})
PATH_KEYS = ("prompts", "base", "adapters")  # world-level keys naming a directory or file
_PRESET = "preset:"
_FILE = "file:"


class TrustError(ConfigError):
    """A config from the network asks for something the server's trust policy does not allow."""


class TrustPolicy(BaseModel):
    """What configs from the network may use (a server's `trust:` settings). Empty lists: nothing."""

    model_config = ConfigDict(extra="forbid")

    roots: list[str] = Field(
        default_factory=list,
        description="directories whose files `ref:`, `prompts:`, `base:` and `adapters:` may name (relative)",
    )
    project_configs: bool = Field(
        False, description="also allow the project's own configs/ directory as a root"
    )
    env: list[str] = Field(
        default_factory=list,
        description="environment variables a config may name in secret fields (api_key, headers_env)",
    )
    urls: list[str] = Field(
        default_factory=list,
        description="URL prefixes LLM base_urls and graph endpoints may point at, e.g. http://llm.internal:8000/v1",
    )
    models: list[str] = Field(
        default_factory=list,
        description="model sources (hub ids or directories) a config may load, besides the built-in presets",
    )

    @field_validator("env")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"not an environment variable name: {name!r}")
        return names

    @field_validator("urls")
    @classmethod
    def _prefixes(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise ValueError(f"not an http(s) URL prefix: {url!r}")
        return urls

    def root_dirs(self) -> list[Path]:
        dirs = [Path(r).expanduser().resolve() for r in self.roots]
        return dirs + ([PROJECT_CONFIGS] if self.project_configs else [])


def admit_config(config: Mapping[str, Any], policy: TrustPolicy) -> dict[str, Any]:
    """The config as the server will store and run it (refs inlined, paths absolute), or a TrustError."""
    if not isinstance(config, Mapping):
        raise TrustError(f"expected a config mapping, got {type(config).__name__}")
    return _Admission(policy).world(dict(config))


class _Admission:
    def __init__(self, policy: TrustPolicy):
        self.policy = policy
        self.roots = policy.root_dirs()
        self.prompt_dirs: list[Path] = []

    # ---- paths -----------------------------------------------------------------------------------------
    def locate(self, name: Any, *, where: str, what: str, base: Path | None = None) -> Path:
        """The file or directory a relative `name` means under the roots (or `base`, itself under one)."""
        if not isinstance(name, str) or not name.strip():
            raise TrustError(f"{what} must be a relative path, got {type(name).__name__}", path=where)
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or name.startswith("~") or ".." in pure.parts or "\0" in name or ":" in name:
            raise TrustError(
                f"{what} must be a relative path without '..' (absolute paths are refused over HTTP)",
                path=where,
            )
        if not self.roots:
            raise TrustError(
                f"{what}: this server lets configs sent over HTTP name no files (its trust policy has no roots)",
                path=where,
            )
        for start in [base] if base is not None else self.roots:
            candidate = (start / pure).resolve()  # symlinks resolved: a link out of the roots stays out
            if candidate.exists() and any(candidate.is_relative_to(root) for root in self.roots):
                return candidate
        # The same answer whether the path is missing or outside: no probing of the server's files.
        raise TrustError(f"{what} '{name}' is not found under the server's allowed roots", path=where)

    def ref(self, name: Any, *, where: str, base: Path | None) -> Any:
        target = self.locate(name, where=where, what="ref:", base=base)
        if not target.is_file():
            raise TrustError(f"ref: '{name}' is not a file under the server's allowed roots", path=where)
        data = load_config_file(target, locate=self._nested_locator(where))
        return self.value(data, where=where, base=target.parent)

    def _nested_locator(self, where: str):
        def locate(name: str, base: Path) -> Path:
            return self.locate(name, where=where, what="ref:", base=base)

        return locate

    # ---- the walk --------------------------------------------------------------------------------------
    def world(self, config: dict[str, Any]) -> dict[str, Any]:
        if "base" in config and "adapters" not in config:  # its default is relative to the server's cwd
            raise TrustError("a custom world sent over HTTP names its adapters folder", path="adapters")
        for key in PATH_KEYS:  # first, so `file:` prompts can be looked up in the world's own prompts
            if config.get(key) is not None:
                path = self.locate(config[key], where=key, what=f"{key}:")
                config[key] = str(path)
                if key == "prompts":
                    self.prompt_dirs.append(path)
        return {k: v if k in PATH_KEYS else self.value(v, where=str(k), base=None) for k, v in config.items()}

    def value(self, data: Any, *, where: str, base: Path | None, key: str = "") -> Any:
        if isinstance(data, Mapping):
            if set(data) == {"ref"}:
                return self.ref(data["ref"], where=where, base=base)
            self.node(data, where)
            out = {k: self.value(v, where=f"{where}.{k}", base=base, key=str(k)) for k, v in data.items()}
            return self.lora_files(out, where)
        if isinstance(data, list):
            return [self.value(v, where=f"{where}[{i}]", base=base, key=key) for i, v in enumerate(data)]
        if isinstance(data, str):
            self.string(data, where=where, key=key)
        return data

    def string(self, text: str, *, where: str, key: str) -> None:
        names = ENV_REFERENCE.findall(text)
        if names and key not in SECRET_FIELDS:
            raise TrustError(
                "${env:…} is allowed over HTTP only in secret fields "
                f"({', '.join(sorted(SECRET_FIELDS))}); put the value itself here",
                path=where,
            )
        for name in names:
            self.env_name(name, where=where)
        if key == "headers_env":
            self.env_name(text, where=where)
        if key in URL_FIELDS:
            self.url(text, where=where)
        if text.startswith(_FILE):
            self.prompt_file(text[len(_FILE) :].strip(), where=where)

    def env_name(self, name: str, *, where: str) -> None:
        if name not in self.policy.env:
            allowed = ", ".join(self.policy.env) or "none"
            raise TrustError(
                f"environment variable {name} is not one this server lets configs use (allowed: {allowed})",
                path=where,
            )

    def url(self, url: str, *, where: str) -> None:
        if not any(_under(url, prefix) for prefix in self.policy.urls):
            allowed = ", ".join(self.policy.urls) or "none"
            raise TrustError(
                f"URL {url!r} is not under a prefix this server allows (allowed: {allowed})", path=where
            )

    def prompt_file(self, name: str, *, where: str) -> None:
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise TrustError("a file: prompt must be a relative name without '..'", path=where)
        from worldgen.prompts import DEFAULT_PROMPT_DIR

        for directory in [*self.prompt_dirs, DEFAULT_PROMPT_DIR]:
            candidate = (directory / pure).resolve()
            if candidate.is_file() and candidate.is_relative_to(directory.resolve()):
                return
        raise TrustError(
            f"prompt 'file:{name}' is not in the world's prompts or the built-in prompt library", path=where
        )

    def node(self, data: Mapping[str, Any], where: str) -> None:
        """Model sources of model blocks (`{type, config: {model}}`) and templates (`{template, params}`)."""
        params = data.get("params")
        if isinstance(data.get("template"), str) and isinstance(params, Mapping):
            if "model" in params:
                self.model(params["model"], where=f"{where}.params.model")
            for field, source in _adapter_models(params):  # a ControlNet, an IP-Adapter, its image encoder
                self.model(source, where=f"{where}.params.{field}")
        block_type, config = data.get("type"), data.get("config")
        if isinstance(block_type, str) and isinstance(config, Mapping) and "model" in config:
            from worldgen.block import ModelBlock
            from worldgen.registry import block_class

            try:
                holds_model = issubclass(block_class(block_type), ModelBlock)
            except ConfigError:
                return  # an unknown type: building the world reports it
            if holds_model:
                source = config["model"]
                source = source.get("source") if isinstance(source, Mapping) else source
                self.model(source, where=f"{where}.config.model")

    def lora_files(self, data: dict[str, Any], where: str) -> dict[str, Any]:
        """LoRA files (a template's `lora:`, an `adapter/lora` node's `path`) are files like any other: relative
        to a root, made absolute. The node reads them on the server, so they pass the same rule as `ref:`."""
        params, config = data.get("params"), data.get("config")
        if (
            isinstance(data.get("template"), str)
            and isinstance(params, dict)
            and params.get("lora") is not None
        ):
            spec, field = params["lora"], f"{where}.params.lora"
            items = spec if isinstance(spec, list) else [spec]
            located = []
            for i, item in enumerate(items):
                at = f"{field}[{i}]" if isinstance(spec, list) else field
                if isinstance(item, dict) and "path" in item:
                    located.append({**item, "path": self.lora_path(item["path"], where=f"{at}.path")})
                else:
                    located.append(self.lora_path(item, where=at))
            params["lora"] = located if isinstance(spec, list) else located[0]
        if data.get("type") == "adapter/lora" and isinstance(config, dict) and "path" in config:
            config["path"] = self.lora_path(config["path"], where=f"{where}.config.path")
        return data

    def lora_path(self, name: Any, *, where: str) -> str:
        path = self.locate(name, where=where, what="a LoRA file")
        if not path.is_file():
            raise TrustError(
                f"a LoRA file '{name}' is not a file under the server's allowed roots", path=where
            )
        return str(path)

    def model(self, source: Any, *, where: str) -> None:
        if source is None or (isinstance(source, str) and source.startswith(_PRESET)):
            return
        if source not in self.policy.models:
            allowed = ", ".join(self.policy.models) or "none"
            raise TrustError(
                f"model source {source!r} is not one this server lets configs load (built-in presets and: "
                f"{allowed})",
                path=where,
            )


def _adapter_models(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(field, source) of the models a template's adapter options load: `controlnet:` (a mapping, a list, or
    {nets: [...]}) and `ip_adapter:` (a source or a mapping; an `image_encoder` given as a model reference)."""
    found: list[tuple[str, Any]] = []
    nets = params.get("controlnet")
    if isinstance(nets, Mapping) and isinstance(nets.get("nets"), list):
        nets = [(f"controlnet.nets.{i}", n) for i, n in enumerate(nets["nets"])]
    elif isinstance(nets, list):
        nets = [(f"controlnet.{i}", n) for i, n in enumerate(nets)]
    else:
        nets = [("controlnet", nets)] if nets is not None else []
    adapter = params.get("ip_adapter")
    adapter = [("ip_adapter", {"model": adapter} if isinstance(adapter, str) else adapter)] if adapter else []
    for field, spec in nets + adapter:
        if not isinstance(spec, Mapping):
            continue
        for key in ("model", "image_encoder"):
            source = spec.get(key)
            if key == "image_encoder" and not isinstance(source, Mapping):
                continue  # a folder inside the adapter's own model
            source = source.get("source") if isinstance(source, Mapping) else source
            if source is not None:
                found.append((f"{field}.{key}", source))
    return found


def _under(url: str, prefix: str) -> bool:
    """`url` has the scheme, host and port of `prefix` and its path starts at a segment boundary of it."""
    try:
        got, want = urlsplit(url), urlsplit(prefix)
        same_origin = (got.scheme, got.hostname, got.port) == (want.scheme, want.hostname, want.port)
    except ValueError:  # a malformed port or host
        return False
    path, base = got.path or "/", want.path.rstrip("/")
    return same_origin and not got.username and (path == base or path.startswith(base + "/") or not base)
