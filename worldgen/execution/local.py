"""The local executor: reference semantics for every level, and what runs inside a fused Ray loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from worldgen.block import Block
from worldgen.callbacks import RunOptions
from worldgen.engine import Engine
from worldgen.errors import ExecutionError, GraphError, WorldgenError, did_you_mean
from worldgen.limits import check_deadline
from worldgen.plan import Loop, gather_inputs


def check_inputs(engine: Engine, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's inputs with defaults filled in; unknown or missing names are errors that say which."""
    inputs = dict(inputs or {})
    exposed = engine.exposed_inputs
    for name in inputs:
        if name not in exposed:
            raise GraphError(
                f"{engine.level} '{engine.name}' has no input '{name}'{did_you_mean(name, exposed)}; "
                f"its inputs are: {', '.join(exposed) or '(none)'}"
            )
    ports = engine.input_ports()
    for name, ex in exposed.items():
        if name in inputs:
            continue
        if ex.optional:
            inputs[name] = ex.default
        elif not ports[name].optional:
            raise GraphError(
                f"{engine.level} '{engine.name}' needs input '{name}' ({ports[name].kind.value})"
            )
    return inputs


def loop_iterations(
    engine: Engine,
    loop: Loop,
    values: Mapping,
    inputs: Mapping,
    override: int | None,
    entering: Callable[[str], Mapping[str, Any]] | None = None,
) -> int:
    """N for one loop: the run's override, else what a block in the loop says (e.g. the solver's schedule).

    `entering(node_id)` gives the values entering the loop at that node (default: gathered from `values`); it
    is only asked for blocks that can size a loop (a remote executor fetches those values for them).
    """
    if override is not None:
        return int(override)
    for node_id in loop.order:
        item = engine.item(node_id)
        if type(item).loop_iterations is Block.loop_iterations:
            continue
        if entering is None:
            kwargs = gather_inputs(engine, node_id, values, inputs, loop=loop, outside_only=True)
        else:
            kwargs = entering(node_id)
        n = item.loop_iterations(kwargs)
        if n is not None:
            return int(n)
    raise GraphError(
        f"loop {', '.join(loop.order)} in {engine.level} '{engine.name}' needs an iteration count: pass "
        "iterations=N to run(), or put a block that defines it (a solver) in the loop"
    )


def call_node(
    engine: Engine, node_id: str, kwargs: dict[str, Any], iteration: int | None, options: RunOptions
) -> dict[str, Any]:
    """Call one node's item (a block, or a whole graph in a pipeline), naming the node in any failure.

    A run under a deadline (worldgen.limits) stops here, before the next node call or loop iteration, once
    the deadline has passed (cooperative: a call already running is not interrupted)."""
    item = engine.item(node_id)
    where = f"node '{node_id}'" + (f" (loop iteration {iteration})" if iteration is not None else "")
    try:
        check_deadline()
        outputs = run_local(item, kwargs, options) if isinstance(item, Engine) else item(**kwargs)
    except WorldgenError as err:
        err.args = (f"{where}: {err}",)  # keep the error's type; say where it happened
        raise
    except Exception as err:
        raise ExecutionError(
            f"{where} of {engine.level} '{engine.name}' failed: {type(err).__name__}: {err}"
        ) from err
    missing = set(item.output_ports()) - set(outputs)
    if missing:
        raise ExecutionError(f"{where} returned no value for output(s) {sorted(missing)}")
    return outputs


def call_in_port_order(
    block: Any, node_id: str, ports: tuple[str, ...], inputs: dict[str, Any], where: str = ""
) -> Any:
    """Call a block for a remote caller: outputs in `ports` order (a single value for one port); failures
    become ExecutionErrors naming the node. Used by Ray tasks and model hosts (one return per port)."""
    try:
        outputs = block(**inputs)
    except Exception as err:
        raise ExecutionError(
            f"node '{node_id}' ({block.block_type}) failed{where}: {type(err).__name__}: {err}"
        ) from err
    return in_port_order(outputs, ports)


def in_port_order(outputs: Mapping[str, Any], ports: tuple[str, ...]) -> Any:
    """Outputs as a remote call returns them (one return per port): a single value for one port, else a tuple."""
    values = tuple(outputs[p] for p in ports)
    return values[0] if len(values) == 1 else values


def run_local(
    engine: Engine, inputs: Mapping[str, Any] | None = None, options: RunOptions | None = None
) -> dict[str, Any]:
    """Run an engine in-process in plan order and return its exposed outputs (the `local` executor).

    `options.fuse_loops` changes nothing here: every loop already runs in-process."""
    options = options or RunOptions()
    plan = engine.plan()
    run_inputs = check_inputs(engine, inputs)
    callbacks = options.run_callbacks(engine.name)
    inner = options.nested(callbacks)  # graphs inside a pipeline report to the same callbacks
    unfed_rng = None
    if options.seed is not None:
        from worldgen.rng import RngState

        seeded = RngState.seeded(options.seed)  # immutable: every unfed rng input may share it

        def unfed_rng():
            return seeded

    values: dict[str, dict[str, Any]] = {}
    for step in plan.steps:
        if step.loop is None:
            (node_id,) = step.nodes
            kwargs = gather_inputs(engine, node_id, values, run_inputs, unfed_rng=unfed_rng)
            values[node_id] = call_node(engine, node_id, kwargs, None, inner)
            for cb in callbacks:
                cb.on_node_end(node_id, None, values[node_id])
            continue
        loop = step.loop
        n = loop_iterations(engine, loop, values, run_inputs, options.iterations)
        for cb in callbacks:
            cb.on_loop_start(loop, n)
        for i in range(n):
            for node_id in loop.order:
                kwargs = gather_inputs(
                    engine, node_id, values, run_inputs, loop=loop, iteration=i, unfed_rng=unfed_rng
                )
                values[node_id] = call_node(engine, node_id, kwargs, i, inner)
                for cb in callbacks:
                    cb.on_node_end(node_id, i, values[node_id])
            for cb in callbacks:
                cb.on_loop_iteration(loop, i, n)
    return {name: values[node][port] for name, (node, port) in engine.exposed_outputs.items()}
