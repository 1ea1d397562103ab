"""Per-role supervision from episodes: what each stage was given, and what the episode says it should produce.

| role        | input                                                  | target                       |
|-------------|--------------------------------------------------------|------------------------------|
| development | the messages Development's LLM got (world content)     | block 1                      |
| architect   | the messages the Architect's LLM got (block 1 + world) | block 2, as JSON             |
| creator     | block 2's prompt, negative prompt, size (+ frames, the | block 3's images and clips   |
|             | clip's source image)                                   |                              |
| philosopher | block 3's images (+ the VLM's prompt), or its messages | block 4 (per image for VLMs) |
| author      | the messages the Author's LLM got (blocks 1-4 + world) | block 5                      |

Which roles are trained, and as what, is their contract's `trained_as` (worldgen.stage.CONTRACTS): "chat" an
`llm/transformers` block, "caption" a `vlm/transformers` captioner (the Philosopher), "denoising" a diffusion
backbone (the Creator). Only a role whose stage holds such a block yields examples: an `llm/template` or
`vlm/image_stats` stage has nothing to train; World update is not trained.

The messages are rebuilt the way the world builds them — `worldgen.world.stage_context` and `world_inputs`,
then the LLM block's own `messages()` — for the state as it stood when the stage ran (Development saw an empty
state, the Architect block 1, the Philosopher and Author blocks 1-3 / 1-4 with block 3 at its in-flight paths),
the step it ran in (from meta.json's `step`: Development, Architect and Creator ran the step before World update
saved the episode), the action (Development only) and the world's content then. An episode does not record
the content; `meta.json`'s `content` is used when given (exact), else it is rebuilt: the world's initial
content, with `history` the outcomes of the episodes before it (exact when all of the world's episodes are
passed, oldest first) and `story` the initial story (the world keeps only its latest story; using that one
would show the model the future of the episodes it learns from).

Examples hold plain data (tensors, strings) and name their block by its world path (`development.main.llm`, as
`World.named_blocks()` names it), so they can be shipped to training workers that rebuild the same world.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worldgen.block import Block
from worldgen.engine import Engine
from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.stage import CONTRACTS, CYCLE, Schema, role_that
from worldgen.state import WorldContent, WorldState
from worldgen.storage import EpisodeFolder
from worldgen.training.episodes import Episode, read_episode
from worldgen.world import stage_context, stage_seed, world_inputs

__all__ = [
    "TRAINED_ROLES",
    "CaptionExample",
    "DiffusionBlocks",
    "Example",
    "ImageExample",
    "TextExample",
    "VideoExample",
    "build_examples",
    "diffusion_blocks",
    "episode_content",
    "find_block",
    "role_context",
    "role_examples",
    "stage_llm",
    "trainable_roles",
]

Message = dict[str, str]
# The roles whose contract trains them, in the order an episode's blocks were written (development first).
TRAINED_ROLES = tuple(
    sorted((r for r in CYCLE if CONTRACTS[r].trained_as), key=lambda r: CONTRACTS[r].writes or 0)
)
_NUMBERED = re.compile(r"^(?:Image|Video|Audio) (\d+): ", re.MULTILINE)


@dataclass(frozen=True)
class TextExample:
    """A local LLM's chat (as the stage sent it) and the answer the episode holds."""

    role: str
    episode: int
    block: str  # world path of the llm/transformers block
    messages: list[Message]
    target: str


@dataclass(frozen=True)
class CaptionExample:
    """One image of block 3 and what block 4 says about it (for a `vlm/transformers` Philosopher)."""

    role: str
    episode: int
    block: str  # world path of the vlm/transformers block
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    prompt: str | None
    target: str


@dataclass(frozen=True)
class ImageExample:
    """One image of block 3 and the generation config (block 2) it was made from."""

    role: str
    episode: int
    pipeline: str  # the Creator pipeline block 2 names
    prompt: str
    negative_prompt: str
    image: torch.Tensor  # (1, 3, height, width) in [0, 1]
    width: int
    height: int
    guidance: float


