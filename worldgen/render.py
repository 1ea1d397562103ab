"""Render any engine (graph, pipeline, stage), or a whole world, as Mermaid, Graphviz DOT or JSON-ready data.

Only the Engine-level API is used (nodes, edges, exposed ports, loops, validation) plus `item(node_id)`
and, when an item has one, its `block_type`, so the same renderers draw every level.

Every rendering shows: each node with its id and type; the exposed inputs and outputs as distinct terminal
nodes; edges labelled `source_port → target_port`; feedback edges (declared, or inferred by `loops()`)
dashed and labelled "feedback"; and each loop as a subgraph (Mermaid) or cluster (DOT) named after its nodes.

A world is drawn as its cycle: one subgraph (Mermaid) / cluster (DOT) / entry of `stages` (JSON) per stage in
cycle order, edges from each stage to the next and from the Creator back to the Philosopher, and inside each
stage its pipelines and graphs as nested subgraphs / clusters / `contents` objects, each graph drawn in full.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worldgen.engine import Edge, Engine, Loop
from worldgen.errors import WorldgenError

ARROW = "→"

__all__ = ["to_dot", "to_json", "to_mermaid"]


# ---- one view of an engine that every renderer draws --------------------------------------------------------
@dataclass
class _Node:
    id: str
    type: str
    shares: str | None = None  # id of the first node holding the same item (a shared block / model)


@dataclass
class _Terminal:
    name: str
    kind: str
    optional: bool
    ports: list[tuple[str, str]]  # (node, port) fed by an input, or [(node, port)] feeding an output


@dataclass
class _View:
    name: str
    level: str
    nodes: list[_Node]
    edges: list[tuple[Edge, bool]]  # (edge, is feedback)
    inputs: list[_Terminal]
    outputs: list[_Terminal]
    loops: list[Loop]
    ids: dict[tuple[str, str], str] = field(default_factory=dict)  # ("node"|"in"|"out", name) -> safe id
    scope: str = ""  # the prefix of every id drawn for this engine (its path in a world's diagram)


def _item_type(item: Any) -> str:
    block_type = getattr(item, "block_type", None)
    if block_type:
        return str(block_type)
    level, name = getattr(item, "level", None), getattr(item, "name", None)
    if level and name is not None:
        return f"{level} '{name}'"
    return type(item).__name__


def _safe_loops(engine: Engine) -> list[Loop]:
    try:
        return engine.loops()
    except WorldgenError:  # a malformed engine still renders, only without its loops
        return []


def _view(engine: Engine, scope: str = "", taken: set[str] | None = None) -> _View:
    """The engine as the renderers see it; its ids start with `scope` and are unique in `taken` (a world's
    diagram holds many graphs, whose node names repeat)."""
    first_holder: dict[int, str] = {}
    nodes = []
    for node_id in engine.node_ids:
        item = engine.item(node_id)
        shares = first_holder.setdefault(id(item), node_id)
        nodes.append(_Node(node_id, _item_type(item), shares if shares != node_id else None))
    loops = _safe_loops(engine)
    feedback = {e for loop in loops for e in loop.feedback}
    edges = [(e, e.feedback or e in feedback) for e in engine.edges]

    def port_kind(node: str, port: str, direction: str) -> str:
        try:
            item = engine.item(node)
            ports = item.input_ports() if direction == "input" else item.output_ports()
            return ports[port].kind.value
        except (WorldgenError, KeyError, AttributeError):
            return "any"

    inputs = []
    for name, ex in engine.exposed_inputs.items():
        kinds = {port_kind(n, p, "input") for n, p in ex.targets}
        kind = next(iter(kinds)) if len(kinds) == 1 else "any"
        inputs.append(_Terminal(name, kind, ex.optional, list(ex.targets)))
    outputs = [
        _Terminal(name, port_kind(n, p, "output"), False, [(n, p)])
        for name, (n, p) in engine.exposed_outputs.items()
    ]
    view = _View(engine.name, engine.level, nodes, edges, inputs, outputs, loops, scope=scope)
    taken = set() if taken is None else taken
    for prefix, names in (
        ("node", [n.id for n in nodes]),
        ("in", [t.name for t in inputs]),
        ("out", [t.name for t in outputs]),
    ):
        for name in names:
            view.ids[(prefix, name)] = _unique_id(f"{scope}{prefix}_{name}", taken)
    return view


def _unique_id(raw: str, taken: set[str]) -> str:
    """An identifier made of [A-Za-z0-9_] only (safe in Mermaid and DOT without quoting), unique in `taken`."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", raw)
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _loop_title(loop: Loop) -> str:
    return "loop: " + f" {ARROW} ".join(loop.order or loop.nodes)


