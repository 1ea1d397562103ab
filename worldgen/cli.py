"""The `worldgen` command: validate, show, list templates and run.

    worldgen validate FILE                       check a graph config or saved graph (no weights are loaded)
    worldgen show FILE --format mermaid|dot|json [-o OUT]
    worldgen templates                           list the built-in templates
    worldgen run [FILE] [--prompt TEXT] [--seed N] [--steps N] [--out DIR]

FILE is a graph YAML/JSON file, a saved graph directory (holding graph.yaml), or, for `show` and `run`,
`template:NAME` (built with the tiny preset for `show`). Every deliberate error (`WorldgenError`) and every
missing file ends as one paragraph on stderr, prefixed `worldgen: error: `, with exit code 2; `--debug`
re-raises it for a traceback. Heavy imports (torch, diffusers) happen inside the commands only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worldgen.errors import ConfigError, WorldgenError

PROG = "worldgen"
TEMPLATE_PREFIX = "template:"
DEFAULT_PROMPT = "a harbor at dawn"
DEFAULT_OUT = "outputs"

# level (a config's `kind`) -> "module:Class" able to build it with `from_config(path)` without loading weights
_LEVELS = {
    "graph": "worldgen.graph:Graph",
    "pipeline": "worldgen.pipeline:Pipeline",
    "stage": "worldgen.stage:Stage",
}
_GRAPH_FILE = "graph.yaml"


class _CliError(WorldgenError):
    """A bad command line (a file that does not exist, an unreadable --input): reported like any other error."""


# ---- loading -------------------------------------------------------------------------------------------------
def _engine_class(kind: str, file: str) -> Any:
    import importlib

    target = _LEVELS.get(kind)
    if target is None:
        raise ConfigError(
            f"this command cannot handle a '{kind}' config; expected one of: {', '.join(_LEVELS)}",
            file=file,
            path="kind",
        )
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(
            f"'{kind}' configs are not supported by this version of worldgen", file=file, path="kind"
        ) from None


def _config_path(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise _CliError(f"{spec}: no such file or directory")
    if path.is_dir():
        if not (path / _GRAPH_FILE).is_file():
            raise _CliError(f"{spec}: a directory but not a saved graph (it has no {_GRAPH_FILE})")
        return path / _GRAPH_FILE
    return path


def _template(name: str, **params: Any) -> Any:
    """`Graph.from_template(name, **params)`, passing only the parameters that the template accepts."""
    from worldgen.graph import Graph
    from worldgen.templates import template_params

    accepted = template_params(name)
    return Graph.from_template(name, **{k: v for k, v in params.items() if k in accepted})


def load_engine(spec: str, *, weights: bool = False, **template_params: Any) -> Any:
    """The engine named on the command line: a config file, a saved graph directory, or `template:NAME`.

    With `weights`, a saved graph directory is loaded with its checkpoint (`Graph.load`); otherwise only its
    config is read, so nothing heavy is loaded.
    """
    if spec.startswith(TEMPLATE_PREFIX):
        return _template(spec[len(TEMPLATE_PREFIX) :], **template_params)
    from worldgen.config import load_config_file

    path = _config_path(spec)
    kind = str(load_config_file(path).get("kind", "graph"))
    cls = _engine_class(kind, str(path))
    if weights and Path(spec).is_dir() and hasattr(cls, "load"):
        return cls.load(spec)
    return cls.from_config(path)


def _counts(engine: Any) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return ", ".join(
        [
            plural(len(engine.node_ids), "node"),
            plural(len(engine.edges), "edge"),
            plural(len(engine.loops()), "loop"),
        ]
    )


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    engine = load_engine(args.file, preset="tiny")
    problems = engine.validate()
    if not problems:
        print(f"ok: {engine.level} '{engine.name}' ({_counts(engine)})")
        return 0
    print(f"invalid: {engine.level} '{engine.name}' has {len(problems)} problem(s):")
    for problem in problems:
        print(f"  - {problem}")
    return 1


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from worldgen import render

    engine = load_engine(args.file, preset="tiny")
    if args.format == "mermaid":
        text = render.to_mermaid(engine)
    elif args.format == "dot":
        text = render.to_dot(engine)
    else:
        text = json.dumps(render.to_json(engine), indent=2, ensure_ascii=False) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        from worldgen.storage_io import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from worldgen.templates import list_templates

    listing = list_templates()
    width = max((len(name) for name in listing), default=0)
    for name, description in listing.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _parse_inputs(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise _CliError(f"--input expects NAME=VALUE, got {pair!r}")
        try:
            inputs[name] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            inputs[name] = text
    return inputs


def cmd_run(args: argparse.Namespace) -> int:
    from worldgen.images import save_png
    from worldgen.render import to_mermaid
    from worldgen.storage_io import atomic_write_text

    template_params: dict[str, Any] = {"preset": args.preset or "small", "steps": args.steps or 20}
    if args.height:
        template_params["height"] = args.height
    if args.width:
        template_params["width"] = args.width
    spec = args.file or f"{TEMPLATE_PREFIX}text_to_image"
    if args.preset and not spec.startswith(TEMPLATE_PREFIX):
        raise _CliError("--preset applies only to a template (no FILE, or FILE given as template:NAME)")
    engine = load_engine(spec, weights=True, **template_params)

    exposed = engine.exposed_inputs
    inputs = _parse_inputs(args.input)
    for name, value in (
        ("prompt", args.prompt),
        ("steps", args.steps),
        ("height", args.height),
        ("width", args.width),
    ):
        if value is not None:
            if name not in exposed:
                raise _CliError(
                    f"--{name} was given but {engine.level} '{engine.name}' has no input '{name}'; "
                    f"its inputs are: {', '.join(exposed) or '(none)'}"
                )
            inputs[name] = value
    if "prompt" in exposed and "prompt" not in inputs and not exposed["prompt"].optional:
        inputs["prompt"] = DEFAULT_PROMPT

    out_dir = Path(args.out)
    print(
        f"{PROG}: running {engine.level} '{engine.name}' ({_counts(engine)}), seed {args.seed}",
        file=sys.stderr,
    )
    outputs = engine.run(inputs, seed=args.seed, progress=True)

    spec_out = engine.output_spec()
    images = [name for name in outputs if spec_out.get(name, {}).get("kind") == "image"]
    written: list[Path] = []
    for name in images:
        stem = (
            f"{engine.name}_seed{args.seed}" if len(images) == 1 else f"{engine.name}_{name}_seed{args.seed}"
        )
        written += save_png(outputs[name], out_dir, stem)
    diagram = atomic_write_text(out_dir / "graph.mmd", to_mermaid(engine))
    for name, value in outputs.items():
        if name not in images:
            print(f"{name}: {_summary(value)}", file=sys.stderr)
    print(f"{PROG}: diagram: {diagram}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _summary(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# ---- parser and entry point ----------------------------------------------------------------------------------
def _version() -> str:
    from worldgen import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite `--debug` given before the subcommand.
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )

    parser = argparse.ArgumentParser(
        prog=PROG, description="Compose generative models into graphs, pipelines and worlds."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "validate",
        parents=[common],
        help="check a graph config or saved graph (no weights loaded)",
        description="Build the graph from its config (without loading weights) and report its problems. "
        "Exit 0 when valid, 1 when the graph has problems, 2 when the file cannot be read or built.",
    )
    p.add_argument(
        "file", metavar="FILE", help="graph YAML/JSON file, saved graph directory, or template:NAME"
    )
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser(
        "show",
        parents=[common],
        help="draw a graph as Mermaid, Graphviz DOT or JSON",
        description="Render a graph (templates are built with the tiny preset).",
    )
    p.add_argument(
        "file", metavar="FILE", help="graph YAML/JSON file, saved graph directory, or template:NAME"
    )
    p.add_argument(
        "-f", "--format", choices=("mermaid", "dot", "json"), default="mermaid", help="default: mermaid"
    )
    p.add_argument("-o", "--output", metavar="OUT", help="write to this file instead of stdout")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("templates", parents=[common], help="list the built-in templates")
    p.set_defaults(handler=cmd_templates)

    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a graph and write its image(s) as PNG",
        description="Run a graph and write its images as PNG into --out, with the graph's Mermaid diagram "
        "(graph.mmd). Without FILE: the text_to_image template on the built-in 'small' preset, 20 steps, 64x64.",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        help="graph YAML/JSON file, saved graph directory, or template:NAME",
    )
    p.add_argument("--prompt", help=f"text prompt (default when the graph needs one: {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--steps", type=int, help="denoising steps (default for the built-in graph: 20)")
    p.add_argument(
        "--preset", help="built-in model preset for a template: 'tiny' or 'small' (default: small)"
    )
    p.add_argument("--height", type=int, help="image height in pixels")
    p.add_argument("--width", type=int, help="image width in pixels")
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other graph input (YAML value)",
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default: {DEFAULT_OUT}/)"
    )
    p.set_defaults(handler=cmd_run)
    return parser


def _one_paragraph(message: str) -> str:
    return "\n".join(line.rstrip() for line in str(message).strip().splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `worldgen` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        return args.handler(args)
    except (WorldgenError, OSError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and not isinstance(err, WorldgenError):
            where = f"{err.filename}: " if err.filename else ""
            message = f"{where}{err.strerror or err}"
        else:
            message = str(err)
        print(f"{PROG}: error: {_one_paragraph(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
