"""The `worldgen` command: validate, show, list templates, run worlds, generate, train, serve, manage models.

    worldgen validate FILE                       check a graph or world config (no weights are loaded)
    worldgen check DIR [--repair]                list the damage in a world directory; rebuild what is derivable
    worldgen show FILE --format mermaid|dot|json [-o OUT]   a graph, pipeline, stage or world (file or directory)
    worldgen templates                           list the built-in templates
    worldgen run [WORLD] [--steps N] [--action TEXT] [--out DIR] [--address ADDR]
    worldgen generate [FILE] [--prompt TEXT] [--seed N] [--steps N] [--out DIR]
                 [--executor local|ray] [--address ADDR]
    worldgen train WORLD_DIR --out DIR [...]     LoRA adapters for a world (Ray Train); writes a custom world
    worldgen serve [CONFIG ...]                  Ray Serve config files
    worldgen models list [--address ADDR] [--json]  the model host actors alive on a running Ray cluster
    worldgen models unload [NAME ...] [--all] [--address ADDR]

FILE is a graph YAML/JSON file, a saved graph directory (holding graph.yaml), or `template:NAME` (built with
the tiny preset for `validate` and `show`); `show` also draws a world config file or a world directory. Every deliberate error (`WorldgenError`) and every
missing file ends as one paragraph on stderr, prefixed `worldgen: error: `, with exit code 2; `--debug`
re-raises it for a traceback. Heavy imports (torch, diffusers, ray) happen inside the commands only.

`models` only connects to a Ray cluster that is already running (`--address`, else RAY_ADDRESS, else the local
one `ray start` recorded); it never starts one, since a fresh cluster holds no model hosts.
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
    if _is_world(args.file):
        from worldgen.world import World

        world = World.check(args.file)
        what, summary = f"world '{world.settings.name}'", f"6 stages, {len(world.named_blocks())} blocks"
        problems = world.validate()
    else:
        engine = load_engine(args.file, preset="tiny")
        what, summary = f"{engine.level} '{engine.name}'", _counts(engine)
        problems = engine.validate()
    if not problems:
        print(f"ok: {what} ({summary})")
        return 0
    print(f"invalid: {what} has {len(problems)} problem(s):")
    for problem in problems:
        print(f"  - {problem}")
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    from worldgen.storage import WorldStorage

    storage = WorldStorage(args.directory)
    storage.load_config()  # no world here, or an unreadable world.yaml: an error (exit 2)
    if args.repair:
        repaired, damage = storage.repair()
        for item in repaired:
            print(f"repaired: {item}")
    else:
        damage = storage.check()
    if not damage:
        print(f"ok: {args.directory} ({len(storage.episodes())} episodes)")
        return 0
    print(f"damaged: {args.directory} has {len(damage)} problem(s):")
    for item in damage:
        how = "--repair rebuilds it" if item.repairable else "cannot be rebuilt: restore it from a backup"
        print(f"  - {item} ({how})")
    return 1


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from worldgen import render

    world_config = _world_config(args.file)
    if world_config is not None:  # built as `validate` does: no weights, no world directory touched
        from worldgen.world import World

        engine = World.check(world_config)
    else:
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


def cmd_generate(args: argparse.Namespace) -> int:
    from worldgen.images import save_png
    from worldgen.render import to_mermaid
    from worldgen.storage_io import atomic_write_text

    template_params: dict[str, Any] = {"preset": args.preset or "small", "steps": args.steps or 20}
    if args.height:
        template_params["height"] = args.height
    if args.width:
        template_params["width"] = args.width
    if args.address and args.executor == "local":
        raise _CliError("--address applies only with --executor ray")
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
    executor = args.executor or engine.executor
    if executor == "ray":
        import os

        from actors.cluster import connect, require_cluster

        target = args.address or os.environ.get("RAY_ADDRESS")
        if target and target not in ("auto", "local"):
            require_cluster(target)
        connect(args.address)
    elif args.address:
        raise _CliError("--address applies only with --executor ray")
    print(
        f"{PROG}: running {engine.level} '{engine.name}' ({_counts(engine)}), seed {args.seed}, "
        f"executor {executor}",
        file=sys.stderr,
    )
    outputs = engine.run(inputs, seed=args.seed, progress=True, executor=executor)

    spec_out = engine.output_spec()
    files = {name: kind for name in outputs if (kind := spec_out.get(name, {}).get("kind")) in _FILE_KINDS}
    written: list[Path] = []
    for name, kind in files.items():
        stem = (
            f"{engine.name}_seed{args.seed}" if len(files) == 1 else f"{engine.name}_{name}_seed{args.seed}"
        )
        if kind == "image":
            written += save_png(outputs[name], out_dir, stem)
        elif kind == "video":
            written += _write_videos(outputs[name], out_dir, stem, fps=args.fps, format=args.video_format)
        else:
            written += _write_sounds(
                outputs[name], out_dir, stem, outputs.get("sample_rate"), args.audio_format
            )
    diagram = atomic_write_text(out_dir / "graph.mmd", to_mermaid(engine))
    for name, value in outputs.items():
        if name not in files:
            print(f"{name}: {_summary(value)}", file=sys.stderr)
    print(f"{PROG}: diagram: {diagram}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


_FILE_KINDS = ("image", "video", "audio")  # the outputs `generate` writes as files (the others it summarises)


def _write_videos(video: Any, out_dir: Path, stem: str, *, fps: float, format: str) -> list[Path]:
    """Each clip of a (B, F, C, H, W) video as `<stem>.<format>` (`<stem>_<i>.<format>` for several) and its
    animated preview `<stem>.preview.webp`; the paths."""
    from worldgen.media import write_preview, write_video

    if getattr(video, "ndim", None) != 5:
        raise _CliError(
            f"a video output must be a (B, F, C, H, W) tensor; got {getattr(video, 'shape', video)!r}"
        )
    paths = []
    for i, clip in enumerate(video):
        name = stem if len(video) == 1 else f"{stem}_{i}"
        write_video(out_dir / f"{name}.{format}", clip, fps=fps)
        write_preview(out_dir / f"{name}.preview.webp", clip, fps=fps)
        paths += [out_dir / f"{name}.{format}", out_dir / f"{name}.preview.webp"]
    return paths


def _write_sounds(audio: Any, out_dir: Path, stem: str, sample_rate: Any, format: str) -> list[Path]:
    """Each sound of a (B, channels, samples) audio output as `<stem>.<format>` at the graph's `sample_rate`."""
    from worldgen.media import write_audio

    if sample_rate is None:
        raise _CliError("the graph gives audio but no `sample_rate` output: cannot write a sound file")
    if getattr(audio, "ndim", None) != 3:
        raise _CliError(
            f"an audio output must be a (B, channels, samples) tensor; got {getattr(audio, 'shape', audio)!r}"
        )
    paths = []
    for i, sound in enumerate(audio):
        path = out_dir / (f"{stem}.{format}" if len(audio) == 1 else f"{stem}_{i}.{format}")
        write_audio(path, sound, sample_rate=int(sample_rate))
        paths.append(path)
    return paths


