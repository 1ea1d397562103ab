"""Stage: a role in the world cycle — a DAG of pipelines (or graphs) plus a contract on the world state.

The contract is fixed by the role (DESIGN.md §2.3, the CONTRACTS table below): which state blocks the stage
needs, which it writes, and so when it runs; what its output holds; whether it always runs, hears the action,
starts a state, selects a pipeline or saves the episode; how training learns it. The world, the stage and
training read those fields; nothing compares role names. The stage talks to the world through exposed ports with standard names:

| stage input      | fed with                                                              |
|------------------|-----------------------------------------------------------------------|
| `context`        | a mapping: state blocks, world content, action, step, pipelines, seed |
| `images`         | block 3's artifacts (paths of the PNG files)                          |
| `prompt`, `negative_prompt`, `width`, `height`, `steps`, `guidance_scale` | block 2 fields   |
| `image` + `strength`, `control_image` + `controlnet_scale`, `ip_adapter_image` + `ip_adapter_scale` | block 2's `reference`: an earlier episode's image (REFERENCE_INPUTS) |

| stage output | becomes                                                               |
|--------------|-----------------------------------------------------------------------|
| `text`       | the text block it writes (1, 4, 5) or, for World update, the new story |
| `data`       | block 2 (the Architect's validated generation config)                 |
| `image`      | block 3 (the Creator's images, saved as artifacts)                    |

The Creator holds one pipeline per name; block 2's `pipeline` field picks the one that runs, and block 2's
`reference` feeds it earlier images of the world (worldgen/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from worldgen.engine import Engine, Problem
from worldgen.errors import ConfigError, GraphError, did_you_mean
from worldgen.graph import Graph
from worldgen.pipeline import Pipeline
from worldgen.state import BLOCKS, WorldState


class Schema(Enum):
    """What a stage's output holds, and so how the world stores it (worldgen.world reads it by this)."""

    TEXT = "text"  # a string: a text block (1, 4, 5), or the world's new story
    GENERATION_CONFIG = "generation config"  # a mapping, validated as state.GenerationConfig (block 2)
    ARTIFACTS = (
        "artifacts"  # images, clips, sounds: block 2's requests run by their pipelines, saved (block 3)
    )


# The examples a role's episodes give (worldgen.training): "chat" an llm/transformers block's messages and the
# block it wrote; "caption" block 3's images and block 4 per image (a vlm/transformers block); "denoising"
# block 2's prompt and block 3's images (a diffusion backbone).
TrainedAs = Literal["chat", "caption", "denoising"]


@dataclass(frozen=True)
class Contract:
    """A role's behaviour in the cycle, as data: the world, the stage and training read these fields and
    never compare role names.

    reads             the blocks that must be filled for it to run
    writes            the block it fills (None: it changes the world's content, not the state)
    output            the stage output that carries what it writes
    output_schema     what that output holds (Schema), so how the world stores it
    always_runs       it runs on every step, whatever the state holds (else the execution rule decides)
    receives_action   the user's Action is in its context (no other role sees it)
    starts_state      what it writes begins a new state, which records the action it was started with
    selects_pipeline  block 2's `pipeline` picks the one of its pipelines that runs (else all run, wired)
    saves_episode     it saves the complete state as an episode; skipped, it drops an incomplete state
    feeds_references  block 2's references (earlier episodes' images) are fed to its pipeline (REFERENCE_INPUTS)
    trained_as        the examples its episodes give to training (TrainedAs); empty: it is not trained
    """

    reads: AbstractSet[int]
    writes: int | None
    output: str
    output_schema: Schema
    always_runs: bool = False
    receives_action: bool = False
    starts_state: bool = False
    selects_pipeline: bool = False
    saves_episode: bool = False
    feeds_references: bool = False
    trained_as: AbstractSet[TrainedAs] = frozenset()

    def __post_init__(self) -> None:  # the table writes sets; a contract holds them frozen (hashable)
        object.__setattr__(self, "reads", frozenset(self.reads))
        object.__setattr__(self, "trained_as", frozenset(self.trained_as))

    @property
    def sees(self) -> frozenset[int]:
        """The blocks the state holds when this role runs: a state fills in block order, so every block before
        the one it writes (all of them for a role that writes none)."""
        return frozenset(range(1, self.writes)) if self.writes is not None else frozenset(BLOCKS)


