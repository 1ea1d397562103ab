"""The one engine behind graphs, pipelines and stages: nodes, edges, exposed ports, validation, loops, plan.

A node holds an *item*: anything with `input_ports()`, `output_ports()` and `__call__(**inputs) -> dict`
(a Block in a Graph, a Graph in a Pipeline). Edges join `node.port` to `node.port`. Strongly connected
components are loops; inside a loop, a *feedback* edge carries a value from one iteration to the next, and at
iteration 0 its target port takes the value entering the loop from outside (or the port's default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldgen.config import SCHEMA_VERSION, check_schema, dump_config, load_config_file
from worldgen.errors import ConfigError, GraphError, WorldgenError, did_you_mean
from worldgen.ports import AGGREGATORS, Port, PortKind, compatible

if TYPE_CHECKING:
    from worldgen.block import Block
    from worldgen.execution.callbacks import RunCallback

EXECUTORS = ("local", "ray")

_MISSING = object()


@dataclass(frozen=True)
class Edge:
    source: str
    source_port: str
    target: str
    target_port: str
    feedback: bool = False  # declared feedback; loops also infer feedback edges (see `Loop`)

    def __str__(self) -> str:
        return f"{self.source}.{self.source_port} -> {self.target}.{self.target_port}"


@dataclass
class ExposedInput:
    name: str
    targets: list[tuple[str, str]]
    default: Any = _MISSING

    @property
    def optional(self) -> bool:
        return self.default is not _MISSING


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Loop:
    """A strongly connected component: `order` is the per-iteration node order, `feedback` its feedback edges."""

    nodes: list[str]
    feedback: set[Edge] = field(default_factory=set)
    order: list[str] = field(default_factory=list)


@dataclass
class Step:
    """One unit of the execution plan: a single node, or a loop run for several iterations."""

    nodes: list[str]
    loop: Loop | None = None


@dataclass
class ExecutionPlan:
    steps: list[Step]
    incoming: dict[tuple[str, str], list[Edge]]
    exposed: dict[tuple[str, str], list[str]]  # (node, port) -> names of exposed inputs feeding it

    @property
    def loops(self) -> list[Loop]:
        return [s.loop for s in self.steps if s.loop is not None]


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

    def __init__(self, name: str, *, executor: str = "local"):
        self.name = name
        self.executor = _check_executor(executor)
        self._items: dict[str, Any] = {}
        self._edges: list[Edge] = []
        self._inputs: dict[str, ExposedInput] = {}
        self._outputs: dict[str, tuple[str, str]] = {}
        self._plan: ExecutionPlan | None = None

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
            plan, problems = self._analyse()
            if problems:
                raise GraphError(self._problem_text(problems), problems)
            self._plan = plan
        return self._plan

    def loops(self) -> list[Loop]:
        return self._analyse()[0].loops

    def validate(self, strict: bool = False) -> list[Problem]:
        """Every problem found (unknown ports, kind mismatches, unfed inputs, ambiguous fan-in, bad loops)."""
        plan, loop_problems = self._analyse()
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
        loop counts; `executor` is "local" (in-process) or "ray" (nodes as Ray tasks, models on host actors;
        `fuse_loops` runs a loop whose models share one actor as a single call there). Default: the config's.
        """
        from worldgen.execution import ProgressBar

        callbacks = [*callbacks, *([ProgressBar(self.name)] if progress else [])]
        kind = _check_executor(executor or self.executor)
        if kind == "ray":
            from worldgen.execution.ray import run_ray

            return run_ray(
                self, inputs, seed=seed, iterations=iterations, callbacks=callbacks, fuse_loops=fuse_loops
            )
        from worldgen.execution import run_local

        return run_local(self, inputs, seed=seed, iterations=iterations, callbacks=callbacks)

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
        from worldgen.templates import build_template

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

    def _analyse(self) -> tuple[ExecutionPlan, list[Problem]]:
        incoming: dict[tuple[str, str], list[Edge]] = {}
        for edge in self._edges:
            incoming.setdefault((edge.target, edge.target_port), []).append(edge)
        exposed: dict[tuple[str, str], list[str]] = {}
        for name, ex in self._inputs.items():
            for target in ex.targets:
                exposed.setdefault(target, []).append(name)

        problems: list[Problem] = []
        steps: list[Step] = []
        for component in _components_in_order(list(self._items), self._edges):
            members = set(component)
            inner = [e for e in self._edges if e.source in members and e.target in members]
            if not inner:
                steps.append(Step(component))
                continue
            if not self.allow_cycles:
                problems.append(
                    Problem(
                        "cycle " + " -> ".join(component + component[:1]),
                        f"a {self.level} must be acyclic; remove one of: {', '.join(map(str, inner))}",
                    )
                )
                steps.append(Step(component))
                continue
            feedback = {
                e
                for e in inner
                if e.feedback
                or e.source == e.target
                or any(o.source not in members for o in incoming[(e.target, e.target_port)] if o is not e)
                or (e.target, e.target_port) in exposed
            }
            order = _topological(component, [e for e in inner if e not in feedback])
            loop = Loop(component, feedback, order or component)
            if order is None:
                problems.append(
                    Problem(
                        "loop " + ", ".join(component),
                        "this cycle has no feedback edge: feed the loop's first node an initial value from "
                        "outside the loop (that makes the closing edge a feedback edge) or add the closing "
                        "edge with feedback=True",
                    )
                )
            steps.append(Step(loop.order, loop))
        return ExecutionPlan(steps, incoming, exposed), problems


