"""Prompt templates: Jinja2 (sandboxed, strict about undefined variables), inline or `file:NAME.j2`.

A prompt in a config is either a template string (`"Describe {{ content.title }}"`) or a reference to a file,
`file:architect.j2`, looked up along the prompt search path: the directories given to `set_prompt_dirs`
(a world puts its own `prompts/` first, so it can override any prompt by name), then the repository's
`configs/prompts/`. Templates may come from world configs, so they render in a bounded sandbox
(worldgen/prompt_sandbox.py): what a template builds and renders is limited by `Limits.template_chars` and its
render time by `Limits.template_seconds`, both raising `LimitExceeded` naming the limit and the template.
Every other failure is a ConfigError naming the template.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SecurityError

from worldgen.errors import ConfigError
from worldgen.limits import LimitExceeded
from worldgen.prompt_sandbox import (
    BoundedEnvironment,
    OverLimit,
    render_bounded,
)

FILE_PREFIX = "file:"
DEFAULT_PROMPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"

_dirs: tuple[Path, ...] = ()
_dirs_lock = threading.Lock()


def set_prompt_dirs(dirs: Iterable[str | Path]) -> None:
    """Directories searched for `file:` prompts before the built-in `configs/prompts/` (first match wins)."""
    global _dirs
    with _dirs_lock:
        _dirs = tuple(Path(d).expanduser().resolve() for d in dirs)


def prompt_dirs() -> list[Path]:
    """The prompt search path: the directories set with `set_prompt_dirs`, then the built-in prompts."""
    with _dirs_lock:
        extra = list(_dirs)
    return [*extra, *([DEFAULT_PROMPT_DIR] if DEFAULT_PROMPT_DIR not in extra else [])]


def is_file_ref(template: str) -> bool:
    return template.startswith(FILE_PREFIX)


def describe(template: str) -> str:
    """How an error names a template: the file reference, or the start of an inline template."""
    if is_file_ref(template):
        return f"'{template}'"
    text = template.strip()
    first = text.splitlines()[0] if text else ""
    cut = len(first) > 60 or "\n" in text
    return f"'{first[:60]}{'…' if cut else ''}' (inline)"


@lru_cache(maxsize=16)
def _environment(search_path: tuple[Path, ...]) -> BoundedEnvironment:
    return BoundedEnvironment(
        loader=FileSystemLoader([str(p) for p in search_path]),
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def _missing_variable(message: str) -> str:
    """The name Jinja's UndefinedError message is about ("'x' is undefined", "… has no attribute 'y'")."""
    match = re.search(r"has no attribute '([^']+)'", message) or re.search(r"'([^']+)' is undefined", message)
    return match.group(1) if match else message


def render_prompt(
    template: str, context: Mapping[str, Any], *, dirs: Sequence[str | Path] | None = None
) -> str:
    """Render a prompt template (inline Jinja or `file:NAME.j2`) with `context`; the result is stripped.

    `dirs` replaces the search path set with `set_prompt_dirs` for this call (the built-in prompts stay
    last). Every failure is a ConfigError naming the template and the missing variable or file.
    """
    search = (
        tuple(Path(d).expanduser().resolve() for d in dirs) + (DEFAULT_PROMPT_DIR,)
        if dirs is not None
        else tuple(prompt_dirs())
    )
    env = _environment(search)
    name = describe(template)
    try:
        if is_file_ref(template):
            compiled = env.get_template(template[len(FILE_PREFIX) :].strip())
            name = f"'{template}' ({compiled.filename})"
        else:
            compiled = env.from_string(template)
        return render_bounded(compiled, dict(context)).strip()
    except OverLimit as err:
        raise LimitExceeded(err.limit, f"prompt template {name}: {err}") from None
    except jinja2.TemplateNotFound as err:
        looked = ", ".join(str(p) for p in search)
        own = is_file_ref(template) and err.name == template[len(FILE_PREFIX) :].strip()
        what = f"prompt template {name} was" if own else f"'{err.name}' (used by prompt template {name}) was"
        raise ConfigError(
            f"{what} not found in the prompt directories ({looked}); put the file in a world's prompts/ "
            "directory or use an inline template"
        ) from None
    except jinja2.UndefinedError as err:
        variable = _missing_variable(str(err))
        given = ", ".join(sorted(map(str, context))) or "none"
        raise ConfigError(
            f"prompt template {name} uses undefined variable '{variable}' ({err}); variables given: {given}"
        ) from None
    except jinja2.TemplateSyntaxError as err:
        where = f"{err.filename}, line {err.lineno}" if err.filename else f"line {err.lineno}"
        raise ConfigError(f"prompt template {name} has a syntax error at {where}: {err.message}") from None
    except SecurityError as err:
        raise ConfigError(f"prompt template {name} tried something the sandbox forbids: {err}") from None
    except jinja2.TemplateError as err:
        raise ConfigError(f"prompt template {name} failed: {err}") from None
    except Exception as err:  # e.g. a filter given None, a RecursionError: still the template's problem
        raise ConfigError(f"prompt template {name} failed: {type(err).__name__}: {err}") from None