@dataclass(frozen=True)
class VideoExample:
    """One clip of block 3 and the video request (block 2) it was made from; for an image-to-video pipeline also
    the image it started from (the request's source, at the clip's size)."""

    role: str
    episode: int
    pipeline: str  # the Creator pipeline block 2 names
    prompt: str
    negative_prompt: str
    video: torch.Tensor  # (1, frames, 3, height, width) in [0, 1]
    width: int
    height: int
    frames: int
    guidance: float
    image: torch.Tensor | None  # (1, 3, height, width) in [0, 1]: the source image; None for text to video


Example = TextExample | CaptionExample | ImageExample | VideoExample


# ---- finding the trainable blocks ----------------------------------------------------------------------
def _walk(engine: Engine, prefix: str = "") -> Iterable[tuple[str, list[tuple[Engine, str]], Block]]:
    """(path, chain of (engine, node id) from the outside in, block) for every block inside `engine`, minus
    graphs served over HTTP (nothing to train here; listing their nodes would call the endpoint)."""
    from worldgen.nodes.endpoint import EndpointGraph

    for node in engine.node_ids:
        item = engine.item(node)
        if isinstance(item, EndpointGraph):
            continue
        if isinstance(item, Engine):
            for path, chain, block in _walk(item, f"{prefix}{node}."):
                yield path, [(engine, node), *chain], block
        else:
            yield f"{prefix}{node}", [(engine, node)], item


def _output_source(engine: Engine, name: str) -> tuple[str, Block, str] | None:
    """(path, block, port) that an exposed output of `engine` comes from, or None."""
    if name not in engine.exposed_outputs:
        return None
    node, port = engine.exposed_outputs[name]
    item = engine.item(node)
    if isinstance(item, Engine):
        inner = _output_source(item, port)
        return None if inner is None else (f"{node}.{inner[0]}", inner[1], inner[2])
    return node, item, port


def _is_local_llm(block: Block) -> bool:
    from worldgen.nodes.llm import LocalLLM

    return isinstance(block, LocalLLM)


def _is_local_vlm(block: Block) -> bool:
    from worldgen.nodes.vision import TransformersVLMBlock

    return isinstance(block, TransformersVLMBlock)


def stage_llm(world: Any, role: str) -> tuple[str, Block, list[tuple[Engine, str]]] | None:
    """The trainable language block of a text role's stage: (world path, block, chain), or None when the
    stage holds none. A stage whose output does not come straight from its one trainable block cannot be
    supervised from episodes (what happens in between is not recorded): that is an error, not a skip."""
    stage = world.stages[role]
    trained_as = stage.contract.trained_as
    found = [
        (p, c, b)
        for p, c, b in _walk(stage)
        if ("chat" in trained_as and _is_local_llm(b)) or ("caption" in trained_as and _is_local_vlm(b))
    ]
    if not found:
        return None
    distinct = {id(b) for _, _, b in found}
    where = f"stages.{role}"
    if len(distinct) > 1:
        raise ConfigError(
            f"the {role} holds several trainable language blocks ({', '.join(p for p, _, _ in found)}); "
            "only a stage whose answer comes from one of them can be trained from episodes",
            path=where,
        )
    output = stage.contract.output
    source = _output_source(stage, output)
    path, chain, block = found[0]
    if source is None or source[1] is not block:
        raise ConfigError(
            f"the {role}'s output '{output}' does not come straight from its trainable block {path}; "
            "episodes hold only the stage's final answer, so it cannot be supervised",
            path=where,
        )
    return f"{role}.{path}", block, chain


def find_block(world: Any, path: str) -> Block:
    """The block at a world path ('author.main.llm'), as examples name them."""
    blocks = dict(world.named_blocks())
    if path not in blocks:
        raise ConfigError(f"this world has no block '{path}' (was the example built for another world?)")
    return blocks[path]


