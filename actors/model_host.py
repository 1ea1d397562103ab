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
from collections.abc import Mapping
from typing import Any

import ray

from actors.cluster import (
    NAMESPACE,
    actor_placed,
    ask_named,
    get_named,
    kill_named,
    may_add_nodes,
    named_actors,
    set_torch_threads,
)
from actors.placement import (
    HostResources,
    InfeasiblePlacement,
    cluster_nodes,
    gpu_memory_from_env,
    host_resources,
)
from worldgen.block import Block, ModelBlock
from worldgen.callbacks import RunOptions
from worldgen.errors import WorldgenError
from worldgen.execution.local import call_in_port_order, in_port_order, run_local
from worldgen.limits import DEFAULT_LIMITS, Deadline, current_deadline, current_limits, within
from worldgen.model_ref import ModelRef, Placement

PREFIX = "wg-model-"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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

    def __init__(
        self, ref: dict[str, Any], class_path: str, model: Any = None, sizing: dict[str, Any] | None = None
    ):
        import torch

        from worldgen.models.loading import load_component, resolve_dtype
        from worldgen.models.runtime import apply_runtime

        self.ref = ModelRef(**ref)
        self.class_path = class_path
        self.sizing = sizing or {}
        reserved = self.sizing.get("num_cpus", self.ref.placement.num_cpus)
        set_torch_threads(reserved)
        self.device = host_device(self.ref.device)
        started = time.perf_counter()
        if model is None:
            model = load_component(self.ref, _import(class_path), device=self.device)
        elif isinstance(
            model, torch.nn.Module
        ):  # handed over: to this host's device, and its runtime options
            model = model.to(self.device, resolve_dtype(self.ref.dtype, self.device))
            model = apply_runtime(model, self.ref.runtime, f"model '{self.ref.source}'")
        self.model = model
        # On a GPU, calls run under inference mode (no autograd bookkeeping, no version counters); on a CPU they
        # stay as they are (no_grad in the blocks), so CPU runs match the local executor exactly.
        self.inference_mode = self.device.type == "cuda"
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

    def call(
        self,
        block: Block,
        node_id: str,
        ports: tuple[str, ...],
        deadline: Deadline | None = None,
        **inputs: Any,
    ) -> Any:
        """Run one block; returns its outputs in `ports` order (one value when there is one port). A call
        queued past the caller's `deadline` fails at once instead of running for a run that has ended."""
        import torch

        if deadline is not None:
            deadline.check()
        self.calls += 1
        with torch.inference_mode(self.inference_mode):
            return call_in_port_order(self._bind(block), node_id, ports, inputs, " on its model host")

    def run_subgraph(
        self,
        key: str,
        graph: Any,
        ports: tuple[str, ...],
        seed: int | None,
        iterations: int | None,
        deadline: Deadline | None = None,
        **inputs: Any,
    ) -> Any:
        """Run a whole (loop) subgraph here with the local executor; outputs in `ports` order. Under the
        caller's `deadline` the loop stops between iterations once it has passed (DeadlineExceeded)."""
        import torch

        self.calls += 1
        if key not in self._subgraphs:
            for node_id, block in graph.blocks():
                graph.replace_block(node_id, self._bind(block))
            self._subgraphs[key] = graph
        with within(deadline), torch.inference_mode(self.inference_mode):
            options = RunOptions(seed=seed, iterations=iterations)
            outputs = run_local(self._subgraphs[key], inputs, options)  # errors name the node
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
            "device": str(self.device),
            "dtype": str(getattr(self.model, "dtype", "")).removeprefix("torch.") or None,
            "inference_mode": self.inference_mode,
            "placement": self.sizing,  # what the host asked Ray for, and why
            "adapters": sorted(getattr(self.model, "__dict__", {}).get("_worldgen_adapters", ())),
            "pid": os.getpid(),
        }


