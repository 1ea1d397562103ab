"""The denoising loop every family's graph shares, written once:

    schedule -> backbone -> cfg -> solver
                   ^_________________|      (feedback edges: model input, timestep, latent, solver state)

`schedule` and `solver` hold the same solver block: its first call sets up the schedule (and scales or noises
the entering latent), the loop steps it. At iteration 0 the backbone takes the schedule's values, from then on
the solver's. A family adds its own conditioning edges into the backbone and what comes after the loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from worldgen.errors import ConfigError, did_you_mean
from worldgen.graph import Graph


def solver_type(solver: str) -> str:
    """The block type of a solver named as the templates name them ('ddim', 'euler', ...)."""
    from worldgen.nodes.diffusion import SOLVERS

    if solver not in SOLVERS:
        raise ConfigError(
            f"unknown solver '{solver}'{did_you_mean(solver, SOLVERS)}; available: {', '.join(SOLVERS)}",
            path="solver",
        )
    return SOLVERS[solver]


def add_denoising_loop(
    g: Graph,
    *,
    solver: str,
    solver_config: Mapping[str, Any],
    backbone: str,
    backbone_id: str,
    backbone_config: Mapping[str, Any],
    conditions: Iterable[tuple[str, str]],
    cfg_config: Mapping[str, Any],
) -> None:
    """Add the loop's nodes and edges. `solver` and `backbone` are block types; `conditions` are
    ("node.port", backbone port) edges from the family's conditioning nodes."""
    g.add_node(solver, id="schedule", config=dict(solver_config), auto_connect=False)
    g.add_node(backbone, id=backbone_id, config=dict(backbone_config), auto_connect=False)
    g.add_node("guidance/cfg", id="cfg", config=dict(cfg_config), auto_connect=False)
    g.add_node(g.block("schedule"), id="solver", auto_connect=False)
    b = backbone_id
    edges = [(source, f"{b}.{port}") for source, port in conditions] + [
        ("schedule.model_input", f"{b}.sample"),
        ("schedule.timestep", f"{b}.timestep"),
        ("schedule.latent", "solver.latent"),
        ("schedule.state", "solver.state"),
        (f"{b}.pred", "cfg.pred_cond"),
        (f"{b}.pred_uncond", "cfg.pred_uncond"),
        ("cfg.pred", "solver.pred"),
        # Feedback edges (they close the loop; at iteration 0 the schedule's values are used instead):
        ("solver.model_input", f"{b}.sample"),
        ("solver.timestep", f"{b}.timestep"),
        ("solver.latent", "solver.latent"),
        ("solver.state", "solver.state"),
    ]
    for source, target in edges:
        g.add_edge(source, target)
    g.expose_input("steps", "schedule.num_steps", default=None)
