"""worldgen: compose generative models into worlds (graphs of task nodes → pipelines → stages → worlds)."""

from worldgen.block import Block, BlockConfig, ModelBlock, ModelRef
from worldgen.errors import (
    ConfigError,
    ExecutionError,
    GraphError,
    ModelLoadError,
    StepInFlightError,
    UnknownBlockTypeError,
    WorldgenError,
)
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.plan import Edge, Loop, Problem
from worldgen.ports import Aggregation, Port, PortKind
from worldgen.registry import block_class, block_types, create_block, register_block
from worldgen.stage import Stage
from worldgen.state import GenerationConfig, WorldContent, WorldState
from worldgen.templates import list_templates, register_template, template_params
from worldgen.world import StepReport, World

__version__ = "0.1.0"

__all__ = [
    "Aggregation",
    "Block",
    "BlockConfig",
    "ConfigError",
    "Edge",
    "ExecutionError",
    "Graph",
    "GraphError",
    "Loop",
    "ModelBlock",
    "ModelLoadError",
    "ModelRef",
    "Pipeline",
    "Port",
    "PortKind",
    "Problem",
    "UnknownBlockTypeError",
    "GenerationConfig",
    "Stage",
    "StepInFlightError",
    "StepReport",
    "World",
    "WorldContent",
    "WorldState",
    "WorldgenError",
    "block_class",
    "block_types",
    "create_block",
    "register_block",
    "list_templates",
    "register_template",
    "template_params",
]
