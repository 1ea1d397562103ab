"""The Ray executor: light blocks run as Ray tasks, weight-holding blocks on their model host actors, edges
travel as ObjectRefs (so independent nodes run in parallel), and pipelines unfold into one DAG of Ray tasks
chained by ObjectRefs. A loop whose models all live on one host runs there as a single call (loop fusion); a
loop of a backbone and adapters on other hosts (a UNet and its ControlNets) runs on the backbone's host, which
calls the adapters' hosts each iteration.

Same seed → same result as the local executor: random state travels on `rng` ports, never in a process.

A run under a deadline (worldgen.limits, e.g. a world stage's `stage_seconds`) waits for Ray at most until it,
and hands it to every task and host call it submits: one that starts past it fails at once (and so does all
that depends on it), a fused loop on a model host stops between iterations. Nothing is `ray.cancel`led:
cancelling a chain of tasks while they complete crashes the driver's core worker in Ray 2.60 ("Tried to
complete task that was not pending"), and work that checks the deadline itself stops as soon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray

from actors.cluster import connect
from actors.model_host import HostedBlock, block_key, forget_host, host_for, host_name
from worldgen.block import Block, ModelBlock
from worldgen.callbacks import RunOptions
from worldgen.engine import Engine
from worldgen.errors import ExecutionError, WorldgenError
from worldgen.execution.local import call_in_port_order, check_inputs, loop_iterations
from worldgen.graph import Graph
from worldgen.limits import Deadline, check_deadline, current_deadline
from worldgen.plan import Loop, gather_inputs
from worldgen.ports import AGGREGATORS, Aggregation

# Past a deadline, how long to wait for work that stops on its own: a fused loop on a host then reports the
# node and iteration it stopped at, which says more than "the wait timed out".
_GRACE_SECONDS = 1.0


def _get(refs: Any) -> Any:
    """`ray.get`, waiting no longer than the run's deadline (plus the grace); past it, DeadlineExceeded."""
    deadline = current_deadline()
    if deadline is None:
        return ray.get(refs)
    try:
        return ray.get(refs, timeout=max(deadline.remaining(), 0.0) + _GRACE_SECONDS)
    except ray.exceptions.GetTimeoutError:
        raise deadline.exceeded() from None


# ---- tasks -------------------------------------------------------------------------------------------
_worker_blocks: dict[str, Block] = {}


@dataclass(frozen=True)
class _Gather:
    """Several ObjectRefs for one aggregating port: resolved and combined inside the task."""

    policy: Aggregation
    refs: tuple


@ray.remote
def _run_block(
    call: tuple[Block, str, tuple[str, ...], dict[str, Any], Deadline | None], **upstream: Any
) -> Any:
    """`call` = (block, node id, output ports, plain inputs, the run's deadline) in one argument (each task
    argument costs a serialisation of its own); inputs that are ObjectRefs come as `upstream`, resolved by Ray
    before the call."""
    block, node_id, ports, inputs, deadline = call
    if deadline is not None:
        deadline.check()  # the run has ended: fail fast, and so does every task waiting on this one
    # One instance per block behaviour per worker process: what a block caches (a scheduler config) stays.
    block = _worker_blocks.setdefault(block_key(block), block)
    return call_in_port_order(block, node_id, ports, _resolve_local(inputs | upstream))


# ---- submission --------------------------------------------------------------------------------------
@dataclass
class _Submitted:
    node_id: str
    iteration: int | None
    refs: dict[str, Any]