def _edge_label(source_port: str, target_port: str, feedback: bool) -> str:
    text = f"{source_port} {ARROW} {target_port}"
    return f"feedback: {text}" if feedback else text


def _node_lines(node: _Node) -> list[str]:
    lines = [node.id, node.type]
    if node.shares:
        lines.append(f"(same block as {node.shares})")
    return lines


def _terminal_lines(t: _Terminal, direction: str) -> list[str]:
    kind = t.kind + (", optional" if t.optional else "")
    return [f"{direction}: {t.name}", f"({kind})"]


# ---- Mermaid ---------------------------------------------------------------------------------------------------
def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for the characters Mermaid would parse)."""
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("\n", " ")):
        text = text.replace(char, code)
    return text


def _mermaid_label(lines: list[str]) -> str:
    return '"' + "<br/>".join(_mermaid_text(line) for line in lines) + '"'


_MERMAID_CLASSES = [
    "  classDef io_input fill:#e8f4ff,stroke:#3b82f6",
    "  classDef io_output fill:#eaffea,stroke:#16a34a",
]


def to_mermaid(subject: Any) -> str:
    """A Mermaid flowchart (`flowchart LR`): nodes, exposed inputs/outputs, edges, dashed feedback, loops; for
    a world, its cycle of stages with their pipelines and graphs as nested subgraphs."""
    if _is_world(subject):
        return _world_mermaid(subject)
    view = _view(subject)
    out = [
        "flowchart LR",
        f"  %% {view.level} '{_mermaid_text(view.name)}': "
        f"{len(view.nodes)} nodes, {len(view.edges)} edges, {len(view.loops)} loop(s)",
        *_mermaid_graph(view, set(view.ids.values()), "  "),
        *_MERMAID_CLASSES,
    ]
    return "\n".join(out) + "\n"


def _mermaid_graph(view: _View, taken: set[str], pad: str) -> list[str]:
    """The lines drawing one engine's nodes, terminals, loops and edges, indented by `pad`."""
    out: list[str] = []
    in_loop = {n for loop in view.loops for n in loop.nodes}
    for t in view.inputs:
        out.append(
            f"{pad}{view.ids[('in', t.name)]}([{_mermaid_label(_terminal_lines(t, 'input'))}]):::io_input"
        )
    for node in view.nodes:
        if node.id not in in_loop:
            out.append(f"{pad}{view.ids[('node', node.id)]}[{_mermaid_label(_node_lines(node))}]")
    by_id = {n.id: n for n in view.nodes}
    for loop in view.loops:
        sub = _unique_id(view.scope + "loop_" + "_".join(loop.order or loop.nodes), taken)
        out.append(f"{pad}subgraph {sub}[{_mermaid_label([_loop_title(loop)])}]")
        for node_id in loop.order or loop.nodes:
            label = _mermaid_label(_node_lines(by_id[node_id]))
            out.append(f"{pad}  {view.ids[('node', node_id)]}[{label}]")
        out.append(f"{pad}end")
    for t in view.outputs:
        out.append(
            f"{pad}{view.ids[('out', t.name)]}([{_mermaid_label(_terminal_lines(t, 'output'))}]):::io_output"
        )
    for t in view.inputs:
        for node, port in t.ports:
            label = _mermaid_label([_edge_label(t.name, port, False)])
            out.append(f"{pad}{view.ids[('in', t.name)]} -->|{label}| {view.ids[('node', node)]}")
    for edge, feedback in view.edges:
        arrow = "-.->" if feedback else "-->"
        label = _mermaid_label([_edge_label(edge.source_port, edge.target_port, feedback)])
        out.append(
            f"{pad}{view.ids[('node', edge.source)]} {arrow}|{label}| {view.ids[('node', edge.target)]}"
        )
    for t in view.outputs:
        node, port = t.ports[0]
        label = _mermaid_label([_edge_label(port, t.name, False)])
        out.append(f"{pad}{view.ids[('node', node)]} -->|{label}| {view.ids[('out', t.name)]}")
    return out


