"""The model host: one long-lived Ray actor per model identity, holding that model once for every user.

Blocks that hold weights are *called on* their host (`call`), and a loop whose models all live on one host
runs there as a single call (`run_subgraph`), with the local executor inside, instead of one round trip per
node per step. Hosts are named from the model's identity in the project's namespace and created with
`get_if_exists=True`, so concurrent creators get the same actor; Ray restarts a failed host, which reloads
its model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
import uuid
from typing import Any

import ray

from worldgen.block import Block, ModelBlock, ModelRef

NAMESPACE = os.environ.get("WORLDGEN_NAMESPACE", "worldgen")
PREFIX = "wg-model-"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def set_torch_threads(reserved_cpus: float) -> int:
    """Torch intra-op threads for a long-lived actor: WORLDGEN_TORCH_THREADS when set, else its reserved CPUs,
    else (none reserved: a shared server) all the machine's cores. Ray would give such an actor one thread."""
    import torch

    explicit = os.environ.get("WORLDGEN_TORCH_THREADS")
    if explicit:
        threads = int(explicit)
    else:
        threads = max(1, int(reserved_cpus)) if reserved_cpus >= 1 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def block_key(block: Block) -> str:
    """Stable identity of a block's behaviour (type + config), for caches on workers and hosts."""
    return block.block_type + json.dumps(block.config_dict(), sort_keys=True)


def host_name(block: ModelBlock) -> str:
    """The host actor's name for this block's model: same model identity -> same name -> same actor."""
    ref = block.config.model
    name = f"{PREFIX}{ref.slug()}-{block.model_class().__name__}"
    if block.model_origin:  # weights from a checkpoint, not from the reference itself
        name += "-" + hashlib.sha1(block.model_origin.encode()).hexdigest()[:8]
    if not ref.reuse:  # a private copy for this block
        token = block.__dict__.setdefault("_private_host_token", uuid.uuid4().hex[:8])
        name += f"-private-{token}"
    return name


@ray.remote
class ModelHost:
    """Holds one model; runs the blocks (and fused loops) that use it."""

    def __init__(self, ref: dict[str, Any], class_path: str, model: Any = None):
        from worldgen.models.loading import load_component, resolve_device

        self.ref = ModelRef(**ref)
        self.class_path = class_path
        set_torch_threads(self.ref.placement.num_cpus)
        started = time.perf_counter()
        if model is None:
            model = load_component(self.ref, _import(class_path))
        elif hasattr(model, "to"):
            model = model.to(resolve_device(self.ref.device))
        self.model = model
        self.load_seconds = time.perf_counter() - started
        self.loads = 1  # per process: a restarted host counts its reload as a new process
        self.calls = 0
        self._blocks: dict[str, Block] = {}
        self._subgraphs: dict[str, Any] = {}

    def _bind(self, block: Block) -> Block:
        """The cached instance of this block, with its model set to this host's."""
        key = block_key(block)
        if key not in self._blocks:
            if isinstance(block, ModelBlock) and block.config.model.identity_key() == self.ref.identity_key():
                block.set_model(self.model, origin=block.model_origin)
            self._blocks[key] = block
        return self._blocks[key]

    def call(self, block: Block, node_id: str, ports: tuple[str, ...], **inputs: Any) -> Any:
        """Run one block; returns its outputs in `ports` order (one value when there is one port)."""
        from worldgen.execution.local import call_in_port_order

        self.calls += 1
        return call_in_port_order(self._bind(block), node_id, ports, inputs, " on its model host")

    def run_subgraph(
        self,
        key: str,
        graph: Any,
        ports: tuple[str, ...],
        seed: int | None,
        iterations: int | None,
        **inputs: Any,
    ) -> Any:
        """Run a whole (loop) subgraph here with the local executor; outputs in `ports` order."""
        from worldgen.execution.local import in_port_order, run_local

        self.calls += 1
        if key not in self._subgraphs:
            for node_id, block in graph.blocks():
                graph._items[node_id] = self._bind(block)
            self._subgraphs[key] = graph
        outputs = run_local(
            self._subgraphs[key], inputs, seed=seed, iterations=iterations
        )  # errors name the node
        return in_port_order(outputs, ports)

    def info(self) -> dict[str, Any]:
        import torch

        params = (
            sum(p.numel() for p in self.model.parameters()) if isinstance(self.model, torch.nn.Module) else 0
        )
        return {
            "identity": self.ref.identity_key(),
            "class": self.class_path,
            "loads": self.loads,
            "load_seconds": round(self.load_seconds, 3),
            "calls": self.calls,
            "parameters": params,
            "adapters": sorted(getattr(self.model, "__dict__", {}).get("_worldgen_adapters", ())),
            "pid": os.getpid(),
        }


_handles: dict[str, Any] = {}


def host_for(block: ModelBlock) -> Any:
    """The host actor for this block's model, created on first use (safe under concurrent creation)."""
    name = host_name(block)
    handle = _handles.get(name)
    if handle is not None:
        return handle
    ref = block.config.model
    model = None
    if block.model_origin is not None:  # weights the reference cannot reload: hand them over
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            model = ray.put(block.model)
    if handle is None:
        placement = ref.placement
        options: dict[str, Any] = {
            "name": name,
            "namespace": NAMESPACE,
            "get_if_exists": True,
            "lifetime": "detached",
            "max_restarts": placement.max_restarts,
            "num_cpus": placement.num_cpus,
            "num_gpus": placement.num_gpus,
        }
        if placement.memory:
            options["memory"] = placement.memory
        handle = ModelHost.options(**options).remote(
            ref.model_dump(mode="json"), _class_path(block.model_class()), model
        )
    _handles[name] = handle
    return handle


def forget_host(name: str | None = None) -> None:
    """Drop cached handles (all, or one) so the next use looks the actor up again."""
    if name is None:
        _handles.clear()
    else:
        _handles.pop(name, None)


def cluster_address() -> str | None:
    """The connected cluster's bootstrap address (so the state API never guesses between clusters)."""
    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def list_hosts(address: str | None = None) -> list[dict[str, Any]]:
    """Alive model hosts in the project's namespace, with what each holds (via Ray's state API)."""
    from ray.util.state import list_actors

    address = address or cluster_address()
    actors = list_actors(
        address=address, filters=[("state", "=", "ALIVE"), ("ray_namespace", "=", NAMESPACE)], limit=10_000
    )
    hosts = []
    for actor in actors:
        if not (actor.name or "").startswith(PREFIX):
            continue
        entry = {"name": actor.name, "actor_id": actor.actor_id, "pid": actor.pid, "node_id": actor.node_id}
        try:
            entry |= ray.get(ray.get_actor(actor.name, namespace=NAMESPACE).info.remote(), timeout=30)
        except Exception as err:  # a host that is restarting still gets listed
            entry["error"] = f"{type(err).__name__}: {err}"
        hosts.append(entry)
    return sorted(hosts, key=lambda h: h["name"])


def unload_hosts(names: list[str] | None = None) -> list[str]:
    """Kill model hosts (all in the namespace, or the named ones); returns the names killed."""
    targets = names if names is not None else [h["name"] for h in list_hosts()]
    killed = []
    for name in targets:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue
        forget_host(name)
        killed.append(name)
    return killed