def _check_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise GraphError(
            f"unknown executor {executor!r}{did_you_mean(str(executor), EXECUTORS)}; expected one of {EXECUTORS}"
        )
    return executor


def _edge_key(edge: Edge) -> tuple[str, str, str, str, bool]:
    return (edge.source, edge.source_port, edge.target, edge.target_port, edge.feedback)


def _components_in_order(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components (Tarjan), in a topological order of the condensation.

    Ties are broken by node insertion order so plans are stable and readable.
    """
    position = {n: i for i, n in enumerate(nodes)}
    successors: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        if e.target not in successors[e.source]:
            successors[e.source].append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    # Iterative Tarjan: graphs of a few hundred nodes must not hit recursion limits.
    def visit(root: str) -> None:
        work = [(root, iter(successors[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component, key=position.__getitem__))

    for n in nodes:
        if n not in index:
            visit(n)
    # Order components topologically (Kahn), preferring the earliest-inserted node among ready ones.
    owner = {n: i for i, comp in enumerate(components) for n in comp}
    deps: dict[int, set[int]] = {i: set() for i in range(len(components))}
    for e in edges:
        a, b = owner[e.source], owner[e.target]
        if a != b:
            deps[b].add(a)
    done: set[int] = set()
    ordered: list[list[str]] = []
    while len(ordered) < len(components):
        ready = [i for i in deps if i not in done and deps[i] <= done]
        best = min(ready, key=lambda i: position[components[i][0]])
        done.add(best)
        ordered.append(components[best])
    return ordered


def _topological(nodes: list[str], edges: list[Edge]) -> list[str] | None:
    """Topological order of `nodes` under `edges` (insertion order on ties), or None if cyclic."""
    remaining = list(nodes)
    preds = {n: {e.source for e in edges if e.target == n and e.source != n} for n in nodes}
    if any(e.source == e.target for e in edges):
        return None
    order: list[str] = []
    while remaining:
        ready = next((n for n in remaining if preds[n] <= set(order)), None)
        if ready is None:
            return None
        order.append(ready)
        remaining.remove(ready)
    return order


def gather_inputs(
    engine: Engine,
    node_id: str,
    values: Mapping[str, Mapping[str, Any]],
    inputs: Mapping[str, Any],
    *,
    loop: Loop | None = None,
    iteration: int = 0,
    outside_only: bool = False,
    unfed_rng: Any = None,
    combine: Any = None,
) -> dict[str, Any]:
    """The keyword arguments for one call of `node_id`: values from edges, exposed inputs and defaults.

    Inside a loop, a port fed by a feedback edge takes the fed-back value from iteration 1 on. With
    `outside_only`, only values that exist before the loop starts are gathered (used to size loops).
    An RNG input that nothing feeds gets `unfed_rng()` (the run's seeded generator state) when given.
    Several values for one port are merged by `combine(port, values)` (default: the port's aggregation).
    """
    plan = engine.plan()
    kwargs: dict[str, Any] = {}
    for port_name, port in engine.item(node_id).input_ports().items():
        edges = plan.incoming.get((node_id, port_name), [])
        feedback = [e for e in edges if loop is not None and e in loop.feedback]
        sources = feedback if feedback and iteration > 0 else [e for e in edges if e not in feedback]
        if outside_only and loop is not None:
            sources = [e for e in sources if e.source not in loop.nodes]
        found = [values[e.source][e.source_port] for e in sources if e.source in values]
        if not (feedback and iteration > 0):
            found += [inputs[name] for name in plan.exposed.get((node_id, port_name), []) if name in inputs]
        if not found:
            if port.kind is PortKind.RNG and unfed_rng is not None:
                kwargs[port_name] = unfed_rng()
                continue
            if port.optional or outside_only or port.kind is PortKind.RNG:
                kwargs[port_name] = port.default
                continue
            raise GraphError(f"input {node_id}.{port_name} has no value (nothing feeds it)")
        if len(found) == 1 or port.aggregate is None:
            kwargs[port_name] = found[0]
        elif combine is not None:
            kwargs[port_name] = combine(port, found)
        else:
            kwargs[port_name] = AGGREGATORS[port.aggregate](found)
    return kwargs