def host_device(device: str | None) -> Any:
    """The device this host process puts its model on: the reference's, else CUDA when Ray gave this actor a
    GPU (share) and torch sees one, else the CPU. Ray (2.60) leaves CUDA_VISIBLE_DEVICES alone for an actor
    without GPUs, so torch would see the node's GPUs: a CPU host must not use a GPU it did not reserve."""
    import torch

    if device:
        return torch.device(device)
    assigned = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return torch.device("cuda" if assigned and torch.cuda.is_available() else "cpu")


class HostedBlock(Block):
    """A weight-holding block of a fused loop whose model lives on another host (a ControlNet beside the UNet):
    the loop runs on the backbone's host and calls this block's own host once per iteration, so each model
    stays loaded once cluster-wide. It has the block's ports and checks; only the call travels."""

    def __init__(self, block: ModelBlock, node_id: str, host: Any):
        self.config = block.config
        self.inner, self.node_id, self.host = block, node_id, host
        # Its own cache key on the backbone's host (`block_key`): never bound to that host's model.
        self.block_type = f"{block.block_type}@{host_name(block)}"

    def input_ports(self) -> dict[str, Any]:
        return self.inner.input_ports()

    def output_ports(self) -> dict[str, Any]:
        return self.inner.output_ports()

    def check_inputs(self, inputs: Mapping[str, Any]) -> Any:
        return self.inner.check_inputs(inputs)

    def loop_iterations(self, inputs: Mapping[str, Any]) -> int | None:
        return self.inner.loop_iterations(inputs)

    def forward(self, **inputs: Any) -> dict[str, Any]:
        ports = tuple(self.inner.output_ports())
        ref = self.host.call.options(num_returns=len(ports)).remote(
            self.inner, self.node_id, ports, current_deadline(), **inputs
        )
        try:
            values = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, WorldgenError):  # a clear error of the block: keep it as it is
                raise err.cause from None
            raise
        return dict(zip(ports, values if len(ports) > 1 else [values], strict=True))


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
            handle = get_named(name)
        except ValueError:
            model = ray.put(block.model)
    if handle is None:
        sized = plan_host(block)
        placement = sized.placement
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
        if placement.resources:
            options["resources"] = dict(placement.resources)
        fits = fits_a_node(block, placement)  # before creating: Ray would keep an unplaceable host pending
        handle = ModelHost.options(**options).remote(
            ref.model_dump(mode="json"), _class_path(block.model_class()), model, sized.info()
        )
        if not fits:  # only a node the cluster adds can take it: wait for one, but not forever
            _await_placement(handle, block, placement)
    _handles[name] = handle
    return handle


# ---- placement -----------------------------------------------------------------------------------------
def plan_host(block: ModelBlock) -> HostResources:
    """What the host of this block's model reserves on the connected cluster (actors/placement.py): the
    placement as given, or a GPU share sized from the model's bytes. The model is sized only when a share is
    to be sized (a GPU cluster, or mode gpu), from its files; weights handed over are counted as they are."""
    placement = block.config.model.placement
    nodes = cluster_nodes()
    sized_needed = placement.mode != "cpu" and not (placement.num_gpus > 0 or placement.memory)
    has_gpu = any(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    grow = placement.mode == "gpu" and not has_gpu and sized_needed and may_add_nodes()
    size = _model_bytes(block) if sized_needed and (has_gpu or grow) else None
    return host_resources(
        placement, size, nodes, may_grow=grow, who=_who(block), default_gpu_memory_gb=gpu_memory_from_env()
    )


def _model_bytes(block: ModelBlock) -> int | None:
    from worldgen.models.sizing import dtype_bytes, model_bytes

    ref = block.config.model
    if block.model_origin is not None:  # weights from a checkpoint, in memory: count them
        import torch

        model = block.model
        if not isinstance(model, torch.nn.Module):
            return 0
        element = dtype_bytes(ref.dtype)
        return sum(
            t.numel() * (element if t.is_floating_point() else t.element_size())
            for t in model.state_dict().values()
        )
    return model_bytes(ref, block.model_class())


def placement_request(placement: Placement) -> dict[str, float]:
    """The resources a host with this placement reserves, by Ray's resource names (zero amounts left out)."""
    request = {"CPU": placement.num_cpus, "GPU": placement.num_gpus, **placement.resources}
    if placement.memory:
        request["memory"] = float(placement.memory)
    return {name: amount for name, amount in request.items() if amount}


def fits_a_node(block: ModelBlock, placement: Placement) -> bool:
    """True when one alive node has every resource of the request (a host runs on one node). Otherwise raises
    InfeasiblePlacement at once, unless the cluster may add nodes: then False (the caller waits for one)."""
    request = placement_request(placement)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in request.items()) for node in nodes):
        return True
    if may_add_nodes():
        return False
    raise InfeasiblePlacement(_no_node_message(block, request, nodes))