class _Run:
    """One run's submission state: the ObjectRefs of every node output, in plan order."""

    def __init__(self, seed: int | None, iterations: int | None, fuse_loops: bool):
        from worldgen.rng import RngState

        self.seed, self.iterations, self.fuse_loops = seed, iterations, fuse_loops
        self.seeded = RngState.seeded(seed) if seed is not None else None
        self.submitted: list[_Submitted] = []

    def unfed_rng(self):
        return self.seeded

    def gather(self, engine: Engine, node_id: str, values, inputs, **kw) -> dict[str, Any]:
        return gather_inputs(
            engine,
            node_id,
            values,
            inputs,
            unfed_rng=self.unfed_rng if self.seeded else None,
            combine=lambda port, found: _Gather(port.aggregate, tuple(found)),
            **kw,
        )

    def submit_block(self, node_id: str, block: Block, kwargs: dict[str, Any]) -> dict[str, Any]:
        ports = tuple(block.output_ports())
        if isinstance(block, ModelBlock) and not block.inline:
            ref = (
                host_for(block)
                .call.options(num_returns=len(ports))
                .remote(block, node_id, ports, current_deadline(), **_resolve_local(kwargs))
            )
        elif block.inline:  # cheaper than a task: run here on the (fetched) inputs; outputs stay plain values
            ref = call_in_port_order(block, node_id, ports, _resolve_local(kwargs, fetch=True))
        else:  # light blocks are a few hundred bytes: passed inline, which beats an object-store round trip
            upstream = {k: v for k, v in kwargs.items() if isinstance(v, ray.ObjectRef)}
            plain = {k: v for k, v in kwargs.items() if k not in upstream}
            ref = _run_block.options(num_returns=len(ports)).remote(
                (block, node_id, ports, plain, current_deadline()), **upstream
            )
        refs = [ref] if len(ports) == 1 else list(ref)
        return dict(zip(ports, refs, strict=True))

    def submit(self, engine: Engine, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Submit every node of `engine` (recursively for graphs in a pipeline); returns output refs."""
        plan = engine.plan()
        inputs = check_inputs(engine, inputs)
        values: dict[str, dict[str, Any]] = {}
        for step in plan.steps:
            if step.loop is None:
                (node_id,) = step.nodes
                kwargs = self.gather(engine, node_id, values, inputs)
                item = engine.item(node_id)
                if isinstance(item, Engine):
                    values[node_id] = self.submit(item, kwargs)
                else:
                    values[node_id] = self.submit_block(node_id, item, kwargs)
                self.submitted.append(_Submitted(node_id, None, values[node_id]))
            elif self.fuse_loops and isinstance(engine, Graph) and (fusion := _fusion(engine, step.loop)):
                self.submit_fused(engine, step.loop, fusion, values, inputs)
            else:
                n = self.loop_count(engine, step.loop, values, inputs)
                for i in range(n):
                    check_deadline()  # a long loop takes a while to submit
                    for node_id in step.loop.order:
                        kwargs = self.gather(engine, node_id, values, inputs, loop=step.loop, iteration=i)
                        values[node_id] = self.submit_block(node_id, engine.item(node_id), kwargs)
                        self.submitted.append(_Submitted(node_id, i, values[node_id]))
        return {name: values[node][port] for name, (node, port) in engine.exposed_outputs.items()}

    def loop_count(self, engine: Engine, loop: Loop, values, inputs) -> int:
        def entering(node_id: str) -> dict[str, Any]:
            gathered = self.gather(engine, node_id, values, inputs, loop=loop, outside_only=True)
            return _resolve_local(gathered, fetch=True)

        return loop_iterations(engine, loop, values, inputs, self.iterations, entering)

    def submit_fused(self, graph: Graph, loop: Loop, fusion: _Fusion, values, inputs) -> None:
        host = fusion.host
        sub, entering, leaving = graph.extract(loop.order)
        kwargs: dict[str, Any] = {}
        for node_id in loop.order:
            outside = self.gather(graph, node_id, values, inputs, loop=loop, outside_only=True)
            kwargs |= {name: outside[port] for name, (node, port) in entering.items() if node == node_id}
        key = hashlib.sha1(repr(sub.to_config()).encode()).hexdigest()
        for node_id, other in fusion.called.items():  # models of other hosts: called there, per iteration
            sub.replace_block(node_id, HostedBlock(sub.block(node_id), node_id, other))
        ports = tuple(leaving)
        ref = host.run_subgraph.options(num_returns=len(ports)).remote(
            key, sub, ports, self.seed, self.iterations, current_deadline(), **_resolve_local(kwargs)
        )
        refs = [ref] if len(ports) == 1 else list(ref)
        for name, out in zip(ports, refs, strict=True):
            node, port = leaving[name]
            values.setdefault(node, {})[port] = out
        self.submitted.append(_Submitted(loop.order[-1], None, dict(zip(ports, refs, strict=True))))


def _resolve_local(kwargs: dict[str, Any], fetch: bool = False) -> dict[str, Any]:
    """Aggregated refs resolved and combined (inside a task, or here before an actor call); `fetch` also gets
    plain refs."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, _Gather):  # refs of tasks and hosts, plain values of inline blocks
            refs = [r for r in v.refs if isinstance(r, ray.ObjectRef)]
            got = iter(_get(refs) if refs else ())
            v = AGGREGATORS[v.policy]([next(got) if isinstance(r, ray.ObjectRef) else r for r in v.refs])
        elif fetch and isinstance(v, ray.ObjectRef):
            v = _get(v)
        out[k] = v
    return out


@dataclass(frozen=True)
class _Fusion:
    """Where a fused loop runs (`host`), and the loop's nodes whose models live on other hosts (`called`: node
    -> its host), which the loop calls there each iteration."""

    host: Any
    called: dict[str, Any]


def _fusion(graph: Graph, loop: Loop) -> _Fusion | None:
    """How the loop runs as one host call, or None (then it runs unfused, node by node).

    All its models on one host: there. Models on several hosts: on the backbone's host, when one backbone
    holds the loop (the weight-heavy, every-step model) and the others are adapters beside it (ControlNets);
    those are called on their own hosts, so no model is loaded a second time."""
    models = {n: graph.item(n) for n in loop.order if isinstance(graph.item(n), ModelBlock)}
    if not models:
        return None
    names = {n: host_name(b) for n, b in models.items()}
    backbones = {names[n] for n, b in models.items() if b.role == "backbone"}
    if len(set(names.values())) == 1:
        home = next(iter(names.values()))
    elif len(backbones) == 1:
        home = next(iter(backbones))
    else:
        return None
    plan = graph.plan()
    for node_id in loop.order:  # an aggregating port fed from outside cannot become one subgraph input
        for port_name, port in graph.item(node_id).input_ports().items():
            outside = [e for e in plan.incoming.get((node_id, port_name), []) if e.source not in loop.nodes]
            if (
                port.aggregate is not None
                and len(outside) + len(plan.exposed.get((node_id, port_name), [])) > 1
            ):
                return None
    host = host_for(next(b for n, b in models.items() if names[n] == home))
    called = {n: host_for(b) for n, b in models.items() if names[n] != home}
    return _Fusion(host, called)


# ---- entry point -------------------------------------------------------------------------------------
def run_ray(
    engine: Engine, inputs: Mapping[str, Any] | None = None, options: RunOptions | None = None
) -> dict[str, Any]:
    """Run a graph or pipeline on Ray and return its exposed outputs (fetched to the caller): the `ray`
    executor (entry point `worldgen.executors`). Connects to Ray first when this process is not connected."""
    connect()
    options = options or RunOptions()
    run = _Run(options.seed, options.iterations, options.fuse_loops)
    callbacks = options.run_callbacks(engine.name)
    try:
        outputs = run.submit(engine, dict(inputs or {}))
        for item in run.submitted if callbacks else ():
            _get([r for r in item.refs.values() if isinstance(r, ray.ObjectRef)])
            for cb in callbacks:
                cb.on_node_end(item.node_id, item.iteration, item.refs)
        values = [_get(v) if isinstance(v, ray.ObjectRef) else v for v in outputs.values()]
    except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as err:
        forget_host()  # the next run looks hosts up again (Ray restarts them, or a new one is created)
        actor = getattr(err, "actor_id", None) or "?"
        raise ExecutionError(
            f"{engine.level} '{engine.name}': a model host actor died during the run ({type(err).__name__}, "
            f"actor {actor}); it is restarted with its model reloaded, so running again is safe"
        ) from None
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, WorldgenError) else None
        raise (
            cause or ExecutionError(f"{engine.level} '{engine.name}' failed: {_first_line(err)}")
        ) from None
    return dict(zip(outputs, values, strict=True))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