def _fps(text: str) -> float:
    """--fps: more than 0 and at most MAX_FPS (checked before the graph runs)."""
    from worldgen.media import MAX_FPS

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_FPS:
        raise argparse.ArgumentTypeError(f"{text}: expected more than 0 and at most {MAX_FPS:g}")
    return value


def _world_config(spec: str) -> Path | None:
    """The world config `spec` names: a world config file, or a world directory's own; else None."""
    path = Path(spec)
    if path.is_dir():
        from worldgen.storage import WorldStorage

        storage = WorldStorage(path)
        return storage.config_path if storage.exists() else None
    return path if _is_world(spec) else None


def _is_world(spec: str) -> bool:
    path = Path(spec)
    if not path.is_file():
        return False
    from worldgen.config import load_config_file

    return load_config_file(path).get("kind") == "world"


DEFAULT_WORLD = Path(__file__).resolve().parents[1] / "configs" / "worlds" / "default.yaml"


def cmd_run_world(args: argparse.Namespace) -> int:
    import time

    from worldgen.stores import is_uri
    from worldgen.world import World

    if args.steps < 0:
        raise _CliError(f"--steps must be 0 or more, got {args.steps}")
    # a world to continue: a directory, or a store URI (s3://...) holding one
    stored = args.file if args.file and is_uri(args.file) else None
    spec = Path(args.file) if args.file and not stored else DEFAULT_WORLD
    if not stored and not spec.exists():
        raise _CliError(f"{spec}: no such file or directory")
    if args.address:
        return _run_world_remote(args, stored or spec)
    if stored:
        world = World.load(stored)
    elif spec.is_dir():
        world = World.load(spec)
    else:
        world = World.from_config(spec, directory=args.out)
    print(
        f"{PROG}: world '{world.settings.name}' in {world.storage.location} (step {world.progress.step} so far)",
        file=sys.stderr,
    )
    started = [time.perf_counter()]

    def show(role: str, outcome: str, step: int) -> None:
        took = time.perf_counter() - started[0]
        started[0] = time.perf_counter()
        mark = f"done in {took:.1f}s" if outcome == "ran" else "skipped"
        print(f"  step {step}: {role:<12} {mark}", file=sys.stderr)

    world.callbacks.append(show)
    for i in range(args.steps):
        report = world.step(action=args.action if i == 0 else None)
        saved = f", saved episode {report.episode}" if report.episode else ""
        print(f"{PROG}: step {report.step} ran {len(report.ran)} stage(s){saved}", file=sys.stderr)
    world.write_report()
    return _world_summary(world.storage.location)