@dataclass(frozen=True)
class DiffusionBlocks:
    """Where a Creator pipeline denoises: the graph holding its backbone, that node, and the blocks the denoising
    loss needs besides the graph's own conditioning (found by role, whatever the node ids)."""

    graph: Graph  # the graph whose denoising loop holds the backbone
    backbone_node: str
    backbone: Block
    codec: Block  # the VAE: encodes the training images
    solver: Block  # the loop's solver: its noise process is what the backbone learns to undo
    paths: dict[
        str, str
    ]  # part -> world path of (the first of) the node(s) holding it, after the prefix given


def _graphs(engine: Engine, prefix: str) -> Iterable[tuple[str, Graph]]:
    """Every graph in an engine (itself, or a pipeline's graphs at any depth), with its path prefix."""
    if isinstance(engine, Graph):
        yield prefix, engine
        return
    for node_id in engine.node_ids:
        item = engine.item(node_id)
        if isinstance(item, Engine):
            yield from _graphs(item, f"{prefix}{node_id}.")


def diffusion_blocks(engine: Engine, prefix: str = "") -> DiffusionBlocks | None:
    """The diffusion blocks of a Creator pipeline or graph (None when it has no backbone: nothing to train).
    `prefix` goes before the paths (e.g. 'creator.text_to_image.').

    Nodes holding the same model (`vae` decoding and `vae_enc` encoding) count once; two different backbones
    (or VAEs next to one) are ambiguous and an error."""
    backbones = [
        (f"{at}{node}", graph, node)
        for at, graph in _graphs(engine, prefix)
        for node in graph.node_ids
        if graph.item(node).role == "backbone"
    ]
    if not backbones:
        return None
    _one(engine, "backbone", [(path, graph.item(node)) for path, graph, node in backbones])
    path, graph, node = backbones[0]
    loop = next((lp for lp in graph.plan().loops if node in lp.nodes), None)
    solver = (
        next((graph.item(n) for n in loop.order if graph.item(n).role == "solver"), None) if loop else None
    )
    if solver is None:
        raise ConfigError(
            f"the backbone {path} of pipeline '{engine.name}' is not in a denoising loop with a solver; the "
            "denoising loss needs one (its noise process is what the backbone learns)",
            path="stages.creator",
        )
    at = path[: -len(node)]
    codec_path, codec = _one(
        engine,
        "codec",
        [(f"{at}{n}", graph.item(n)) for n in graph.node_ids if graph.item(n).role == "codec"],
    )
    solver_path = f"{at}{next(n for n in loop.order if graph.item(n) is solver)}"
    return DiffusionBlocks(
        graph=graph,
        backbone_node=node,
        backbone=graph.item(node),
        codec=codec,
        solver=solver,
        paths={"backbone": path, "codec": codec_path, "solver": solver_path},
    )


def _one(engine: Engine, part: str, entries: list[tuple[str, Block]]) -> tuple[str, Block]:
    """The one distinct model among the blocks of a part (first path); a ConfigError for none or several."""
    distinct: dict[Any, tuple[str, Block]] = {}
    for path, block in entries:
        distinct.setdefault(_identity(block), (path, block))
    if len(distinct) != 1:
        what = "no" if not distinct else f"{len(distinct)} different"
        raise ConfigError(
            f"pipeline '{engine.name}' has {what} {part} block(s) "
            f"({', '.join(p for p, _ in entries) or 'none'}); the denoising loss needs exactly one",
            path="stages.creator",
        )
    return next(iter(distinct.values()))


def _identity(block: Block) -> Any:
    """Blocks that hold the same model are one part (a solver's identity is its scheduler config)."""
    refs = block.model_refs()
    if refs:
        return tuple(sorted((k, r.identity_key()) for k, r in refs.items())), getattr(
            block, "model_origin", None
        )
    if block.role == "solver":  # steps may differ: only the noise schedule matters here
        return json.dumps(dict(block.scheduler.config), sort_keys=True, default=str)
    return id(block)


def trainable_roles(world: Any) -> list[str]:
    """The roles of `world` that yield examples (in cycle order)."""
    return [r for r in TRAINED_ROLES if _trainable(world, r)]


def _trainable(world: Any, role: str) -> bool:
    if "denoising" in CONTRACTS[role].trained_as:
        stage = world.stages[role]
        return any(diffusion_blocks(stage.item(n)) is not None for n in stage.node_ids)
    return stage_llm(world, role) is not None


