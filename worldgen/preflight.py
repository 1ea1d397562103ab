"""A run checked before it runs: every block's own constraints on the values it will get (`Block.check_inputs`)
and, for a server, its budgets (`Limits`). Nothing here loads weights or runs a model, so a request a server
cannot serve is refused in milliseconds with a ConfigError naming the input (a LimitExceeded naming the limit).

Only what is known before the run is checked: the run's inputs and the defaults of unfed ports. Values made by
other nodes (latents, embeddings) are the blocks' own business while they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.block import Block, Work
from worldgen.engine import Engine
from worldgen.errors import ConfigError
from worldgen.execution.local import check_inputs
from worldgen.limits import LimitExceeded, Limits
from worldgen.ports import PortKind


def preflight(
    engine: Engine,
    inputs: Mapping[str, Any] | None,
    *,
    iterations: int | None = None,
    limits: Limits | None = None,
) -> None:
    """Raise ConfigError (or GraphError for unknown/missing inputs) if `engine.run(inputs, iterations=...)`
    would be refused by one of its blocks, or would cost more than `limits` allow."""
    run_inputs = check_inputs(engine, inputs)
    if limits is not None:
        if iterations is not None and iterations > limits.max_iterations:
            raise LimitExceeded(
                "max_iterations",
                f"iterations {iterations} is over {limits.max_iterations}",
                path="iterations",
            )
        chars = sum(
            _text_chars(run_inputs.get(name))
            for name, port in engine.input_ports().items()
            if port.kind is PortKind.TEXT
        )
        if chars > limits.max_prompt_chars:
            raise LimitExceeded(
                "max_prompt_chars",
                f"the text inputs hold {chars:,} characters, over {limits.max_prompt_chars:,}",
                path="inputs",
            )
    _check_engine(engine, run_inputs, "inputs", "", iterations, limits)


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(v) for v in value if isinstance(v, str))
    return 0


def _check_engine(
    engine: Engine,
    known: Mapping[str, Any],
    where: str,
    nodes: str,
    iterations: int | None,
    limits: Limits | None,
) -> None:
    """Check every node of `engine` whose exposed inputs hold `known`; a nested engine is checked as a whole
    (one graph of a pipeline is one generation, with its own batch and budget). Errors name the run's input
    (`where.<input>`) or else the node's port (`nodes<node>.<port>`)."""
    plan = engine.plan()
    names = {target: name for name, ex in engine.exposed_inputs.items() for target in ex.targets}

    def place(node_id: str, port: str) -> str:
        name = names.get((node_id, port))
        return f"{where}.{name}" if name else ".".join(p for p in (f"{nodes}{node_id}", port) if p)

    work: dict[str, Work] = {}
    for node_id in engine.node_ids:
        item = engine.item(node_id)
        values: dict[str, Any] = {}
        for port_name, port in item.input_ports().items():
            if plan.incoming.get((node_id, port_name)):
                continue  # made by another node while the run runs
            fed = plan.exposed.get((node_id, port_name), [])
            if len(fed) == 1 and fed[0] in known:
                values[port_name] = known[fed[0]]
            elif not fed:
                values[port_name] = port.default
        if isinstance(item, Engine):
            _check_engine(item, values, f"{where}.{node_id}", f"{nodes}{node_id}.", iterations, limits)
            continue
        if not isinstance(item, Block):
            continue
        try:
            work[node_id] = item.check_inputs(values)
        except ConfigError as err:
            port = err.path or ""
            raise ConfigError(f"{err.detail} (node '{node_id}')", path=place(node_id, port)) from None
    count = _batch(work, place)
    _check_budget(work, count, iterations, limits, where)


def _batch(work: Mapping[str, Work], place: Any) -> int:
    """The batch all nodes of one graph must agree on: the one fixed by latents or images, else the longest
    list; a value of one item broadcasts to any batch."""
    fixed = {place(node, port): n for node, w in work.items() for port, n in w.batch.items()}
    items = {place(node, port): n for node, w in work.items() for port, n in w.items.items()}
    if len(set(fixed.values())) > 1:
        sizes = ", ".join(f"{name}: {n}" for name, n in fixed.items())
        raise ConfigError(f"the batch sizes disagree ({sizes})", path=next(iter(fixed)))
    batch = next(iter(fixed.values()), None)
    for name, n in items.items():
        if batch is None and n > 1:
            batch = n
        if n not in (1, batch):
            source = next((f" (set by {k})" for k, v in fixed.items() if v == batch), "")
            raise ConfigError(f"{n} items, but the batch is {batch}{source}", path=name)
    return batch or 1


def _check_budget(
    work: Mapping[str, Work], count: int, iterations: int | None, limits: Limits | None, where: str
) -> None:
    if limits is None or not work:
        return
    width = max((w.width for w in work.values() if w.width), default=0)
    height = max((w.height for w in work.values() if w.height), default=0)
    steps = max((w.steps for w in work.values() if w.steps), default=0)
    if steps and iterations is not None:
        steps = min(steps, iterations)  # the run stops its loops early
    if width or height or steps or count > 1:
        limits.check_generation(width=width, height=height, steps=steps, count=count, path=where)