def _run_world_remote(args: argparse.Namespace, spec: Path | str) -> int:
    from actors.cluster import connect_existing
    from actors.world_driver import RemoteWorld
    from worldgen.config import load_config_file

    connect_existing(None if args.address == "auto" else args.address)
    if isinstance(spec, str) or spec.is_dir():
        remote = RemoteWorld(spec)
    else:
        config = load_config_file(spec)
        directory = args.out or Path("worlds") / str(config.get("name", "world"))
        remote = RemoteWorld(directory, config)
    info = remote.info()
    print(
        f"{PROG}: world '{info['name']}' on its driver actor, directory {info['directory']}", file=sys.stderr
    )
    for i in range(args.steps):
        report = remote.step(action=args.action if i == 0 else None)
        saved = f", saved episode {report['episode']}" if report["episode"] else ""
        print(f"{PROG}: step {report['step']}: ran {', '.join(report['ran'])}{saved}", file=sys.stderr)
    remote.report()
    return _world_summary(info["directory"])


def _world_summary(location: str | Path) -> int:
    """Say how many episodes the world has and print where its report is (the path, or its URI on a store)."""
    from worldgen.storage import WorldStorage
    from worldgen.stores import child_uri

    storage = WorldStorage(location)
    episodes = storage.episodes()
    print(f"{PROG}: {len(episodes)} episode(s) in {location}", file=sys.stderr)
    if storage.uri:
        print(child_uri(storage.uri, storage.report_path.name))
    else:
        print(storage.report_path if storage.report_path.exists() else location)
    return 0