# ---- Graphviz DOT ----------------------------------------------------------------------------------------------
def _dot_string(text: str) -> str:
    """A double-quoted DOT string (backslashes and quotes escaped; newlines become centred line breaks)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _dot_label(lines: list[str]) -> str:
    return _dot_string("\n".join(lines))


_DOT_DEFAULTS = [
    "  labelloc=t;",
    "  rankdir=LR;",
    '  node [shape=box, style="rounded", fontname="Helvetica"];',
    '  edge [fontname="Helvetica", fontsize=10];',
]


def to_dot(subject: Any) -> str:
    """A Graphviz digraph: nodes, exposed inputs/outputs, edges, dashed feedback, one cluster per loop; for a
    world, its cycle of stages with their pipelines and graphs as nested clusters."""
    if _is_world(subject):
        return _world_dot(subject)
    view = _view(subject)
    out = [
        f"digraph {_dot_string(view.name)} {{",
        f"  label={_dot_string(f'{view.level} {view.name!r}')};",
        *_DOT_DEFAULTS,
        *_dot_graph(view, set(view.ids.values()), "  "),
        "}",
    ]
    return "\n".join(out) + "\n"


def _dot_graph(view: _View, taken: set[str], pad: str) -> list[str]:
    """The statements drawing one engine's nodes, terminals, loops and edges, indented by `pad`."""
    out: list[str] = []
    for t in view.inputs:
        out.append(
            f"{pad}{view.ids[('in', t.name)]} [label={_dot_label(_terminal_lines(t, 'input'))}, shape=ellipse, "
            'style=filled, fillcolor="#e8f4ff"];'
        )
    in_loop = {n for loop in view.loops for n in loop.nodes}
    by_id = {n.id: n for n in view.nodes}
    for node in view.nodes:
        if node.id not in in_loop:
            out.append(f"{pad}{view.ids[('node', node.id)]} [label={_dot_label(_node_lines(node))}];")
    for loop in view.loops:
        cluster = _unique_id(f"cluster_{view.scope}loop_" + "_".join(loop.order or loop.nodes), taken)
        out.append(f"{pad}subgraph {cluster} {{")
        out.append(f"{pad}  label={_dot_string(_loop_title(loop))};")
        out.append(f'{pad}  style="dashed,rounded";')
        for node_id in loop.order or loop.nodes:
            out.append(
                f"{pad}  {view.ids[('node', node_id)]} [label={_dot_label(_node_lines(by_id[node_id]))}];"
            )
        out.append(f"{pad}}}")
    for t in view.outputs:
        out.append(
            f"{pad}{view.ids[('out', t.name)]} [label={_dot_label(_terminal_lines(t, 'output'))}, "
            'shape=ellipse, style=filled, fillcolor="#eaffea"];'
        )
    for t in view.inputs:
        for node, port in t.ports:
            out.append(
                f"{pad}{view.ids[('in', t.name)]} -> {view.ids[('node', node)]} "
                f"[label={_dot_string(_edge_label(t.name, port, False))}];"
            )
    for edge, feedback in view.edges:
        attrs = f"label={_dot_string(_edge_label(edge.source_port, edge.target_port, feedback))}"
        if feedback:
            attrs += ", style=dashed, constraint=false"
        out.append(f"{pad}{view.ids[('node', edge.source)]} -> {view.ids[('node', edge.target)]} [{attrs}];")
    for t in view.outputs:
        node, port = t.ports[0]
        out.append(
            f"{pad}{view.ids[('node', node)]} -> {view.ids[('out', t.name)]} "
            f"[label={_dot_string(_edge_label(port, t.name, False))}];"
        )
    return out


# ---- JSON ------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON data: containers recurse, non-finite floats and unknown objects become strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    return repr(value)


def _port_specs(ports: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: _jsonable(p.spec())
        if hasattr(p, "spec")
        else {"kind": getattr(getattr(p, "kind", None), "value", "any")}
        for name, p in ports.items()
    }


def _edge_ref(edge: Edge) -> str:
    return f"{edge.source}.{edge.source_port} -> {edge.target}.{edge.target_port}"


