"""What a model host asks Ray for: a GPU share sized from the model's bytes when the cluster has GPUs
(`placement.mode: auto`), a CPU host otherwise, or what the placement says explicitly.

`host_resources` is a pure function of the placement, the model's bytes and the nodes as `ray.nodes()` lists
them, so it is tested without a cluster; `cluster_nodes` reads the live cluster (fake `GPU` and
`accelerator_type:<T>` resources of a simulated cluster count like real ones).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worldgen.errors import ConfigError
from worldgen.model_ref import Placement

log = logging.getLogger(__name__)

GPU_MEMORY_ENV = "WORLDGEN_GPU_MEMORY_GB"
# Ray reports no GPU memory, only each node's `accelerator_type:<T>` resource: GiB per GPU of the types that
# cluster.yaml and the common clouds use (the 80 GB H100/A100 variants report their own names).
GPU_MEMORY_GB: dict[str, float] = {
    "T4": 16, "V100": 16, "P100": 16, "L4": 24, "A10G": 24, "A10": 24, "A100": 40, "A100-40G": 40,
    "A100-80G": 80, "L40": 48, "L40S": 48, "A40": 48, "RTX6000": 48, "H100": 80, "H100-80G": 80,
    "H200": 141, "GH200": 96, "B200": 180, "MI300X": 192,
}  # fmt: skip
# An unknown accelerator type and no override: the smallest GPU in common use (T4), so a share sized against
# it is never too small on a bigger card (only wasteful).
DEFAULT_GPU_MEMORY_GB = 16.0
# Weights are not all a model takes on a GPU: activations, attention and convolution workspaces (cuDNN/cuBLAS)
# and the allocator's slack add about half again for the diffusion UNets/DiTs at their native sizes.
OVERHEAD = 1.5
STEP = 0.05  # shares are multiples of this (Ray accepts up to 4 decimals; coarse shares pack predictably)
WHOLE_ABOVE = 0.5  # two models over half a GPU cannot share one: such a model gets a whole GPU
ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class HostResources:
    """What a host reserves (`placement`, with its GPU share filled in) and why (for the host's `info()`)."""

    placement: Placement
    reason: str
    model_bytes: int | None = None
    gpu_memory_gb: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.placement.mode,
            "num_cpus": self.placement.num_cpus,
            "num_gpus": self.placement.num_gpus,
            "memory": self.placement.memory,
            "resources": dict(self.placement.resources),
            "reason": self.reason,
            "model_bytes": self.model_bytes,
            "gpu_memory_gb": self.gpu_memory_gb,
            "notes": list(self.notes),
        }


class InfeasiblePlacement(ConfigError):
    """A model host asks for resources (`placement`) that no node of the cluster has, or that no node
    started to provide within `placement_seconds` on a cluster that may grow."""


def host_resources(
    placement: Placement,
    model_bytes: int | None,
    nodes: Sequence[Mapping[str, Any]],
    *,
    may_grow: bool = False,
    who: str = "the model host",
    default_gpu_memory_gb: float | None = None,
) -> HostResources:
    """The resources a host with `placement` reserves for a model of `model_bytes` (None: unknown) on a
    cluster of `nodes` (`ray.nodes()` entries: "Alive", "Resources").

    Explicit `num_gpus > 0` or `memory` are used as given; `cpu` never asks for a GPU; `auto` asks for a share
    when some node has GPUs; `gpu` always does, and raises InfeasiblePlacement when no node has one and the
    cluster cannot grow (`may_grow`). The share is sized against the smallest GPU among the GPU nodes (the host
    may land on any of them): `placement.gpu_memory_gb`, else `default_gpu_memory_gb` (the env var), else the
    accelerator type's, else 16 GiB.
    """
    if placement.num_gpus > 0 or placement.memory:
        return HostResources(placement, "as the placement says (num_gpus/memory given)", model_bytes)
    if placement.mode == "cpu":
        return HostResources(placement, "placement mode 'cpu'", model_bytes)
    gpu_nodes = [
        n["Resources"] for n in nodes if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0)
    ]
    if not gpu_nodes:
        if placement.mode == "auto":
            return HostResources(placement, "placement mode 'auto' on a cluster without GPUs", model_bytes)
        if not may_grow:
            raise InfeasiblePlacement(
                f"{who} asks for a GPU (`placement.mode: gpu`), and no node of this cluster has one and none "
                "can be added; use `placement.mode: auto` (a GPU when there is one) or `cpu`, or add a GPU node"
            )
    if model_bytes == 0:  # a tokenizer or scheduler: nothing to put on a GPU
        return HostResources(placement, "no weights to put on a GPU", 0)
    memory_gb, source = _gpu_memory_gb(placement, gpu_nodes, default_gpu_memory_gb)
    share, notes = gpu_share(model_bytes, memory_gb)
    notes = (f"GPU memory {memory_gb:g} GiB ({source})", *notes)
    reason = f"placement mode '{placement.mode}': a GPU share sized from the model's bytes"
    sized = placement.model_copy(update={"num_gpus": share})
    return HostResources(sized, reason, model_bytes, memory_gb, notes)