# ---- what a stage saw ----------------------------------------------------------------------------------
def episode_content(world: Any, episodes: Sequence[Episode], index: int) -> WorldContent:
    """The world's content as the stages of `episodes[index]` saw it (see the module doc)."""
    episode = episodes[index]
    if episode.meta.content is not None:
        return episode.meta.content
    initial = world.settings.initial_world.model_dump()
    return WorldContent(**initial, history=[e.state.outcome or "" for e in episodes[:index]])


def _seen_state(world: Any, state: WorldState, role: str) -> WorldState:
    """The state as it stood when `role` ran: only the blocks it saw, block 3 at its in-flight paths."""
    blocks = WorldState(id=state.id)
    for number in sorted(CONTRACTS[role].sees):
        blocks = blocks.with_block(number, state.block(number))
    if blocks.artifacts:
        # where save_artifacts put them while the state was in flight (the episode holds copies)
        folder = world.storage.artifacts_dir.relative_to(world.storage.root).as_posix()
        refs = [
            ref.model_copy(update={"path": f"{folder}/{state.id}/{i:03d}.png"})
            for i, ref in enumerate(blocks.artifacts)
        ]
        blocks = blocks.model_copy(update={"artifacts": refs})
    return blocks


def _role_step(episode: Episode, role: str) -> int:
    """The step `role` ran in for this episode; without a recorded step the episode is taken to be the
    world's n-th, saved in step n + 1 (as in a world started empty)."""
    saved = episode.meta.step if episode.meta.step is not None else episode.number + 1
    # a role after the episode-saving stage in the cycle ran in the step before the one that saved it
    after_saving = CYCLE.index(role) > CYCLE.index(role_that(lambda c: c.saves_episode))
    return max(1, saved - 1 if after_saving else saved)


def role_context(world: Any, episodes: Sequence[Episode], index: int, role: str) -> dict[str, Any]:
    """The `context` the world gave `role`'s stage for `episodes[index]` (World.stage_context's)."""
    episode = episodes[index]
    step = _role_step(episode, role)
    return stage_context(
        role,
        _seen_state(world, episode.state, role),
        episode_content(world, episodes, index),
        action=episode.meta.action,
        step=step,
        pipelines=list(world.selecting_stage.node_ids),
        defaults=world.settings.generation_defaults.model_dump(),
        seed=stage_seed(world.settings.seed, step, role),
        controls=world.selecting_stage.controls(),
        kinds=world.selecting_stage.kinds(),
        sources=world.selecting_stage.sources(),
    )


def _block_inputs(
    chain: list[tuple[Engine, str]], ports: Iterable[str], available: dict[str, Any], where: str
) -> dict[str, Any]:
    """The values the world's inputs give a block's `ports` through the engines around it (None: unfed).
    A port fed by another node's output cannot be rebuilt from an episode: an error."""
    values: dict[str, Any] = {}
    for port in ports:
        name, top = port, None
        for engine, node in reversed(chain):
            if any(e.target == node and e.target_port == name for e in engine.edges):
                raise ConfigError(
                    f"'{node}.{name}' is fed by another node, whose output episodes do not record; "
                    "feed the trainable block from the stage's inputs only",
                    path=where,
                )
            top = next((x for x in engine.exposed_inputs.values() if (node, name) in x.targets), None)
            if top is None:
                break
            name = top.name
        if top is None:
            values[port] = None
        elif name in available:
            values[port] = available[name]
        else:
            values[port] = top.default if top.optional else None
    return values


# ---- examples ------------------------------------------------------------------------------------------
def build_examples(
    world: Any, episodes: Sequence[Episode], roles: Iterable[str] | None = None
) -> list[Example]:
    """Every example the episodes give for `roles` (default: every trainable role), role by role in cycle
    order, episodes oldest first. Pass all of a world's episodes, oldest first (see `episode_content`)."""
    wanted = list(TRAINED_ROLES if roles is None else roles)
    unknown = [r for r in wanted if r not in TRAINED_ROLES]
    if unknown:
        raise ConfigError(f"no examples for role(s) {unknown}; trained roles: {', '.join(TRAINED_ROLES)}")
    return [x for role in TRAINED_ROLES if role in wanted for x in role_examples(world, episodes, role)]


