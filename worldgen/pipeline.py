"""Pipeline: graphs of graphs (text → image → refine → …), connected by their exposed ports; always a DAG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worldgen.block import Block
from worldgen.engine import Engine
from worldgen.errors import ConfigError, GraphError, WorldgenError
from worldgen.graph import Graph


class Pipeline(Engine):
    """A DAG whose nodes are whole graphs; an edge joins one graph's exposed output to another's input.

    Models are shared across its graphs (same model reference → one instance, one host actor on Ray), and
    its checkpoint stores each shared model once.
    """

    level = "pipeline"
    allow_cycles = False
    nodes_key = "graphs"

    def __init__(self, name: str = "pipeline", *, executor: str = "local"):
        super().__init__(name, executor=executor)

    def add_graph(self, graph: Graph | Mapping[str, Any] | str | Path, *, id: str | None = None) -> str:  # noqa: A002
        """Add a graph (instance, config mapping, or path to a config / saved graph; `ref:` prefix allowed)."""
        if isinstance(graph, (str, Path)):
            path = Path(str(graph).removeprefix("ref:"))
            graph = Graph.load(path) if path.is_dir() else Graph.from_config(path)
        elif isinstance(graph, Mapping):
            graph = _graph_from_config(graph)
        if not isinstance(graph, Graph):
            raise GraphError(
                f"add_graph takes a Graph, a config mapping or a path, got {type(graph).__name__}"
            )
        node_id = id or graph.name
        self._add_item(node_id, graph)
        return node_id

    def connect(self, source: str, target: str) -> None:
        """'graph.output' -> 'graph.input', checked against both graphs' specs."""
        self.add_edge(source, target)

    def graph(self, graph_id: str) -> Graph:
        return self.item(graph_id)

    def graphs(self) -> list[tuple[str, Graph]]:
        return [(g, self._items[g]) for g in self._items]

    def named_blocks(self) -> list[tuple[str, Block]]:
        return [(f"{i}.{n}", block) for i, item in self._items.items() for n, block in item.named_blocks()]

    def _items_config(self) -> dict[str, Any]:
        return {item_id: item.to_config() for item_id, item in self._items.items()}

    @classmethod
    def _item_from_config(cls, spec: Mapping[str, Any]) -> Engine:
        """One node of this level from its config (a pipeline's nodes are graphs, local or `{endpoint: URL}`)."""
        return _graph_from_config(spec)

    def _build_items(self, items: Mapping[str, Any], fail) -> None:
        for item_id, spec in items.items():
            path = f"{self.nodes_key}.{item_id}"
            if not isinstance(spec, Mapping):
                raise fail(
                    path, f"expected a config for this {self.level}'s node (inline, or {{ref: file.yaml}})"
                )
            try:
                item = self._item_from_config(spec)
            except ConfigError as err:
                raise fail(f"{path}.{err.path}" if err.path else path, err.detail) from None
            except WorldgenError as err:
                raise fail(path, str(err)) from None
            self._add_item(str(item_id), item)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, graphs={list(self._items)}, edges={len(self._edges)})"


def _graph_from_config(spec: Mapping[str, Any]) -> Graph:
    """A graph config, or `{endpoint: URL, ...}` for a graph served over HTTP (serve_apps/graph_app.py)."""
    if "endpoint" in spec:
        from worldgen.nodes.endpoint import EndpointGraph

        return EndpointGraph.from_spec(spec)
    return Graph.from_config(spec)