def to_json(subject: Any) -> dict[str, Any]:
    """JSON-ready description: name, level, nodes with port kinds, edges (feedback flagged, inferred ones
    included), input/output specs, loops and validation problems; for a world, its cycle and its stages in
    order, each with its pipelines and graphs nested under their nodes' `contents`."""
    if _is_world(subject):
        return _world_json(subject)
    engine = subject
    view = _view(engine)
    nodes = []
    for node in view.nodes:
        item = engine.item(node.id)
        entry: dict[str, Any] = {"id": node.id, "type": node.type}
        if node.shares:
            entry["shares"] = node.shares
        try:
            entry["inputs"] = _port_specs(item.input_ports())
            entry["outputs"] = _port_specs(item.output_ports())
        except WorldgenError as err:
            entry["error"] = str(err)
        nodes.append(entry)
    edges = [
        {
            "from": f"{e.source}.{e.source_port}",
            "to": f"{e.target}.{e.target_port}",
            "source": e.source,
            "source_port": e.source_port,
            "target": e.target,
            "target_port": e.target_port,
            "feedback": feedback,
            "declared_feedback": e.feedback,
        }
        for e, feedback in view.edges
    ]
    try:
        input_spec, output_spec = engine.input_spec(), engine.output_spec()
    except WorldgenError:  # an exposed port points nowhere: fall back to what the view knows
        input_spec = {t.name: {"kind": t.kind} for t in view.inputs}
        output_spec = {t.name: {"kind": t.kind} for t in view.outputs}
    inputs = {
        t.name: {**_jsonable(input_spec.get(t.name, {})), "to": [f"{n}.{p}" for n, p in t.ports]}
        for t in view.inputs
    }
    outputs = {
        t.name: {**_jsonable(output_spec.get(t.name, {})), "from": f"{t.ports[0][0]}.{t.ports[0][1]}"}
        for t in view.outputs
    }
    loops = [
        {
            "name": _loop_title(loop),
            "nodes": list(loop.nodes),
            "order": list(loop.order),
            "feedback": sorted(_edge_ref(e) for e in loop.feedback),
        }
        for loop in view.loops
    ]
    try:
        problems = [{"where": p.where, "message": p.message} for p in engine.validate()]
    except WorldgenError as err:
        problems = [{"where": f"{view.level} '{view.name}'", "message": str(err)}]
    return {
        "name": view.name,
        "level": view.level,
        "nodes": nodes,
        "edges": edges,
        "inputs": inputs,
        "outputs": outputs,
        "loops": loops,
        "valid": not problems,
        "problems": problems,
    }


# ---- worlds: the cycle of stages, each stage's pipelines and graphs nested ----------------------------------
def _is_world(subject: Any) -> bool:
    from worldgen.world import World  # here: worlds import most of the core, a graph's rendering needs none

    return isinstance(subject, World)


@dataclass
class _Stage:
    role: str
    title: str  # "1. Philosopher"
    summary: str  # what it reads and writes
    engine: Engine


def _stages(world: Any) -> list[_Stage]:
    from worldgen.stage import CYCLE

    stages = []
    for index, role in enumerate(CYCLE, start=1):
        stage = world.stages[role]
        contract = stage.contract
        reads = ", ".join(str(b) for b in sorted(contract.reads))
        reads = f"reads block{'s' if len(contract.reads) > 1 else ''} {reads}; " if contract.reads else ""
        writes = f"block {contract.writes}" if contract.writes is not None else "the world's content"
        summary = f"{reads}writes {writes}"
        title = f"{index}. {role.replace('_', ' ').capitalize()}"
        stages.append(_Stage(role, title, summary, stage))
    return stages


def _cycle(stages: list[_Stage]) -> list[tuple[_Stage, _Stage, str]]:
    """(from, to, label): each stage to the next, and the last back to the first (the next step)."""
    return [
        (stage, stages[(i + 1) % len(stages)], "next step" if i == len(stages) - 1 else "then")
        for i, stage in enumerate(stages)
    ]


def _world_heading(world: Any) -> str:
    from worldgen.stage import CYCLE

    return f"world '{world.settings.name}': " + f" {ARROW} ".join([*CYCLE, CYCLE[0]])


def _children(engine: Engine) -> list[tuple[str, Engine]]:
    """The items of `engine` that are engines themselves (a stage's pipelines/graphs, a pipeline's graphs)."""
    return [(n, engine.item(n)) for n in engine.node_ids if isinstance(engine.item(n), Engine)]


@dataclass(frozen=True)
class _Dialect:
    """How one text format draws a world's nesting: a graph in full, a group (Mermaid subgraph, DOT cluster)
    opened and closed, and an edge between two groups."""

    graph: Callable[[_View, set[str], str], list[str]]  # (view, taken ids, indent) -> lines
    group_id: Callable[[str], str]  # a raw name -> the group's id before it is made unique
    open: Callable[[str, list[str], str, bool], list[str]]  # (id, label lines, indent, is a stage) -> lines
    close: str
    edge: Callable[
        [str, str, str, str, str], str
    ]  # (from id, to id, label, "item"|"then"|"next step", indent)