def role_examples(world: Any, episodes: Sequence[Episode], role: str) -> list[Example]:
    """The examples of one role ([] when its stage has nothing to train, or no episode has its blocks)."""
    contract = CONTRACTS[role]
    if "denoising" in contract.trained_as:
        return [
            x for index in range(len(episodes)) for x in _denoising_examples(world, episodes, index, role)
        ]
    found = stage_llm(world, role)
    if found is None:
        return []
    path, block, chain = found
    out: list[Example] = []
    for index, episode in enumerate(episodes):
        if not {*contract.sees, contract.writes} <= episode.filled:
            continue
        context = role_context(world, episodes, index, role)
        # (the `images` entry is unused: a text block never sees it, a VLM gets the episode's own images)
        available = world_inputs(context, _seen_state(world, episode.state, role), lambda ref: Path(ref.path))
        if _is_local_vlm(block):
            out += _caption_examples(role, episode, path, block, chain, available)
            continue
        inputs = _block_inputs(chain, ("context", "prompt", "system"), available, f"stages.{role}")
        messages = block.messages(dict(inputs["context"] or {}), inputs["prompt"], inputs["system"])
        out.append(TextExample(role, episode.number, path, messages, _target_text(episode.state, role)))
    return out


def _target_text(state: WorldState, role: str) -> str:
    """What the role's LLM answered, as text: a generation config (the Architect's) as JSON."""
    contract = CONTRACTS[role]
    value = state.block(contract.writes)
    if contract.output_schema is Schema.GENERATION_CONFIG:  # block 2: the list of requests
        return json.dumps([request.model_dump(mode="json") for request in value], ensure_ascii=False)
    return str(value)


def _caption_examples(
    role: str, episode: Episode, path: str, block: Any, chain: list, available: dict[str, Any]
) -> list[CaptionExample]:
    inputs = _block_inputs(chain, ("prompt", "context"), available, f"stages.{role}")
    prompt = block.instruction(inputs["prompt"], inputs["context"])
    targets = _per_image(episode, len(episode.images))
    return [
        CaptionExample(role, episode.number, path, image, prompt, text)
        for image, text in zip(episode.images, targets, strict=True)
    ]


def _per_image(episode: Episode, count: int) -> list[str]:
    """Block 4 split into one description per image: the VLM blocks write one 'Image i: ...' (or 'Video i: ...',
    'Audio i: ...') line per artifact of block 3, in order; the images' lines are the captions."""
    text = episode.state.description or ""
    kinds = [a.kind for a in episode.state.artifacts or []] or ["image"] * count
    marks = list(_NUMBERED.finditer(text))
    if not marks and kinds == ["image"]:
        return [text.strip()]
    numbers = [int(m.group(1)) for m in marks]
    if numbers != list(range(1, len(kinds) + 1)) or marks[0].start() != 0:
        raise ConfigError(
            f"block 4 must describe the episode's {len(kinds)} artifact(s) as 'Image 1: ...', 'Video 2: ...' "
            f"lines (one per artifact, in order); found {numbers or 'none'}",
            file=str(episode.state_path),
            path="description",
        )
    ends = [m.start() for m in marks[1:]] + [len(text)]
    entries = [text[m.end() : end].strip() for m, end in zip(marks, ends, strict=True)]
    return [entry for entry, kind in zip(entries, kinds, strict=True) if kind == "image"]


