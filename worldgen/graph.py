"""Graph: one whole task (text-to-image, image-to-image, …) as task nodes wired by typed edges; loops allowed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from worldgen.block import Block, ModelBlock
from worldgen.config import SCHEMA_VERSION, check_schema, dump_config, load_config_file
from worldgen.engine import _MISSING, Engine
from worldgen.errors import ConfigError, GraphError, WorldgenError
from worldgen.execution.callbacks import RunCallback
from worldgen.nodes.roles import ROLE_RULES
from worldgen.registry import create_block

CONFIG_FILE = "graph.yaml"
CHECKPOINT_FILE = "checkpoint.safetensors"
ASSETS_DIR = "assets"


class Graph(Engine):
    """A graph of task nodes. Each node holds one Block; one Block may sit in several nodes (shared)."""

    level = "graph"
    allow_cycles = True

    def __init__(self, name: str = "graph"):
        super().__init__(name)

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

    # ---- running ---------------------------------------------------------------------------------------
    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        executor: str = "local",
        iterations: int | None = None,
        callbacks: Iterable[RunCallback] = (),
        progress: bool = False,
    ) -> dict[str, Any]:
        """Run the graph on its exposed inputs; returns its exposed outputs.

        `seed` seeds every random draw (same seed → same result); `iterations` overrides the loop count.
        """
        from worldgen.execution import ProgressBar, run_local

        callbacks = [*callbacks, *([ProgressBar(self.name)] if progress else [])]
        if executor != "local":
            raise GraphError(f"unknown executor {executor!r}; available: 'local'")
        return run_local(self, inputs, seed=seed, iterations=iterations, callbacks=callbacks)

    __call__ = run

    # ---- config ----------------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready, no weights, no secrets) that `from_config` turns back into this graph."""
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
        inputs: dict[str, Any] = {}
        for name, ex in self._inputs.items():
            targets = [f"{n}.{p}" for n, p in ex.targets]
            target: Any = targets[0] if len(targets) == 1 else targets
            inputs[name] = {"to": target, "default": ex.default} if ex.optional else target
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "graph",
            "name": self.name,
            "nodes": nodes,
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
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> Graph:
        """Build from a config mapping or a YAML/JSON file; every error names the file and YAML path."""
        file = None
        if isinstance(config, (str, Path)):
            file = str(config)
            config = load_config_file(config)
        check_schema(config, "graph", file=file)
        try:
            return cls._build(config, file)
        except ConfigError:
            raise
        except WorldgenError as err:
            raise ConfigError(str(err), file=file) from None

    @classmethod
    def _build(cls, config: Mapping[str, Any], file: str | None) -> Graph:
        def fail(path: str, message: str) -> ConfigError:
            return ConfigError(message, file=file, path=path)

        known = {"schema_version", "kind", "name", "nodes", "edges", "inputs", "outputs"}
        for key in config:
            if key not in known:
                raise fail(str(key), f"unknown key; expected one of {sorted(known)}")
        graph = cls(str(config.get("name", "graph")))
        nodes = config.get("nodes") or {}
        if not isinstance(nodes, Mapping):
            raise fail("nodes", "expected a mapping of node id -> {type, config}")
        for node_id, spec in nodes.items():
            path = f"nodes.{node_id}"
            if not isinstance(spec, Mapping):
                raise fail(path, "expected a mapping with 'type' (and optional 'config') or 'block'")
            try:
                if "block" in spec:
                    graph.add_node(graph.block(spec["block"]), id=str(node_id), auto_connect=False)
                    continue
                if "type" not in spec:
                    raise fail(path, "missing 'type' (a block type such as 'backbone/unet2d')")
                extra = set(spec) - {"type", "config"}
                if extra:
                    raise fail(path, f"unknown key(s) {sorted(extra)}; expected 'type' and 'config'")
                block = create_block(spec["type"], spec.get("config"))
            except ConfigError as err:
                sub = "type" if "block type" in err.detail else "config"
                raise fail(f"{path}.{sub}", err.detail) from None
            except GraphError as err:
                raise fail(path, str(err)) from None
            graph.add_node(block, id=str(node_id), auto_connect=False)
        for i, edge in enumerate(config.get("edges") or []):
            try:
                if isinstance(edge, str):
                    source, arrow, target = edge.partition("->")
                    if not arrow:
                        raise GraphError(f"expected 'node.port -> node.port', got {edge!r}")
                    graph.add_edge(source.strip(), target.strip())
                elif isinstance(edge, Mapping) and {"from", "to"} <= set(edge):
                    graph.add_edge(edge["from"], edge["to"], feedback=bool(edge.get("feedback", False)))
                else:
                    raise GraphError(f"expected 'node.port -> node.port' or {{from, to}}, got {edge!r}")
            except GraphError as err:
                raise fail(f"edges[{i}]", str(err)) from None
        for name, spec in (config.get("inputs") or {}).items():
            try:
                if isinstance(spec, Mapping):
                    graph.expose_input(name, spec["to"], default=spec.get("default", _MISSING))
                else:
                    graph.expose_input(name, spec)
            except (GraphError, KeyError) as err:
                raise fail(f"inputs.{name}", str(err)) from None
        for name, spec in (config.get("outputs") or {}).items():
            try:
                graph.expose_output(name, spec)
            except GraphError as err:
                raise fail(f"outputs.{name}", str(err)) from None
        return graph

    # ---- save / load -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `graph.yaml`, `checkpoint.safetensors` and the model architectures (`assets/`) to a folder."""
        from worldgen.checkpoint import save_checkpoint

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dump_config(self.to_config(), directory / CONFIG_FILE)
        seen: set[int] = set()
        for node_id, block in self.blocks():
            if id(block) not in seen:
                seen.add(id(block))
                block.save_assets(directory / ASSETS_DIR / node_id)
        save_checkpoint(self.blocks(), directory / CHECKPOINT_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Graph:
        """Rebuild a graph written by `save`: no network needed, weights from its checkpoint."""
        from worldgen.checkpoint import load_checkpoint

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise ConfigError(f"not a saved graph: no {CONFIG_FILE} in {directory}", file=str(directory))
        graph = cls.from_config(directory / CONFIG_FILE)
        by_identity: dict[str, Any] = {}
        seen: set[int] = set()
        for node_id, block in graph.blocks():
            if id(block) in seen:
                continue
            seen.add(id(block))
            key = (
                block.config.model.identity_key()
                if isinstance(block, ModelBlock) and block.config.model.reuse
                else None
            )
            if key in by_identity:
                block.set_model(by_identity[key])
                continue
            block.load_assets(directory / ASSETS_DIR / node_id)
            if key is not None:
                by_identity[key] = block.model
        if (directory / CHECKPOINT_FILE).exists():
            load_checkpoint(graph.blocks(), directory / CHECKPOINT_FILE)
        return graph

    @classmethod
    def from_template(cls, name: str, **params: Any) -> Graph:
        """A graph from a registered template (`worldgen templates` lists them)."""
        from worldgen.templates import build_template

        graph = build_template(name, **params)
        if not isinstance(graph, Graph):
            raise GraphError(f"template '{name}' builds a {type(graph).__name__}, not a Graph")
        return graph

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, nodes={len(self._items)}, edges={len(self._edges)})"
