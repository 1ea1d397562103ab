"""Stage: a role in the world cycle — a DAG of pipelines (or graphs) plus a contract on the world state.

The contract is fixed by the role (DESIGN.md §2.3): which state blocks the stage needs, which it writes, and
so when it runs. The stage talks to the world through exposed ports with standard names:

| stage input      | fed with                                                              |
|------------------|-----------------------------------------------------------------------|
| `context`        | a mapping: state blocks, world content, action, step, pipelines, seed |
| `images`         | block 3's artifacts (paths of the PNG files)                          |
| `prompt`, `negative_prompt`, `width`, `height`, `steps`, `guidance_scale` | block 2 fields   |

| stage output | becomes                                                               |
|--------------|-----------------------------------------------------------------------|
| `text`       | the text block it writes (1, 4, 5) or, for World update, the new story |
| `data`       | block 2 (the Architect's validated generation config)                 |
| `image`      | block 3 (the Creator's images, saved as artifacts)                    |

The Creator holds one pipeline per name; block 2's `pipeline` field picks the one that runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worldgen.engine import Engine, Problem
from worldgen.errors import ConfigError, GraphError, did_you_mean
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.state import WorldState


@dataclass(frozen=True)
class Contract:
    """What a role reads and writes (`writes` None: the stage changes the world's content, not the state)."""

    reads: frozenset[int]
    writes: int | None
    output: str  # the stage output that carries what it writes


# The canon's cycle order and contracts (DESIGN.md §2.3).
CYCLE = ("philosopher", "author", "world_update", "development", "architect", "creator")
CONTRACTS: dict[str, Contract] = {
    "philosopher": Contract(frozenset({1, 2, 3}), 4, "text"),
    "author": Contract(frozenset({1, 2, 3, 4}), 5, "text"),
    "world_update": Contract(frozenset({1, 2, 3, 4, 5}), None, "text"),
    "development": Contract(frozenset(), 1, "text"),
    "architect": Contract(frozenset({1}), 2, "data"),
    "creator": Contract(frozenset({2}), 3, "image"),
}


class Stage(Pipeline):
    """A role of the world cycle: pipelines/graphs wired as a DAG, with the role's state contract.

    Mechanically a pipeline whose nodes may also be pipelines (or templates)."""

    level = "stage"
    allow_cycles = False
    nodes_key = "pipelines"
    extra_config_keys = ("role",)

    def __init__(self, name: str = "stage", *, role: str | None = None, executor: str = "local"):
        super().__init__(name, executor=executor)
        role = role or name
        if role not in CONTRACTS:
            raise GraphError(
                f"unknown stage role '{role}'{did_you_mean(role, CONTRACTS)}; roles: {', '.join(CYCLE)}"
            )
        self.role = role

    @property
    def contract(self) -> Contract:
        return CONTRACTS[self.role]

    @property
    def selects(self) -> bool:
        """The Creator runs one of its pipelines, chosen by block 2; other roles run all of theirs."""
        return self.role == "creator"

    def should_run(self, state: WorldState) -> bool:
        """The execution rule: the blocks it needs are filled and the block it writes is still empty."""
        filled = state.filled()
        if not self.contract.reads <= filled:
            return False
        return self.contract.writes is None or self.contract.writes not in filled

    def add_pipeline(self, item: Engine | Mapping[str, Any], *, id: str | None = None) -> str:  # noqa: A002
        """Add a pipeline or graph (instance, config mapping, or `{template: NAME, params: {...}}`)."""
        if isinstance(item, Mapping):
            item = build_item(item)
        if not isinstance(item, (Graph, Pipeline)):
            raise GraphError(f"a stage holds graphs or pipelines, got {type(item).__name__}")
        node_id = id or item.name
        self._add_item(node_id, item)
        return node_id

    def validate(self, strict: bool = False) -> list[Problem]:
        if not self.selects:
            return super().validate(strict)
        # The Creator's pipelines are alternatives fed by the world directly, not wired to stage ports.
        problems = [
            Problem(f"{n}/{p.where}", p.message) for n in self.node_ids for p in self.item(n).validate()
        ]
        if strict and problems:
            raise GraphError(self._problem_text(problems), problems)
        return problems

    def selected(self, state: WorldState) -> Engine:
        """The Creator's pipeline for this state's block 2."""
        name = state.generation.pipeline if state.generation else None
        if name not in self._items:
            raise ConfigError(
                f"block 2 asks for pipeline '{name}'{did_you_mean(str(name), self._items)}, but the creator has: "
                f"{', '.join(self._items)}"
            )
        return self._items[name]

    @classmethod
    def _item_from_config(cls, spec: Mapping[str, Any]) -> Engine:
        return build_item(spec)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "role": self.role}

    @classmethod
    def _new_from_config(cls, config: Mapping[str, Any], fail):
        role = config.get("role", config.get("name"))
        try:
            return cls(str(config.get("name", role)), role=role, executor=config.get("executor", "local"))
        except GraphError as err:
            raise fail("role" if "role" in str(err) else "executor", str(err)) from None


def build_item(spec: Mapping[str, Any]) -> Engine:
    """A graph or pipeline from a config mapping: `{template: NAME, params: {...}}`, `{endpoint: URL, ...}` (a
    graph served over HTTP) or a full config."""
    if "endpoint" in spec:
        from worldgen.nodes.endpoint import EndpointGraph

        return EndpointGraph.from_spec(spec)
    if "template" in spec:
        from worldgen.registry import build_template

        extra = set(spec) - {"template", "params"}
        if extra:
            raise ConfigError(f"unknown key(s) {sorted(extra)} next to 'template'; expected 'params'")
        return build_template(str(spec["template"]), **dict(spec.get("params") or {}))
    kind = spec.get("kind", "graph")
    if kind == "graph":
        return Graph.from_config(spec)
    if kind == "pipeline":
        return Pipeline.from_config(spec)
    raise ConfigError(f"expected kind 'graph' or 'pipeline', got '{kind}'", path="kind")
