"""The execution plan: how an engine's nodes run, built apart from the structure they come from.

Strongly connected components (Tarjan) are loops; inside a loop, a *feedback* edge carries a value from one
iteration to the next, and at iteration 0 its target port takes the value entering the loop from outside (or
the port's default). `make_plan` turns nodes, edges and exposed inputs into steps in a topological order;
executors consume the plan (and `gather_inputs`, the values one node call gets) through these public names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worldgen.errors import GraphError
from worldgen.ports import AGGREGATORS, PortKind


@dataclass(frozen=True)
class Edge:
    source: str
    source_port: str
    target: str
    target_port: str
    feedback: bool = False  # declared feedback; loops also infer feedback edges (see `Loop`)

    def __str__(self) -> str:
        return f"{self.source}.{self.source_port} -> {self.target}.{self.target_port}"


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


class Planned(Protocol):
    """What `gather_inputs` needs of an engine: its plan and its nodes' items (anything with input ports)."""

    def plan(self) -> ExecutionPlan: ...

    def item(self, node_id: str) -> Any: ...


def make_plan(
    nodes: Iterable[str],
    edges: Sequence[Edge],
    exposed_inputs: Mapping[str, Iterable[tuple[str, str]]],
    *,
    allow_cycles: bool = True,
    level: str = "graph",
) -> tuple[ExecutionPlan, list[Problem]]:
    """The execution plan of nodes (in insertion order) wired by `edges`, with `exposed_inputs` (name ->
    the (node, port) targets it feeds), and the problems that keep it from running: a cycle where `level`
    allows none (`allow_cycles` False), or a loop without a feedback edge."""
    nodes = list(nodes)
    incoming: dict[tuple[str, str], list[Edge]] = {}
    for edge in edges:
        incoming.setdefault((edge.target, edge.target_port), []).append(edge)
    exposed: dict[tuple[str, str], list[str]] = {}
    for name, targets in exposed_inputs.items():
        for target in targets:
            exposed.setdefault(target, []).append(name)

    problems: list[Problem] = []
    steps: list[Step] = []
    for component in _components_in_order(nodes, edges):
        members = set(component)
        inner = [e for e in edges if e.source in members and e.target in members]
        if not inner:
            steps.append(Step(component))
            continue
        if not allow_cycles:
            problems.append(
                Problem(
                    "cycle " + " -> ".join(component + component[:1]),
                    f"a {level} must be acyclic; remove one of: {', '.join(map(str, inner))}",
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


def _components_in_order(nodes: list[str], edges: Sequence[Edge]) -> list[list[str]]:
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


def _topological(nodes: list[str], edges: Sequence[Edge]) -> list[str] | None:
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
    engine: Planned,
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
