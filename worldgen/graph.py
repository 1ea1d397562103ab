"""Graph: one whole task (text-to-image, image-to-image, …) as task nodes wired by typed edges; loops allowed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from worldgen.block import Block
from worldgen.engine import Engine
from worldgen.errors import ConfigError, GraphError
from worldgen.registry import create_block


# Role rules: the default wiring applied when a node is added with auto-connect on (DESIGN.md §2.2).
class RoleRule(NamedTuple):
    source_role: str
    source_port: str
    target_role: str
    target_port: str


ROLE_RULES: tuple[RoleRule, ...] = (
    RoleRule("tokenizer", "token_ids", "conditioner", "token_ids"),
    RoleRule("conditioner", "embedding", "backbone", "condition"),
    RoleRule("backbone", "pred", "guidance", "pred_cond"),
    RoleRule("backbone", "pred_uncond", "guidance", "pred_uncond"),
    RoleRule("guidance", "pred", "solver", "pred"),
    RoleRule("solver", "model_input", "backbone", "sample"),  # closes the denoising loop
    RoleRule("solver", "timestep", "backbone", "timestep"),
    RoleRule("codec", "latent", "solver", "latent"),  # encoder -> solver (image-to-image)
    RoleRule("solver", "latent", "codec", "latent"),  # solver -> decoder
)


class Graph(Engine):
    """A graph of task nodes. Each node holds one Block; one Block may sit in several nodes (shared)."""

    level = "graph"
    allow_cycles = True

    def __init__(self, name: str = "graph", *, executor: str = "local", deferred: bool = False):
        super().__init__(name, executor=executor, deferred=deferred)

    # ---- building --------------------------------------------------------------------------------------
    def add_node(
        self,
        block: str | Block,
        *,
        id: str | None = None,  # noqa: A002 - the public API names it `id`
        config: Mapping[str, Any] | None = None,
        auto_connect: bool = True,
    ) -> str:
        """Add a block (instance or `role/impl` type + config) and return its node id.

        With `auto_connect`, edges implied by the role rules are added to existing nodes; when a rule has
        two candidate nodes the call fails and asks for an explicit edge instead of guessing.
        """
        if isinstance(block, str):
            block = create_block(block, config)
        elif config is not None:
            raise GraphError("pass `config` only with a block type, not with a Block instance")
        node_id = id or self._fresh_id(block.role)
        planned = self._role_edges(node_id, block) if auto_connect else []
        self._add_item(node_id, block)
        for source, target in planned:
            self.add_edge(source, target)
        return node_id

    def block(self, node_id: str) -> Block:
        return self.item(node_id)

    def blocks(self) -> list[tuple[str, Block]]:
        return [(n, self._items[n]) for n in self._items]

    def replace_block(self, node_id: str, block: Block) -> None:
        """Put `block` in node `node_id` in place of the block there, keeping every edge and exposed port (a
        model host rebinds a graph's blocks to the model it holds). The new block must have the same ports."""
        old = self.block(node_id)
        for direction, before, after in (
            ("input", old.input_ports(), block.input_ports()),
            ("output", old.output_ports(), block.output_ports()),
        ):
            if {n: p.kind for n, p in before.items()} != {n: p.kind for n, p in after.items()}:
                raise GraphError(
                    f"node '{node_id}': {block.block_type} cannot replace {old.block_type}, its {direction} "
                    f"ports differ ({', '.join(after) or '(none)'} instead of {', '.join(before) or '(none)'})"
                )
        self._items[node_id] = block  # same ports, same wiring: the plan stays valid

    def _fresh_id(self, role: str) -> str:
        if role not in self._items:
            return role
        i = 2
        while f"{role}_{i}" in self._items:
            i += 1
        return f"{role}_{i}"

    def _role_edges(self, node_id: str, block: Block) -> list[tuple[str, str]]:
        edges = []
        fed = {(e.target, e.target_port) for e in self._edges}
        for rule in ROLE_RULES:
            if block.role == rule.target_role and rule.target_port in block.input_ports():
                candidates = [
                    n
                    for n, b in self._items.items()
                    if b.role == rule.source_role and rule.source_port in b.output_ports()
                ]
                if len(candidates) > 1:
                    raise GraphError(
                        f"auto-connect is ambiguous for {node_id}.{rule.target_port}: nodes {candidates} all have "
                        f"role '{rule.source_role}'; add the node with auto_connect=False and connect it explicitly"
                    )
                if candidates:
                    edges.append((f"{candidates[0]}.{rule.source_port}", f"{node_id}.{rule.target_port}"))
            if block.role == rule.source_role and rule.source_port in block.output_ports():
                candidates = [
                    n
                    for n, b in self._items.items()
                    if b.role == rule.target_role
                    and rule.target_port in b.input_ports()
                    and (n, rule.target_port) not in fed
                ]
                if len(candidates) > 1:
                    raise GraphError(
                        f"auto-connect is ambiguous for {node_id}.{rule.source_port}: nodes {candidates} all have "
                        f"role '{rule.target_role}'; add the node with auto_connect=False and connect it explicitly"
                    )
                if candidates:
                    edges.append((f"{node_id}.{rule.source_port}", f"{candidates[0]}.{rule.target_port}"))
        return edges

    def named_blocks(self) -> list[tuple[str, Block]]:
        return self.blocks()

    def extract(
        self, node_ids: list[str]
    ) -> tuple[Graph, dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
        """A graph of just these nodes (same blocks), with what crosses its boundary exposed.

        Returns (subgraph, entering, leaving): `entering` maps the subgraph's inputs to the (node, port) they
        feed, `leaving` its outputs to the (node, port) they come from; both are named 'node__port'. Used to
        run a whole loop in one place (loop fusion on a model host).
        """
        inside = set(node_ids)
        sub = Graph(f"{self.name}[{', '.join(node_ids)}]")
        for node_id in node_ids:
            sub._add_item(node_id, self.item(node_id))
        entering: dict[str, tuple[str, str]] = {}
        leaving: dict[str, tuple[str, str]] = {}
        for edge in self._edges:
            if edge.source in inside and edge.target in inside:
                sub._edges.append(edge)
            elif edge.target in inside:
                entering[f"{edge.target}__{edge.target_port}"] = (edge.target, edge.target_port)
            elif edge.source in inside:
                leaving[f"{edge.source}__{edge.source_port}"] = (edge.source, edge.source_port)
        for exposed in self._inputs.values():
            for node, port in exposed.targets:
                if node in inside:
                    entering[f"{node}__{port}"] = (node, port)
        for node, port in self._outputs.values():
            if node in inside:
                leaving[f"{node}__{port}"] = (node, port)
        for name, (node, port) in entering.items():
            sub.expose_input(name, f"{node}.{port}")
        for name, (node, port) in leaving.items():
            sub.expose_output(name, f"{node}.{port}")
        return sub, entering, leaving

    # ---- config ----------------------------------------------------------------------------------------
    def _items_config(self) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        first_holder: dict[int, str] = {}
        for node_id, block in self.blocks():
            if id(block) in first_holder:
                nodes[node_id] = {"block": first_holder[id(block)]}
                continue
            first_holder[id(block)] = node_id
            entry: dict[str, Any] = {"type": block.block_type}
            if block.config_dict():
                entry["config"] = block.config_dict()
            nodes[node_id] = entry
        return nodes

    def _build_items(self, items: Mapping[str, Any], fail) -> None:
        for node_id, spec in items.items():
            path = f"nodes.{node_id}"
            if not isinstance(spec, Mapping):
                raise fail(path, "expected a mapping with 'type' (and optional 'config') or 'block'")
            try:
                if "block" in spec:
                    self.add_node(self.block(spec["block"]), id=str(node_id), auto_connect=False)
                    continue
                if "type" not in spec:
                    raise fail(path, "missing 'type' (a block type such as 'backbone/unet2d')")
                extra = set(spec) - {"type", "config"}
                if extra:
                    raise fail(path, f"unknown key(s) {sorted(extra)}; expected 'type' and 'config'")
                block = create_block(spec["type"], spec.get("config"))
            except ConfigError as err:
                if err.file is not None or err.path == path:
                    raise
                sub = "type" if "block type" in err.detail else "config"
                raise fail(f"{path}.{sub}", err.detail) from None
            except GraphError as err:
                raise fail(path, str(err)) from None
            self.add_node(block, id=str(node_id), auto_connect=False)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, nodes={len(self._items)}, edges={len(self._edges)})"