def gpu_share(model_bytes: int | None, gpu_memory_gb: float) -> tuple[float, tuple[str, ...]]:
    """The fraction of one GPU a model of `model_bytes` needs, with notes on how it was chosen: bytes x
    OVERHEAD / GPU bytes, rounded up to a multiple of STEP (at least STEP); over WHOLE_ABOVE a whole GPU."""
    if model_bytes is None:
        return STEP, ("model size unknown before loading (a hub id not downloaded): the smallest share",)
    need = model_bytes * OVERHEAD / (gpu_memory_gb * 2**30)
    size = f"{model_bytes / 2**30:.2f} GiB of weights x {OVERHEAD:g} = {need:.3f} of a GPU"
    if need > 1:
        message = f"{size}: larger than one GPU; it gets a whole GPU and may run out of memory (no model parallelism)"
        log.warning(message)
        return 1.0, (message,)
    if need > WHOLE_ABOVE:
        return 1.0, (f"{size}: over {WHOLE_ABOVE:g}, a whole GPU",)
    # round up to the step; the epsilon keeps an exact multiple (0.1) from becoming the next one
    share = max(STEP, math.ceil(need / STEP - 1e-9) * STEP)
    return round(share, 2), (size,)


def _gpu_memory_gb(
    placement: Placement, gpu_nodes: Sequence[Mapping[str, float]], default: float | None
) -> tuple[float, str]:
    if placement.gpu_memory_gb is not None:
        return placement.gpu_memory_gb, "placement.gpu_memory_gb"
    if default is not None:
        return default, GPU_MEMORY_ENV
    if not gpu_nodes:  # mode gpu on a cluster that may grow: the node to come is unknown
        return DEFAULT_GPU_MEMORY_GB, "no GPU node yet: assumed"
    found = [_node_gpu_memory(node) for node in gpu_nodes]
    memory, source = min(found, key=lambda item: item[0])
    return memory, source


def _node_gpu_memory(resources: Mapping[str, float]) -> tuple[float, str]:
    types = [k[len(ACCELERATOR_PREFIX) :] for k in resources if k.startswith(ACCELERATOR_PREFIX)]
    known = [(GPU_MEMORY_GB[t], f"accelerator_type:{t}") for t in types if t in GPU_MEMORY_GB]
    if known:
        return min(known)
    unknown = f"accelerator type {', '.join(types)} unknown" if types else "no accelerator type reported"
    return DEFAULT_GPU_MEMORY_GB, f"{unknown}: assumed; set {GPU_MEMORY_ENV} or placement.gpu_memory_gb"


def gpu_memory_from_env() -> float | None:
    """WORLDGEN_GPU_MEMORY_GB as a number of GiB (unset: None); a clear error for anything else."""
    raw = os.environ.get(GPU_MEMORY_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigError(f"env var {GPU_MEMORY_ENV} must be a positive number of GiB per GPU, got {raw!r}")
    return value


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster as `ray.nodes()` gives them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]
