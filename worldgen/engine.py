"""The one engine behind graphs, pipelines and stages: nodes, edges, exposed ports, validation, config/save/load.

A node holds an *item*: anything with `input_ports()`, `output_ports()` and `__call__(**inputs) -> dict`
(a Block in a Graph, a Graph in a Pipeline). Edges join `node.port` to `node.port`. How the nodes run — loops,
feedback edges, the order — is the execution plan (worldgen/plan.py); `run` hands the engine to an executor
found by name (worldgen/registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldgen.callbacks import RunCallback, RunOptions
from worldgen.config import SCHEMA_VERSION, check_schema, dump_config, load_config_file
from worldgen.errors import ConfigError, GraphError, WorldgenError, did_you_mean
from worldgen.plan import Edge, ExecutionPlan, Loop, Problem, make_plan
from worldgen.ports import Port, PortKind, compatible
from worldgen.registry import build_template, check_executor, get_executor

if TYPE_CHECKING:
    from worldgen.block import Block

_MISSING = object()
_STRUCTURE = ("_items", "_edges", "_inputs", "_outputs")  # what a deferred engine loads


@dataclass
class ExposedInput:
    name: str
    targets: list[tuple[str, str]]
    default: Any = _MISSING

    @property
    def optional(self) -> bool:
        return self.default is not _MISSING


def parse_endpoint(text: str, what: str = "port") -> tuple[str, str]:
    """'node.port' -> ('node', 'port')."""
    node, sep, port = str(text).partition(".")
    if not sep or not node or not port:
        raise GraphError(f"expected '<node>.<{what}>', got {text!r}")
    return node, port


class Engine:
    """Nodes + edges + exposed ports, with validation, a cached execution plan, config and checkpoint I/O.

    Subclasses say what a node holds (`_items_config`/`_build_items`) and which blocks they contain
    (`named_blocks`); everything else — wiring, validation, loops, running, saving — is shared.
    """

    level = "graph"
    allow_cycles = True
    nodes_key = "nodes"  # the config key listing the nodes
    extra_config_keys: tuple[str, ...] = ()  # further top-level config keys a level understands

    def __init__(self, name: str, *, executor: str = "local", deferred: bool = False):
        """`deferred`: the nodes are known only later; `load_structure` adds them on first use."""
        self.name = name
        self.executor = check_executor(executor)
        self._plan: ExecutionPlan | None = None
        if not deferred:
            self._clear_structure()

    def _clear_structure(self) -> None:
        self._items: dict[str, Any] = {}
        self._edges: list[Edge] = []
        self._inputs: dict[str, ExposedInput] = {}
        self._outputs: dict[str, tuple[str, str]] = {}

    def load_structure(self) -> None:
        """Hook of an engine created with `deferred=True`: add its nodes, edges and exposed ports here (with
        `_add_item`, `add_edge`, `expose_input`, `expose_output`). Called once, when something first reads the
        structure, so that building an engine whose nodes come from elsewhere (a graph behind an HTTP
        endpoint) does not need that place up; an error here leaves the engine deferred (the next use
        tries again)."""
        raise GraphError(f"{self.level} '{self.name}' was created deferred but defines no load_structure()")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the structure of a deferred engine, before its first use.
        if name not in _STRUCTURE or "name" not in self.__dict__ or "_items" in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._clear_structure()
        try:
            self.load_structure()
        except BaseException:
            for slot in _STRUCTURE:
                self.__dict__.pop(slot, None)
            raise
        return self.__dict__[name]

    # ---- structure -------------------------------------------------------------------------------------
    @property
    def node_ids(self) -> list[str]:
        return list(self._items)

    @property
    def edges(self) -> tuple[Edge, ...]:
        return tuple(self._edges)

    def item(self, node_id: str) -> Any:
        try:
            return self._items[node_id]
        except KeyError:
            raise GraphError(
                f"{self.level} '{self.name}' has no node '{node_id}'{did_you_mean(node_id, self._items)}"
            ) from None

    def _edited(self) -> None:
        self._plan = None

    def _add_item(self, node_id: str, item: Any) -> None:
        if not node_id or "." in node_id:
            raise GraphError(f"node id must be non-empty and contain no '.', got {node_id!r}")
        if node_id in self._items:
            raise GraphError(f"{self.level} '{self.name}' already has a node '{node_id}'")
        self._items[node_id] = item
        self._edited()

    def remove_node(self, node_id: str) -> None:
        self.item(node_id)
        del self._items[node_id]
        self._edges = [e for e in self._edges if node_id not in (e.source, e.target)]
        for exposed in self._inputs.values():
            exposed.targets = [t for t in exposed.targets if t[0] != node_id]
        self._outputs = {k: v for k, v in self._outputs.items() if v[0] != node_id}
        self._edited()

    def _port(self, node_id: str, port: str, direction: str) -> Port:
        item = self.item(node_id)
        ports = item.input_ports() if direction == "input" else item.output_ports()
        if port not in ports:
            raise GraphError(
                f"node '{node_id}' has no {direction} port '{port}'{did_you_mean(port, ports)}; "
                f"its {direction}s are: {', '.join(ports) or '(none)'}"
            )
        return ports[port]

    def add_edge(self, source: str, target: str, *, feedback: bool = False) -> Edge:
        """Connect 'node.port' (an output) to 'node.port' (an input); kinds must be compatible."""
        src, src_port = parse_endpoint(source)
        dst, dst_port = parse_endpoint(target)
        out_port = self._port(src, src_port, "output")
        in_port = self._port(dst, dst_port, "input")
        if not compatible(out_port.kind, in_port.kind):
            raise GraphError(
                f"kind mismatch on edge {source} -> {target}: output is '{out_port.kind.value}', "
                f"input expects '{in_port.kind.value}'"
            )
        edge = Edge(src, src_port, dst, dst_port, feedback)
        if any(_edge_key(e)[:4] == _edge_key(edge)[:4] for e in self._edges):
            raise GraphError(f"edge {edge} already exists")
        self._edges.append(edge)
        self._edited()
        return edge

    def remove_edge(self, source: str, target: str) -> None:
        key = (*parse_endpoint(source), *parse_endpoint(target))
        before = len(self._edges)
        self._edges = [e for e in self._edges if _edge_key(e)[:4] != key]
        if len(self._edges) == before:
            raise GraphError(f"no edge {source} -> {target}")
        self._edited()

    def expose_input(self, name: str, target: str | Iterable[str], *, default: Any = _MISSING) -> None:
        """Make `name` an input of the whole graph feeding one or more 'node.port' inputs."""
        targets = [target] if isinstance(target, str) else list(target)
        resolved = []
        for t in targets:
            node, port = parse_endpoint(t)
            self._port(node, port, "input")
            resolved.append((node, port))
        if name in self._inputs:
            raise GraphError(f"{self.level} '{self.name}' already exposes an input '{name}'")
        self._inputs[name] = ExposedInput(name, resolved, default)
        self._edited()

    def feed_from_input(self, name: str, target: str) -> None:
        """Let the exposed input `name` feed one more 'node.port' input too (a node added to a built graph,
        e.g. by a template attachment, that takes a value the graph already exposes: the image size)."""
        if name not in self._inputs:
            raise GraphError(
                f"{self.level} '{self.name}' exposes no input '{name}'{did_you_mean(name, self._inputs)}"
            )
        node, port = parse_endpoint(target)
        self._port(node, port, "input")
        self._inputs[name].targets.append((node, port))
        self._edited()

    def expose_output(self, name: str, source: str) -> None:
        node, port = parse_endpoint(source)
        self._port(node, port, "output")
        if name in self._outputs:
            raise GraphError(f"{self.level} '{self.name}' already exposes an output '{name}'")
        self._outputs[name] = (node, port)
        self._edited()

    @property
    def exposed_inputs(self) -> dict[str, ExposedInput]:
        return dict(self._inputs)

    @property
    def exposed_outputs(self) -> dict[str, tuple[str, str]]:
        return dict(self._outputs)

    # ---- specs (also what makes an engine usable as a node of a higher level) ---------------------------
    def input_ports(self) -> dict[str, Port]:
        ports = {}
        for name, exposed in self._inputs.items():
            kinds = {self._port(n, p, "input").kind for n, p in exposed.targets}
            kind = kinds.pop() if len(kinds) == 1 else PortKind.ANY
            optional = exposed.optional or all(self._port(n, p, "input").optional for n, p in exposed.targets)
            default = exposed.default if exposed.optional else None
            ports[name] = Port(name, kind, optional=optional, default=default)
        return ports

    def output_ports(self) -> dict[str, Port]:
        return {name: Port(name, self._port(n, p, "output").kind) for name, (n, p) in self._outputs.items()}

    def input_spec(self) -> dict[str, dict[str, Any]]:
        return {name: port.spec() for name, port in self.input_ports().items()}

    def output_spec(self) -> dict[str, dict[str, Any]]:
        return {name: port.spec() for name, port in self.output_ports().items()}

    # ---- analysis --------------------------------------------------------------------------------------
    def plan(self) -> ExecutionPlan:
        """The execution plan (cached until the next edit). Raises GraphError on an unbreakable cycle."""
        if self._plan is None:
            plan, problems = self._make_plan()
            if problems:
                raise GraphError(self._problem_text(problems), problems)
            self._plan = plan
        return self._plan

    def loops(self) -> list[Loop]:
        return self._make_plan()[0].loops

    def validate(self, strict: bool = False) -> list[Problem]:
        """Every problem found (unknown ports, kind mismatches, unfed inputs, ambiguous fan-in, bad loops)."""
        plan, loop_problems = self._make_plan()
        problems = self._check_structure(plan) + loop_problems
        for node_id, item in self._items.items():  # graphs inside a pipeline, pipelines inside a stage
            if isinstance(item, Engine):
                problems += [Problem(f"{node_id}/{p.where}", p.message) for p in item.validate()]
        if strict and problems:
            raise GraphError(self._problem_text(problems), problems)
        return problems

    def _problem_text(self, problems: list[Problem]) -> str:
        lines = "\n".join(f"  - {p}" for p in problems)
        return f"{self.level} '{self.name}' is invalid ({len(problems)} problem(s)):\n{lines}"

    def _check_structure(self, plan: ExecutionPlan) -> list[Problem]:
        problems: list[Problem] = []
        for edge in self._edges:
            try:
                out_port = self._port(edge.source, edge.source_port, "output")
                in_port = self._port(edge.target, edge.target_port, "input")
            except GraphError as err:
                problems.append(Problem(f"edge {edge}", str(err)))
                continue
            if not compatible(out_port.kind, in_port.kind):
                problems.append(
                    Problem(
                        f"edge {edge}",
                        f"kind mismatch: '{out_port.kind.value}' output into '{in_port.kind.value}' input",
                    )
                )
        for name, exposed in self._inputs.items():
            for node, port in exposed.targets:
                try:
                    self._port(node, port, "input")
                except GraphError as err:
                    problems.append(Problem(f"input '{name}'", str(err)))
        for name, (node, port) in self._outputs.items():
            try:
                self._port(node, port, "output")
            except GraphError as err:
                problems.append(Problem(f"output '{name}'", str(err)))
        if problems:
            return problems
        feedback = {e for loop in plan.loops for e in loop.feedback}
        for node_id, item in self._items.items():
            for port_name, port in item.input_ports().items():
                edges = plan.incoming.get((node_id, port_name), [])
                outside = [e for e in edges if e not in feedback]
                sources = len(outside) + len(plan.exposed.get((node_id, port_name), []))
                where = f"{node_id}.{port_name}"
                if sources > 1 and port.aggregate is None:
                    problems.append(
                        Problem(
                            where,
                            f"{sources} sources feed this input but it has no aggregation policy; "
                            "keep one edge or use a port that aggregates",
                        )
                    )
                if sources == 0 and not port.optional and port.kind is not PortKind.RNG:
                    fed_back = " (only a feedback edge, no value at iteration 0)" if edges else ""
                    problems.append(
                        Problem(
                            where,
                            f"required input has no source{fed_back}: add an edge into it or expose it "
                            f"as a {self.level} input",
                        )
                    )
        return problems

    def _make_plan(self) -> tuple[ExecutionPlan, list[Problem]]:
        return make_plan(
            self._items,
            self._edges,
            {name: ex.targets for name, ex in self._inputs.items()},
            allow_cycles=self.allow_cycles,
            level=self.level,
        )

    # ---- running ---------------------------------------------------------------------------------------
    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        executor: str | None = None,
        iterations: int | None = None,
        callbacks: Iterable[RunCallback] = (),
        progress: bool = False,
        fuse_loops: bool = True,
    ) -> dict[str, Any]:
        """Run on the exposed inputs and return the exposed outputs.

        `seed` seeds every random draw (same seed → same result on either executor); `iterations` overrides
        loop counts; `executor` names a registered executor (worldgen.registry): "local" (in-process) or "ray"
        (nodes as Ray tasks, models on host actors; `fuse_loops` runs a loop whose models share one actor as a
        single call there). Default: the config's. `progress` shows a bar per loop.
        """
        options = RunOptions(seed, iterations, tuple(callbacks), progress, fuse_loops)
        return get_executor(executor or self.executor)(self, inputs, options)

    def named_blocks(self) -> list[tuple[str, Block]]:
        """Every block with its qualified node id ('node' in a graph, 'graph.node' in a pipeline, …)."""
        raise NotImplementedError

    # ---- config ----------------------------------------------------------------------------------------
    def _items_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _build_items(self, items: Mapping[str, Any], fail) -> None:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready, no weights, no secrets) that `from_config` turns back into this."""
        inputs: dict[str, Any] = {}
        for name, ex in self._inputs.items():
            targets = [f"{n}.{p}" for n, p in ex.targets]
            target: Any = targets[0] if len(targets) == 1 else targets
            inputs[name] = {"to": target, "default": ex.default} if ex.optional else target
        config: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": self.level, "name": self.name}
        if self.executor != "local":
            config["executor"] = self.executor
        return config | {
            self.nodes_key: self._items_config(),
            "edges": [
                {"from": f"{e.source}.{e.source_port}", "to": f"{e.target}.{e.target_port}", "feedback": True}
                if e.feedback
                else str(e)
                for e in self._edges
            ],
            "inputs": inputs,
            "outputs": {name: f"{n}.{p}" for name, (n, p) in self._outputs.items()},
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path):
        """Build from a config mapping or a YAML/JSON file; every error names the file and YAML path."""
        file = None
        if isinstance(config, (str, Path)):
            file = str(config)
            config = load_config_file(config)
        check_schema(config, cls.level, file=file)

        def fail(path: str, message: str) -> ConfigError:
            return ConfigError(message, file=file, path=path)

        known = {"schema_version", "kind", "name", "executor", cls.nodes_key, "edges", "inputs", "outputs"}
        known |= set(cls.extra_config_keys)
        for key in config:
            if key not in known:
                raise fail(str(key), f"unknown key; expected one of {sorted(known)}")
        engine = cls._new_from_config(config, fail)
        items = config.get(cls.nodes_key) or {}
        if not isinstance(items, Mapping):
            raise fail(cls.nodes_key, "expected a mapping of id -> definition")
        try:
            engine._build_items(items, fail)
            engine._load_wiring(config, fail)
        except ConfigError:
            raise
        except WorldgenError as err:
            raise ConfigError(str(err), file=file) from None
        return engine

    @classmethod
    def _new_from_config(cls, config: Mapping[str, Any], fail):
        """The empty engine a config describes (subclasses read their own extra keys here)."""
        try:
            return cls(str(config.get("name", cls.level)), executor=config.get("executor", "local"))
        except GraphError as err:
            raise fail("executor", str(err)) from None

    def _load_wiring(self, config: Mapping[str, Any], fail) -> None:
        for i, edge in enumerate(config.get("edges") or []):
            try:
                if isinstance(edge, str):
                    source, arrow, target = edge.partition("->")
                    if not arrow:
                        raise GraphError(f"expected 'node.port -> node.port', got {edge!r}")
                    self.add_edge(source.strip(), target.strip())
                elif isinstance(edge, Mapping) and {"from", "to"} <= set(edge):
                    self.add_edge(edge["from"], edge["to"], feedback=bool(edge.get("feedback", False)))
                else:
                    raise GraphError(f"expected 'node.port -> node.port' or {{from, to}}, got {edge!r}")
            except GraphError as err:
                raise fail(f"edges[{i}]", str(err)) from None
        for name, spec in (config.get("inputs") or {}).items():
            try:
                if isinstance(spec, Mapping):
                    if "to" not in spec:
                        raise GraphError("expected {to: node.port, default: value}")
                    self.expose_input(name, spec["to"], default=spec.get("default", _MISSING))
                else:
                    self.expose_input(name, spec)
            except GraphError as err:
                raise fail(f"inputs.{name}", str(err)) from None
        for name, spec in (config.get("outputs") or {}).items():
            try:
                self.expose_output(name, spec)
            except GraphError as err:
                raise fail(f"outputs.{name}", str(err)) from None

    @classmethod
    def from_template(cls, name: str, **params: Any):
        """One of this level from a registered template (`worldgen templates` lists them)."""
        built = build_template(name, **params)
        if not isinstance(built, cls):
            raise GraphError(f"template '{name}' builds a {type(built).__name__}, not a {cls.__name__}")
        return built

    # ---- save / load -----------------------------------------------------------------------------------
    @classmethod
    def config_file(cls) -> str:
        return f"{cls.level}.yaml"

    def save(self, directory: str | Path) -> Path:
        """Write the config, one safetensors checkpoint and the model architectures (`assets/`) to a folder."""
        from worldgen.checkpoint import save_weights

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dump_config(self.to_config(), directory / self.config_file())
        save_weights(self.named_blocks(), directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path):
        """Rebuild what `save` wrote: no network needed, weights from its checkpoint."""
        from worldgen.checkpoint import load_weights

        directory = Path(directory)
        if not (directory / cls.config_file()).exists():
            raise ConfigError(f"not a saved {cls.level}: no {cls.config_file()} in it", file=str(directory))
        engine = cls.from_config(directory / cls.config_file())
        load_weights(engine.named_blocks(), directory)
        return engine


def _edge_key(edge: Edge) -> tuple[str, str, str, str, bool]:
    return (edge.source, edge.source_port, edge.target, edge.target_port, edge.feedback)
