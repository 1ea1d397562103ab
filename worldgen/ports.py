"""Ports: the typed inputs and outputs of blocks (and of graphs, through exposed ports)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class PortKind(str, Enum):
    """What travels on an edge. Two ports connect when their kinds are equal or either is ANY."""

    ANY = "any"
    TEXT = "text"
    TOKENS = "tokens"
    MASK = "mask"
    EMBEDDING = "embedding"
    LATENT = "latent"
    IMAGE = "image"  # (B, C, H, W) float in [0, 1]
    VIDEO = "video"  # (B, F, C, H, W) float in [0, 1]: F frames per clip
    AUDIO = "audio"  # (B, channels, samples) float in [-1, 1]; the sample rate travels on an INT port
    TIMESTEP = "timestep"
    SCALAR = "scalar"
    INT = "int"
    RNG = "rng"
    SOLVER_STATE = "solver_state"
    JSON = "json"
    ADAPTER = "adapter"  # what an adapter node hands the blocks it modifies (e.g. LoRA files)


class Aggregation(str, Enum):
    """How an input port combines the values of several incoming edges (in edge order)."""

    LIST = "list"
    SUM = "sum"
    MEAN = "mean"
    CONCAT = "concat"


_REQUIRED = object()


@dataclass(frozen=True)
class Port:
    """One named input or output of a block. Inputs are required unless `optional` (then `default` is used)."""

    name: str
    kind: PortKind = PortKind.ANY
    optional: bool = False
    default: Any = None
    aggregate: Aggregation | None = None
    doc: str = ""

    def spec(self) -> dict[str, Any]:
        """JSON-friendly description (used by `show --format json`, input/output specs and later HTTP schemas)."""
        out: dict[str, Any] = {"kind": self.kind.value}
        if self.optional:
            out["optional"] = True
            if self.default is not None:
                out["default"] = self.default
        if self.aggregate:
            out["aggregate"] = self.aggregate.value
        if self.doc:
            out["doc"] = self.doc
        return out


def compatible(source: PortKind, target: PortKind) -> bool:
    """Whether an output of kind `source` may feed an input of kind `target`."""
    return source == target or PortKind.ANY in (source, target)


def _concat(values: list) -> Any:
    import torch

    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    if all(isinstance(v, str) for v in values):
        return "\n".join(values)
    return [item for v in values for item in (v if isinstance(v, list) else [v])]


AGGREGATORS: dict[Aggregation, Callable[[list], Any]] = {
    Aggregation.LIST: list,
    Aggregation.SUM: lambda values: sum(values[1:], values[0]),
    Aggregation.MEAN: lambda values: sum(values[1:], values[0]) / len(values),
    Aggregation.CONCAT: _concat,
}
