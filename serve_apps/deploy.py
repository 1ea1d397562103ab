"""Serve config files (Ray Serve's own format, as `serve deploy` takes them) run on a local Ray instance.

    worldgen serve configs/serve/worlds.yaml [configs/serve/llm.yaml ...] [--host 127.0.0.1 --port 8000]

Each application's `import_path` names either a builder (`module:app_builder`, called with the application's
`args`) or a bound application (`module:app`). A file is checked against Serve's schema first, and a bad one
gets an error naming the file and the field.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worldgen.config import load_config_file
from worldgen.errors import ConfigError, format_validation_error


def load_serve_config(path: str | Path) -> Any:
    """The file as Serve's `ServeDeploySchema`; ConfigError naming the file and field when it is not one."""
    from ray.serve.schema import ServeDeploySchema

    raw = load_config_file(path)
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"not a Serve config: {format_validation_error(err)}", file=str(path)) from None


def build_application(import_path: str, args: Mapping[str, Any] | None = None, *, file: str = "") -> Any:
    """The `serve.Application` that `import_path` names (a builder is called with `args`)."""
    from ray.serve import Application

    module_name, _, attribute = import_path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {import_path!r}: {err}", file=file, path="import_path") from None
    if isinstance(target, Application):
        if args:
            raise ConfigError(f"{import_path!r} is a bound application: it takes no args", file=file)
        return target
    if not callable(target):
        raise ConfigError(f"{import_path!r} is neither an application nor a builder", file=file)
    try:
        app = target(dict(args or {}))
    except (ValueError, TypeError, ConfigError) as err:
        raise ConfigError(f"{import_path}: {err}", file=file, path="args") from None
    if not isinstance(app, Application):
        raise ConfigError(
            f"builder {import_path!r} returned {type(app).__name__}, not an Application", file=file
        )
    return app


def deploy(
    paths: list[str | Path], *, host: str | None = None, port: int | None = None
) -> list[tuple[str, str]]:
    """Start Serve (HTTP on `host`:`port`, else the first file's `http_options`) and run every application of
    the files; returns (application name, route prefix) pairs. Ray must be initialised."""
    from ray import serve

    configs = [(str(p), load_serve_config(p)) for p in paths]
    options = configs[0][1].http_options
    serve.start(http_options={"host": host or options.host, "port": port or options.port})
    deployed = []
    for file, config in configs:
        for application in config.applications:
            app = build_application(application.import_path, application.args, file=file)
            prefix = application.route_prefix or "/"
            serve.run(app, name=application.name, route_prefix=prefix, blocking=False)
            deployed.append((application.name, prefix))
    return deployed
