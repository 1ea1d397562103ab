"""Render any engine (graph, pipeline, stage) as Mermaid, Graphviz DOT or plain JSON-ready data.

Only the Engine-level API is used (nodes, edges, exposed ports, loops, validation) plus `item(node_id)`
and, when an item has one, its `block_type`, so the same renderers draw every level.

Every rendering shows: each node with its id and type; the exposed inputs and outputs as distinct terminal
nodes; edges labelled `source_port → target_port`; feedback edges (declared, or inferred by `loops()`)
dashed and labelled "feedback"; and each loop as a subgraph (Mermaid) or cluster (DOT) named after its nodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
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


def _view(engine: Engine) -> _View:
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
    view = _View(engine.name, engine.level, nodes, edges, inputs, outputs, loops)
    taken: set[str] = set()
    for prefix, names in (
        ("node", [n.id for n in nodes]),
        ("in", [t.name for t in inputs]),
        ("out", [t.name for t in outputs]),
    ):
        for name in names:
            view.ids[(prefix, name)] = _unique_id(f"{prefix}_{name}", taken)
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


def to_mermaid(engine: Engine) -> str:
    """A Mermaid flowchart (`flowchart LR`): nodes, exposed inputs/outputs, edges, dashed feedback, loops."""
    view = _view(engine)
    out = [
        "flowchart LR",
        f"  %% {view.level} '{_mermaid_text(view.name)}': "
        f"{len(view.nodes)} nodes, {len(view.edges)} edges, {len(view.loops)} loop(s)",
    ]
    in_loop = {n for loop in view.loops for n in loop.nodes}
    for t in view.inputs:
        out.append(
            f"  {view.ids[('in', t.name)]}([{_mermaid_label(_terminal_lines(t, 'input'))}]):::io_input"
        )
    for node in view.nodes:
        if node.id not in in_loop:
            out.append(f"  {view.ids[('node', node.id)]}[{_mermaid_label(_node_lines(node))}]")
    taken = set(view.ids.values())
    by_id = {n.id: n for n in view.nodes}
    for loop in view.loops:
        sub = _unique_id("loop_" + "_".join(loop.order or loop.nodes), taken)
        out.append(f"  subgraph {sub}[{_mermaid_label([_loop_title(loop)])}]")
        for node_id in loop.order or loop.nodes:
            out.append(f"    {view.ids[('node', node_id)]}[{_mermaid_label(_node_lines(by_id[node_id]))}]")
        out.append("  end")
    for t in view.outputs:
        out.append(
            f"  {view.ids[('out', t.name)]}([{_mermaid_label(_terminal_lines(t, 'output'))}]):::io_output"
        )
    for t in view.inputs:
        for node, port in t.ports:
            label = _mermaid_label([_edge_label(t.name, port, False)])
            out.append(f"  {view.ids[('in', t.name)]} -->|{label}| {view.ids[('node', node)]}")
    for edge, feedback in view.edges:
        arrow = "-.->" if feedback else "-->"
        label = _mermaid_label([_edge_label(edge.source_port, edge.target_port, feedback)])
        out.append(f"  {view.ids[('node', edge.source)]} {arrow}|{label}| {view.ids[('node', edge.target)]}")
    for t in view.outputs:
        node, port = t.ports[0]
        label = _mermaid_label([_edge_label(port, t.name, False)])
        out.append(f"  {view.ids[('node', node)]} -->|{label}| {view.ids[('out', t.name)]}")
    out.append("  classDef io_input fill:#e8f4ff,stroke:#3b82f6")
    out.append("  classDef io_output fill:#eaffea,stroke:#16a34a")
    return "\n".join(out) + "\n"


# ---- Graphviz DOT ----------------------------------------------------------------------------------------------
def _dot_string(text: str) -> str:
    """A double-quoted DOT string (backslashes and quotes escaped; newlines become centred line breaks)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _dot_label(lines: list[str]) -> str:
    return _dot_string("\n".join(lines))


def to_dot(engine: Engine) -> str:
    """A Graphviz digraph: nodes, exposed inputs/outputs, edges, dashed feedback, one cluster per loop."""
    view = _view(engine)
    out = [
        f"digraph {_dot_string(view.name)} {{",
        f"  label={_dot_string(f'{view.level} {view.name!r}')};",
        "  labelloc=t;",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for t in view.inputs:
        out.append(
            f"  {view.ids[('in', t.name)]} [label={_dot_label(_terminal_lines(t, 'input'))}, shape=ellipse, "
            'style=filled, fillcolor="#e8f4ff"];'
        )
    in_loop = {n for loop in view.loops for n in loop.nodes}
    by_id = {n.id: n for n in view.nodes}
    for node in view.nodes:
        if node.id not in in_loop:
            out.append(f"  {view.ids[('node', node.id)]} [label={_dot_label(_node_lines(node))}];")
    taken = set(view.ids.values())
    for loop in view.loops:
        cluster = _unique_id("cluster_loop_" + "_".join(loop.order or loop.nodes), taken)
        out.append(f"  subgraph {cluster} {{")
        out.append(f"    label={_dot_string(_loop_title(loop))};")
        out.append('    style="dashed,rounded";')
        for node_id in loop.order or loop.nodes:
            out.append(
                f"    {view.ids[('node', node_id)]} [label={_dot_label(_node_lines(by_id[node_id]))}];"
            )
        out.append("  }")
    for t in view.outputs:
        out.append(
            f"  {view.ids[('out', t.name)]} [label={_dot_label(_terminal_lines(t, 'output'))}, shape=ellipse, "
            'style=filled, fillcolor="#eaffea"];'
        )
    for t in view.inputs:
        for node, port in t.ports:
            out.append(
                f"  {view.ids[('in', t.name)]} -> {view.ids[('node', node)]} "
                f"[label={_dot_string(_edge_label(t.name, port, False))}];"
            )
    for edge, feedback in view.edges:
        attrs = f"label={_dot_string(_edge_label(edge.source_port, edge.target_port, feedback))}"
        if feedback:
            attrs += ", style=dashed, constraint=false"
        out.append(f"  {view.ids[('node', edge.source)]} -> {view.ids[('node', edge.target)]} [{attrs}];")
    for t in view.outputs:
        node, port = t.ports[0]
        out.append(
            f"  {view.ids[('node', node)]} -> {view.ids[('out', t.name)]} "
            f"[label={_dot_string(_edge_label(port, t.name, False))}];"
        )
    out.append("}")
    return "\n".join(out) + "\n"


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


def to_json(engine: Engine) -> dict[str, Any]:
    """JSON-ready description: name, level, nodes with port kinds, edges (feedback flagged, inferred ones
    included), input/output specs, loops and validation problems."""
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