# The canon's cycle order and contracts (DESIGN.md §2.3): each role's behaviour in one table.
CYCLE = ("philosopher", "author", "world_update", "development", "architect", "creator")
CONTRACTS: dict[str, Contract] = {
    # role:          Contract(reads, writes, output, output_schema, behaviour flags…, trained_as)
    "philosopher": Contract({1, 2, 3}, 4, "text", Schema.TEXT, trained_as={"chat", "caption"}),
    "author": Contract({1, 2, 3, 4}, 5, "text", Schema.TEXT, trained_as={"chat"}),
    "world_update": Contract({1, 2, 3, 4, 5}, None, "text", Schema.TEXT, saves_episode=True),
    "development": Contract(
        set(),
        1,
        "text",
        Schema.TEXT,
        always_runs=True,
        receives_action=True,
        starts_state=True,
        trained_as={"chat"},
    ),
    "architect": Contract({1}, 2, "data", Schema.GENERATION_CONFIG, trained_as={"chat"}),
    "creator": Contract(
        {2},
        3,
        "image",
        Schema.ARTIFACTS,
        selects_pipeline=True,
        feeds_references=True,
        trained_as={"denoising"},
    ),
}

# The pipeline inputs a referenced image is fed through, by control (state.Control): (image input, its scale
# input, the Reference field that sets the scale). These are the names the adapter templates expose; a second
# reference of one control feeds `<input>_2` (e.g. `control_image_2` of a multi-ControlNet graph), and so on.
REFERENCE_INPUTS: dict[str, tuple[str, str, str]] = {
    "controlnet": ("control_image", "controlnet_scale", "scale"),
    "ip_adapter": ("ip_adapter_image", "ip_adapter_scale", "scale"),
    "img2img": ("image", "strength", "strength"),
}


KINDS = ("image", "video", "audio")  # what a Creator's pipeline makes: the output it exposes by that name
# the input an image-to-video pipeline takes a clip's first frame from (block 2's `source`)
SOURCE_INPUT = "image"


def pipeline_kind(engine: Engine) -> str:
    """What a pipeline makes, from its outputs: a `video` or `audio` output, else images."""
    outputs = engine.exposed_outputs
    return next((kind for kind in KINDS[1:] if kind in outputs), "image")


def reference_input(name: str, k: int) -> str:
    """The input the k-th (1-based) reference of a control feeds: `name`, then `name_2`, `name_3`, ..."""
    return name if k == 1 else f"{name}_{k}"


def role_that(test: Callable[[Contract], bool]) -> str:
    """The one role whose contract passes `test`: how code finds a role by what it does, not by its name
    (`role_that(lambda c: c.selects_pipeline)` is the Creator)."""
    found = [role for role in CYCLE if test(CONTRACTS[role])]
    if len(found) != 1:
        raise GraphError(
            f"expected exactly one role to match, found {found or 'none'} (worldgen.stage.CONTRACTS)"
        )
    return found[0]


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
        return self.contract.selects_pipeline

    def should_run(self, state: WorldState) -> bool:
        """The execution rule: the blocks it needs are filled and the block it writes is still empty (a role
        that always runs, Development, runs whatever the state holds)."""
        if self.contract.always_runs:
            return True
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

    def controls(self) -> dict[str, list[str]]:
        """For each of its pipelines, the controls a reference may give it: those whose image input it
        exposes (REFERENCE_INPUTS), for image pipelines (a clip's `image` is its source, not a reference). Shown
        to the Architect, so it asks only for what a pipeline can take."""
        kinds = self.kinds()
        return {
            name: [
                c
                for c, (image, _, _) in REFERENCE_INPUTS.items()
                if kinds[name] == "image" and image in self.item(name).exposed_inputs
            ]
            for name in self.node_ids
        }

    def kinds(self) -> dict[str, str]:
        """What each of its pipelines makes: image, video or audio (worldgen.creation.pipeline_kind). Shown to
        the Architect, so it asks each pipeline for what it can make."""
        return {name: pipeline_kind(self.item(name)) for name in self.node_ids}

    def sources(self) -> list[str]:
        """Its video pipelines that start a clip from an image (block 2's `source` feeds their input)."""
        kinds = self.kinds()
        return [
            n for n in self.node_ids if kinds[n] == "video" and SOURCE_INPUT in self.item(n).exposed_inputs
        ]

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