def _summary(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# ---- models (model host actors on a running Ray cluster) -----------------------------------------------------
_UNLOAD_WAIT_S = 10.0


def _hosts(gcs_address: str) -> list[dict[str, Any]]:
    from actors.cluster import first_line
    from actors.model_host import list_hosts

    try:
        return list_hosts(gcs_address)
    except Exception as err:  # the state API needs the cluster's dashboard (ray[default], include_dashboard)
        raise _CliError(
            f"cannot list the actors of the Ray cluster at {gcs_address}: {first_line(err)} (listing needs the "
            "cluster's dashboard, which `ray start --head` runs by default)"
        ) from None


def _short_class(path: str) -> str:
    return path.rpartition(":")[2] if path else "-"


def cmd_models_list(args: argparse.Namespace) -> int:
    import json

    from actors.cluster import NAMESPACE, connect_existing

    hosts = _hosts(connect_existing(args.address))
    if args.json:
        print(json.dumps(hosts, indent=2))
        return 0
    if not hosts:
        print(f"no model hosts are running (namespace '{NAMESPACE}')")
        return 0
    header = ("NAME", "CLASS", "IDENTITY", "PARAMETERS", "LOADS", "CALLS", "PID")
    rows = [
        (
            host["name"],
            _short_class(host.get("class", "")),
            host.get("identity", "-"),
            f"{host['parameters']:,}" if "parameters" in host else "-",
            str(host.get("loads", "-")),
            str(host.get("calls", "-")),
            str(host.get("pid") or "-"),
        )
        for host in hosts
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    numeric = {3, 4, 5, 6}
    for row in (header, *rows):
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    for host in hosts:
        if "error" in host:
            print(f"{PROG}: {host['name']} did not answer: {host['error']}", file=sys.stderr)
    return 0


def cmd_models_unload(args: argparse.Namespace) -> int:
    if args.all and args.names:
        raise _CliError("give host NAMEs or --all, not both")
    if not args.all and not args.names:
        raise _CliError("name the model hosts to unload (see `worldgen models list`) or pass --all")
    import time

    from actors.cluster import NAMESPACE, connect_existing
    from actors.model_host import PREFIX, unload_hosts

    gcs_address = connect_existing(args.address)
    existing = [host["name"] for host in _hosts(gcs_address)]
    if args.all:
        targets = existing
    else:
        targets = []
        for name in args.names:
            full = name if name in existing or name.startswith(PREFIX) else PREFIX + name
            if full not in existing:
                from worldgen.errors import did_you_mean

                listing = ", ".join(existing) if existing else "(none)"
                raise _CliError(
                    f"no model host named '{name}' in namespace '{NAMESPACE}'"
                    f"{did_you_mean(full, existing)}; running hosts: {listing}"
                )
            if full not in targets:
                targets.append(full)
    if not targets:
        print(f"no model hosts are running (namespace '{NAMESPACE}'); nothing to unload")
        return 0
    unloaded = unload_hosts(targets)
    deadline = time.monotonic() + _UNLOAD_WAIT_S  # `ray.kill` is asynchronous: return once they are gone
    while time.monotonic() < deadline and {h["name"] for h in _hosts(gcs_address)} & set(unloaded):
        time.sleep(0.2)
    for name in unloaded:
        print(f"unloaded {name}")
    gone = [name for name in targets if name not in unloaded]
    for name in gone:  # exited between the listing and the kill
        print(f"{PROG}: {name} was already gone", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train LoRA adapters for a world on its episodes with Ray Train; write a custom world."""
    from actors.cluster import connect
    from train_jobs.lora_world import train

    lora = {"rank": args.rank, "alpha": args.alpha if args.alpha is not None else 2.0 * args.rank}
    config = dict(
        world=args.world,
        out=args.out,
        episodes=args.episodes,
        roles=args.roles,
        lora=lora,
        workers=args.workers,
        use_gpu=args.gpu,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        held_out=args.held_out,
        seed=args.seed,
        storage=args.storage,
    )
    connect(args.address, new_local=True)  # inside `ray job submit`: that job's cluster (RAY_ADDRESS)
    state = train(config)
    print(f"before training: held-out loss {state['initial_held_out_loss']:.4f}")
    for entry in state["history"]:
        print(
            f"epoch {entry['epoch']}: step {entry['step']}, loss {entry['loss']:.4f}, "
            f"held-out loss {entry['held_out_loss']:.4f}"
        )
    print(f"custom world: {state['out']} (run it: worldgen run {state['out']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run Serve config files on a local Ray instance (blocks until Ctrl-C) or on a cluster (--address)."""
    import signal
    import time

    from serve_apps.deploy import deploy, load_serve_config

    configs = args.configs or [str(DEFAULT_WORLD.parents[1] / "serve" / "worlds.yaml")]
    http = [load_serve_config(path).http_options for path in configs][0]  # bad files fail before Ray starts
    import os

    from ray import serve

    from actors.cluster import connect

    cluster = args.address or os.environ.get("RAY_ADDRESS")
    connect(args.address, new_local=True)  # no cluster named: never join one `ray start` left running here
    deployed = deploy(configs, host=args.host, port=args.port)
    host = args.host or http.host
    base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{args.port or http.port}"
    for name, prefix in deployed:
        print(f"{name}: {base}{prefix.rstrip('/')}/  (OpenAPI docs: {base}{prefix.rstrip('/')}/docs)")
    if cluster:
        print("deployed on the cluster; `serve status` shows them, `serve shutdown` removes them")
        return 0
    print("serving until Ctrl-C (or SIGTERM)")
    # Both stop it the same way, whatever the launcher left: a background job in a script starts with SIGINT
    # ignored, and supervisors (systemd, containers) stop a server with SIGTERM.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _interrupt)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ---- parser and entry point ----------------------------------------------------------------------------------
def _version() -> str:
    from worldgen import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from worldgen.registry import executor_names

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
        "check",
        parents=[common],
        help="list the damage in a world directory (--repair rebuilds what is derivable)",
        description="Check a world directory: missing or unreadable episode files, gaps in the episode "
        "numbering, an index out of step with the episodes, missing artifacts, bad progress journal lines, "
        "a bad content.json. --repair rebuilds what the rest of the world determines (the episode index, "
        "episode.md files, the progress journal, the report) and deletes nothing. Exit 0 when no damage "
        "remains, 1 when some does, 2 when the directory holds no world.",
    )
    p.add_argument("directory", metavar="DIR", help="a world directory (holding world.yaml)")
    p.add_argument("--repair", action="store_true", help="rebuild what is derivable")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "show",
        parents=[common],
        help="draw a graph or a world as Mermaid, Graphviz DOT or JSON",
        description="Render a graph, pipeline or stage (templates are built with the tiny preset), or a world: "
        "its cycle of stages, each stage's graphs nested in it.",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="graph YAML/JSON file, saved graph directory, template:NAME, world config file or world directory",
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
        help="run a world for some steps (default: the offline default world)",
        description="Run a world: each step is one pass of the cycle Philosopher -> Author -> World update -> "
        "Development -> Architect -> Creator. Episodes and report.html go to the world directory (--out). A "
        "directory that already holds the world is continued where it stopped.",
    )
    p.add_argument(
        "file", metavar="WORLD", nargs="?", help="world YAML, or a world directory (or store URI) to continue"
    )
    p.add_argument("--steps", type=int, default=3, help="steps to run (default: 3)")
    p.add_argument("--action", help="the user's action, given to Development in the first step")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="world directory, or a store URI every node reaches (s3://bucket/worlds/x; default: worlds/<name>)",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="run on a Ray cluster through the world's driver actor (ray://…, HOST:PORT or auto)",
    )
    p.set_defaults(handler=cmd_run_world)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="run a graph and write its images (PNG), videos (MP4/WebM) and sounds (WAV/FLAC/OGG)",
        description="Run a graph and write its outputs into --out by kind: images as PNG, videos as MP4 (or "
        "WebM) with an animated WebP preview, sounds as WAV (or FLAC/OGG) at the graph's `sample_rate`; with "
        "the graph's Mermaid diagram (graph.mmd). Without FILE: the text_to_image template on the built-in "
        "'small' preset, 20 steps, 64x64.",
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
    p.add_argument("--fps", type=_fps, default=16.0, help="frames per second of written videos (default: 16)")
    p.add_argument(
        "--video-format", choices=("mp4", "webm"), default="mp4", help="MP4 (H.264, default) or WebM (VP9)"
    )
    p.add_argument(
        "--audio-format", choices=("wav", "flac", "ogg"), default="wav", help="sound files (default: wav)"
    )
    p.add_argument(
        "--executor",
        choices=executor_names(),  # the registry's: local, ray, and any an installed package declares
        help="local: in this process; ray: on Ray (nodes as tasks, models on host actors); default: the "
        "graph's own",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="with --executor ray: the Ray cluster to use (default: RAY_ADDRESS, else the one `ray start` "
        "started here, else a new local instance)",
    )
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="train LoRA adapters for a world on its episodes (Ray Train); writes a custom world",
        description="Freeze the world's weights, attach LoRA adapters to its eligible model blocks and train "
        "them across Ray Train workers on the world's own episodes. Running it again resumes from the latest "
        "checkpoint. The output directory is a custom world: `worldgen run OUT` runs it.",
    )
    p.add_argument("world", metavar="WORLD_DIR", help="the base world's directory (with episodes)")
    p.add_argument("--out", required=True, metavar="DIR", help="the custom world directory to write")
    p.add_argument("--episodes", metavar="DIR", help="train on these episodes instead of the world's own")
    p.add_argument("--roles", nargs="+", metavar="ROLE", help="roles to train (default: every trainable one)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over each worker's shard")
    p.add_argument("--batch-size", type=int, default=2, help="examples per worker per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--held-out", type=int, default=2, help="examples kept out for the held-out loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", metavar="DIR", help="Ray Train storage (default: OUT/training)")
    p.add_argument("--address", metavar="ADDR", help="a running Ray cluster (also: RAY_ADDRESS)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve worlds, graphs or local LLMs over HTTP (Ray Serve config files)",
        description="Run Serve config files (Ray Serve's format, as `serve deploy` takes them; see "
        "configs/serve/) on a new local Ray instance until Ctrl-C, or deploy them to a running cluster "
        "with --address.",
    )
    p.add_argument(
        "configs", metavar="CONFIG", nargs="*", help="Serve config files (default: configs/serve/worlds.yaml)"
    )
    p.add_argument("--host", help="HTTP host (default: the first file's http_options.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: the first file's http_options.port)")
    p.add_argument(
        "--address", metavar="ADDR", help="deploy to this running Ray cluster and return (also: RAY_ADDRESS)"
    )
    p.set_defaults(handler=cmd_serve)

    address_help = "the Ray cluster, HOST:PORT (default: RAY_ADDRESS, else the one `ray start` started here)"
    models = sub.add_parser(
        "models",
        parents=[common],
        help="list or unload the model host actors on a running Ray cluster",
        description="Model hosts are the long-lived Ray actors (one per model identity) that hold model weights "
        "for every run on a cluster. These commands connect to a running cluster; they never start one.",
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_sub.required = True
    p = models_sub.add_parser(
        "list",
        parents=[common],
        help="list the model hosts alive on the cluster",
        description="One row per model host: name, model class, identity, parameter count, loads, calls, pid.",
    )
    p.add_argument("--address", metavar="ADDR", help=address_help)
    p.add_argument("--json", action="store_true", help="print JSON (every field) instead of a table")
    p.set_defaults(handler=cmd_models_list)
    p = models_sub.add_parser(
        "unload",
        parents=[common],
        help="kill model hosts, freeing their memory",
        description="Kill the named model hosts (or all of them with --all); the next run that needs a model "
        "starts its host again.",
    )
    p.add_argument("names", metavar="NAME", nargs="*", help="host names as `worldgen models list` shows them")
    p.add_argument("--all", action="store_true", help="unload every model host in the namespace")
    p.add_argument("--address", metavar="ADDR", help=address_help)
    p.set_defaults(handler=cmd_models_unload)
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