def _denoising_examples(
    world: Any, episodes: Sequence[Episode], index: int, role: str
) -> list[ImageExample | VideoExample]:
    """One example per image and per clip of the episode, with the request that made it (block 3's `request`;
    an episode written before requests had kinds made all its images with its one request)."""
    episode = episodes[index]
    state = episode.state
    contract = CONTRACTS[role]
    if not {*contract.reads, contract.writes} <= episode.filled or not (episode.images or episode.videos):
        return []
    images = iter(episode.images)
    clips = iter(zip(episode.videos, episode.video_paths, strict=True))
    examples: list[ImageExample | VideoExample] = []
    for i, ref in enumerate(state.artifacts or []):
        if ref.kind not in ("image", "video"):
            continue
        pixels, path = (next(images), None) if ref.kind == "image" else next(clips)
        number = ref.request or 0
        g = state.generation[number] if number < len(state.generation) else None
        if g is None or g.kind != ref.kind:
            continue
        stage = world.stages[role]
        if g.pipeline not in stage.node_ids:
            raise ConfigError(
                f"block 2 asks for pipeline '{g.pipeline}', but the {role} has: {', '.join(stage.node_ids)}",
                file=str(episode.state_path),
                path=f"generation.{number}.pipeline",
            )
        pipeline = stage.item(g.pipeline)
        if diffusion_blocks(pipeline) is None:
            continue
        if ref.kind == "image":
            image = _sized(pixels, g.height, g.width)
            examples.append(
                ImageExample(
                    role,
                    episode.number,
                    g.pipeline,
                    g.prompt,
                    g.negative_prompt,
                    image,
                    g.width,
                    g.height,
                    g.guidance,
                )
            )
            continue
        if pixels.shape[1] != g.frames:
            raise ConfigError(
                f"the clip has {pixels.shape[1]} frames, but the request that made it asks for {g.frames}",
                file=str(path),
                path=f"generation.{number}.frames",
            )
        clip = _sized(pixels[0], g.height, g.width).unsqueeze(0)
        source = None
        if "image" in pipeline.exposed_inputs:  # image to video: the condition is the image it started from
            source = _video_source(episodes, index, i, ref)
            source = clip[:, 0] if source is None else _sized(source, g.height, g.width)
        examples.append(
            VideoExample(
                role,
                episode.number,
                g.pipeline,
                g.prompt,
                g.negative_prompt,
                clip,
                g.width,
                g.height,
                g.frames,
                g.guidance,
                source,
            )
        )
    return examples


def _video_source(episodes: Sequence[Episode], index: int, at: int, ref: Any) -> torch.Tensor | None:
    """The image the clip of block 3's entry `at` started from (its `source`): an image this episode's request
    made, or an image of an earlier episode (among `episodes`, else read from the folder beside this one's).
    None when block 3 records no source (a hand-written episode): the clip's first frame stands in for it."""
    episode = episodes[index]
    source = ref.source
    if source is None:
        return None
    where = f"artifacts.{at}.source"
    if source.request is not None:
        made = [
            image
            for image, r in zip(
                episode.images, [r for r in episode.state.artifacts or [] if r.kind == "image"], strict=True
            )
            if (r.request or 0) == source.request
        ]
        if source.image >= len(made):
            raise ConfigError(
                f"the clip's source is image {source.image} of request {source.request}, which made "
                f"{len(made)} image(s) in this episode",
                file=str(episode.state_path),
                path=where,
            )
        return made[source.image]
    number = episode.number - 1 if source.episode == "previous" else int(source.episode)
    earlier = next((e for e in episodes if e.number == number), None)
    if earlier is None:
        folders = [f for f in episode.folder.parent.iterdir() if f.is_dir() and f.name.isdigit()]
        folder = next((f for f in folders if int(f.name) == number), None)
        if folder is None or not EpisodeFolder(folder).state_path.is_file():
            raise ConfigError(
                f"the clip's source is an image of episode {number}, which is not here",
                file=str(episode.state_path),
                path=f"{where}.episode",
            )
        earlier = read_episode(folder, number)
    if source.image >= len(earlier.images):
        raise ConfigError(
            f"the clip's source is image {source.image} of episode {number}, which has {len(earlier.images)}",
            file=str(episode.state_path),
            path=f"{where}.image",
        )
    return earlier.images[source.image]


def _sized(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The image at block 2's size (a hand-written episode's picture may have another): generating with
    this config should give an image of this size."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    resized = torch.nn.functional.interpolate(
        image, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.clamp(0.0, 1.0)