def _nested(engine: Engine, scope: str, taken: set[str], pad: str, dialect: _Dialect) -> list[str]:
    """An engine inside a world's diagram: a graph in full, or one nested group per item (a stage's pipelines
    and graphs, a pipeline's graphs) with the edges between them."""
    children = _children(engine)
    if not children:
        return dialect.graph(_view(engine, scope, taken), taken, pad)
    out, ids = [], {}
    for node_id, item in children:
        ids[node_id] = _unique_id(dialect.group_id(f"{scope}{node_id}"), taken)
        out += dialect.open(ids[node_id], [f"{node_id}: {item.level} {item.name!r}"], pad, False)
        out += _nested(item, f"{scope}{node_id}__", taken, pad + "  ", dialect)
        out.append(pad + dialect.close)
    for edge in engine.edges:
        if edge.source in ids and edge.target in ids:
            label = _edge_label(edge.source_port, edge.target_port, False)
            out.append(dialect.edge(ids[edge.source], ids[edge.target], label, "item", pad))
    return out


def _world_lines(world: Any, dialect: _Dialect) -> list[str]:
    """Every stage as a group in cycle order, its contents nested, then the cycle's edges."""
    stages, taken = _stages(world), set()
    out, ids = [], {}
    for stage in stages:
        ids[stage.role] = _unique_id(dialect.group_id(f"stage_{stage.role}"), taken)
        out += dialect.open(ids[stage.role], [stage.title, stage.summary], "  ", True)
        out += _nested(stage.engine, f"{stage.role}__", taken, "    ", dialect)
        out.append("  " + dialect.close)
    for source, target, label in _cycle(stages):
        out.append(dialect.edge(ids[source.role], ids[target.role], label, label, "  "))
    return out


_MERMAID_ARROWS = {"item": "-->", "then": "==>", "next step": "-.->"}
_MERMAID = _Dialect(
    graph=_mermaid_graph,
    group_id=lambda name: name,
    open=lambda sub, lines, pad, stage: [f"{pad}subgraph {sub}[{_mermaid_label(lines)}]"],
    close="end",
    edge=lambda a, b, label, kind, pad: f"{pad}{a} {_MERMAID_ARROWS[kind]}|{_mermaid_label([label])}| {b}",
)


def _world_mermaid(world: Any) -> str:
    heading = f"  %% {_mermaid_text(_world_heading(world))}"
    return "\n".join(["flowchart LR", heading, *_world_lines(world, _MERMAID), *_MERMAID_CLASSES]) + "\n"


# DOT: an edge between clusters runs between invisible anchor nodes, clipped at the clusters (compound=true)
def _dot_cluster(cluster: str, lines: list[str], pad: str, stage: bool) -> list[str]:
    return [
        f"{pad}subgraph {cluster} {{",
        f"{pad}  label={_dot_label(lines)};",
        f"{pad}  style={_dot_string('bold,rounded' if stage else 'rounded')};",
        f'{pad}  {cluster}_anchor [shape=point, style=invis, width=0, label=""];',
    ]


_DOT_EDGE_STYLES = {"item": "", "then": ", style=bold", "next step": ", style=dashed, constraint=false"}
_DOT = _Dialect(
    graph=_dot_graph,
    group_id=lambda name: f"cluster_{name}",
    open=_dot_cluster,
    close="}",
    edge=lambda a, b, label, kind, pad: (
        f"{pad}{a}_anchor -> {b}_anchor [label={_dot_string(label)}, ltail={a}, lhead={b}{_DOT_EDGE_STYLES[kind]}];"
    ),
)


def _world_dot(world: Any) -> str:
    out = [
        f"digraph {_dot_string(world.settings.name)} {{",
        f"  label={_dot_string(_world_heading(world))};",
        *_DOT_DEFAULTS,
        "  compound=true;",
        *_world_lines(world, _DOT),
        "}",
    ]
    return "\n".join(out) + "\n"


# JSON
def _nested_json(engine: Engine) -> dict[str, Any]:
    data = to_json(engine)
    for entry in data["nodes"]:
        item = engine.item(entry["id"])
        if isinstance(item, Engine):
            entry["contents"] = _nested_json(item)
    return data


def _world_json(world: Any) -> dict[str, Any]:
    stages = _stages(world)
    return {
        "name": world.settings.name,
        "level": "world",
        "cycle": [s.role for s in stages],
        "stages": [
            {
                "role": s.role,
                "title": s.title,
                "reads": sorted(s.engine.contract.reads),
                "writes": s.engine.contract.writes,
                **_nested_json(s.engine),
            }
            for s in stages
        ],
        "edges": [
            {"from": a.role, "to": b.role, "next_step": label == "next step"}
            for a, b, label in _cycle(stages)
        ],
    }