def _await_placement(handle: Any, block: ModelBlock, placement: Placement) -> None:
    """Wait until the new host is placed on a node (its model may still be loading), at most the placement
    wait (the run's limits, or the default), and within the run's deadline; then kill it and raise."""
    deadline = current_deadline()
    seconds = (current_limits() or DEFAULT_LIMITS).placement_seconds  # no limits (the CLI): the default wait
    wait = seconds if deadline is None else min(seconds, max(deadline.remaining(), 0.0))
    until = time.time() + wait
    while True:
        placed = actor_placed(handle)
        if placed is None or placed:  # None: no state API (no dashboard), cannot tell; leave it to Ray
            return
        if time.time() >= until:
            break
        time.sleep(0.5)
    ray.kill(handle, no_restart=True)
    forget_host(host_name(block))
    if deadline is not None and deadline.remaining() <= 0:
        raise deadline.exceeded()
    request = placement_request(placement)
    raise InfeasiblePlacement(
        f"{_who(block)} asks for {_resources(request)}; no node that has it joined the cluster within "
        f"{seconds:g} s (limit 'placement_seconds'), so the host was removed"
    )


def _who(block: ModelBlock) -> str:
    return f"the model host of {block.block_type} (model {block.config.model.source!r})"


def _resources(request: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(request.items())) + "}"


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB"
    return f"{value:g}"


def _no_node_message(block: ModelBlock, request: dict[str, float], nodes: list[dict[str, float]]) -> str:
    shown = [
        _resources({k: v for k, v in node.items() if k in ("CPU", "GPU", "memory") or k in request})
        for node in nodes
    ]
    return (
        f"{_who(block)} asks for {_resources(request)} (its `placement`), and no node of this cluster has that "
        f"(one node must have all of it); the nodes have: {'; '.join(shown) or 'no alive node'}. Lower the "
        "placement or add a node that fits"
    )


def forget_host(name: str | None = None) -> None:
    """Drop cached handles (all, or one) so the next use looks the actor up again."""
    if name is None:
        _handles.clear()
    else:
        _handles.pop(name, None)


def list_hosts(address: str | None = None) -> list[dict[str, Any]]:
    """Alive model hosts in the project's namespace, with what each holds (via Ray's state API)."""
    hosts = []
    for actor in named_actors(PREFIX, address=address, alive_only=True):
        entry = {"name": actor.name, "actor_id": actor.actor_id, "pid": actor.pid, "node_id": actor.node_id}
        try:
            entry |= ask_named(actor.name, "info")
        except Exception as err:  # a host that is restarting still gets listed
            entry["error"] = f"{type(err).__name__}: {err}"
        hosts.append(entry)
    return sorted(hosts, key=lambda h: h["name"])


def unload_hosts(names: list[str] | None = None) -> list[str]:
    """Kill model hosts (all in the namespace, or the named ones); returns the names killed."""
    targets = names if names is not None else [h["name"] for h in list_hosts()]
    killed = kill_named(targets)
    for name in killed:
        forget_host(name)
    return killed
