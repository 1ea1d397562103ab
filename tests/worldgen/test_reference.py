"""Worlds keep their look: block 2's `reference` to an earlier episode's image, checked against the world's
episodes and the selected pipeline before the Creator runs, fed to the pipeline's input for the control, and
recorded with the episode; the example world conditions every episode after the first on the previous one's
image, locally and on Ray."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tests.toy_blocks  # noqa: F401  (registers the toy blocks)
from worldgen.config import load_config_file
from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.images import to_pil
from worldgen.prompts import render_prompt
from worldgen.reference import FIRST_EPISODE_NOTE, plan_references
from worldgen.stage import Stage
from worldgen.state import GenerationConfig, WorldState
from worldgen.storage import WorldStorage
from worldgen.world import World

LOOK = Path(__file__).parents[2] / "configs" / "worlds" / "keeps_its_look.yaml"
STEPS = (
    4  # the first step draws episode 1's image; steps 2-4 save episodes 1-3 and draw from the previous one
)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def pixels_of(image: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(image)[0], dtype=np.int16)


def as_tensor(path: Path) -> torch.Tensor:
    """A PNG as the world feeds it: (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(pixels(path).astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def image_of(world: World, episode: int) -> Path:
    state, _ = world.storage.load_episode(episode)
    return world.storage.artifact_path(state.artifacts[0])


def run_look(directory: Path, executor: str = "local") -> World:
    config = load_config_file(LOOK) | {"executor": executor}
    world = World.from_config(config, directory=directory)
    world.run(STEPS)
    return world


@pytest.fixture(scope="module")
def local_world(tmp_path_factory) -> World:
    return run_look(tmp_path_factory.mktemp("look") / "w")


# ---- block 2's field ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"control": "sketch"}, r"state\.generation\.0\.reference\.0\.control: Input should be 'controlnet'"),
        (
            {"control": "controlnet", "strength": 0.5},
            r"reference\.0\.strength: .*takes `scale`, not `strength`",
        ),
        ({"control": "img2img", "scale": 0.5}, r"reference\.0\.scale: .*takes `strength`, not `scale`"),
        (
            {"control": "img2img", "strength": 1.5},
            r"reference\.0\.strength: Input should be less than or equal",
        ),
        ({"control": "img2img", "episode": 0}, r"reference\.0\.episode"),
        (
            {"control": "img2img", "path": "/etc/passwd"},
            r"reference\.0\.path: Extra inputs are not permitted",
        ),
    ],
    ids=["control", "strength_for_controlnet", "scale_for_img2img", "strength_range", "episode_0", "a_path"],
)
def test_a_bad_reference_names_block_2s_field(reference, message):
    with pytest.raises(ConfigError, match=message):
        WorldState.from_blocks({1: "x", 2: {"prompt": "p", "reference": reference}})


def test_one_reference_or_several():
    one = GenerationConfig(prompt="p", reference={"control": "img2img"})
    assert [r.episode for r in one.reference] == ["previous"] and one.reference[0].image == 0
    assert len(GenerationConfig(prompt="p", reference=[{"control": "controlnet"}] * 2).reference) == 2


# ---- checked before the Creator runs ------------------------------------------------------------------
def test_a_reference_the_world_cannot_honour_fails_before_anything_runs(local_world):
    world = World.load(local_world.directory)
    before = (world.storage.episodes(), world.progress.model_dump())
    asked = {"prompt": "p", "pipeline": "from_previous", "width": 64, "height": 64, "steps": 4}
    cases = [
        (
            {"episode": 9, "control": "img2img"},
            r"at state\.generation\.0\.reference\.0\.episode: episode 9 does not exist \(the world has episodes 1 to 3\)",
        ),
        (
            {"episode": 1, "image": 2, "control": "img2img"},
            r"reference\.0\.image: episode 1 has 1 image\(s\)",
        ),
        (
            {"control": "controlnet"},
            r"reference\.0\.control: control 'controlnet' feeds input 'control_image', which pipeline "
            r"'from_previous' does not take; pipelines that take control 'controlnet': keep_the_look",
        ),
    ]
    for reference, message in cases:
        with pytest.raises(ConfigError, match=message):
            world.step(state={1: "x", 2: {**asked, "reference": reference}})
    on_text = {**asked, "pipeline": "text_to_image", "reference": {"control": "img2img"}}
    with pytest.raises(ConfigError, match="pipelines that take control 'img2img': from_previous"):
        world.step(state={1: "x", 2: on_text})
    assert (world.storage.episodes(), world.progress.model_dump()) == before  # nothing saved is lost


def test_an_architect_asking_for_a_missing_episode_stops_before_the_creator(tmp_path):
    config = load_config_file(LOOK)
    architect = (
        '{"prompt": "p", "pipeline": "from_previous", "reference": {"episode": 2, "control": "img2img"}}'
    )
    config["stages"]["architect"]["nodes"]["llm"]["config"]["template"] = architect
    world = World.from_config(config, directory=tmp_path / "w")
    with pytest.raises(ConfigError, match=r"stage 'architect': block 2: episode 2 does not exist") as err:
        world.step()
    assert err.value.path == "generation.0.reference.0.episode"
    assert world.progress.ran == ["development"] and world.state.generation is None  # the Creator never ran


def test_the_first_episode_has_no_previous_one(tmp_path):
    """Skipped with a note when the pipeline draws without the image; an error naming it when it cannot."""
    optional = Graph("draw")
    optional.add_node("toy/add", id="n")
    optional.expose_input("ip_adapter_image", "n.b", default=None)
    creator = Stage("creator")
    creator.add_pipeline(optional, id="draw")
    storage = WorldStorage(tmp_path)
    generation = GenerationConfig(prompt="p", pipeline="draw", reference={"control": "ip_adapter"})
    (use,) = plan_references(generation, creator, storage, where="generation")
    assert use.episode is None and use.note == FIRST_EPISODE_NOTE and not use.inputs

    world = World.from_config(load_config_file(LOOK), directory=tmp_path / "w")
    first = {"prompt": "p", "pipeline": "from_previous", "reference": {"control": "img2img"}}
    with pytest.raises(ConfigError, match="no episode yet.*cannot draw without its input 'image'"):
        world.step(state={1: "x", 2: first})


# ---- the example world ---------------------------------------------------------------------------------
def test_every_episode_after_the_first_is_drawn_from_the_previous_one(local_world):
    world = local_world
    assert world.storage.episodes() == [1, 2, 3]
    first, meta = world.storage.load_episode(1)
    assert first.generation[0].pipeline == "text_to_image" and not first.generation[0].reference
    assert "references" not in meta  # nothing to record: episode 1 was drawn from text
    for number in (2, 3):
        state, meta = world.storage.load_episode(number)
        # the offline Architect picks the first pipeline that takes a reference, with every control it takes
        assert state.generation[0].pipeline == "keep_the_look"
        assert [r.model_dump() for r in state.generation[0].reference] == [
            {"episode": "previous", "image": 0, "control": control, "scale": None, "strength": None}
            for control in ("controlnet", "ip_adapter")
        ]
        previous, _ = world.storage.load_episode(number - 1)
        artifact = previous.artifacts[0]
        # what was referenced, and how (the scales: the pipeline's defaults, from the world's config)
        assert meta["references"] == [
            {
                "control": "controlnet",
                "episode": number - 1,
                "image": 0,
                "artifact": artifact.path,
                "sha256": artifact.sha256,
                "inputs": {"control_image": artifact.path, "controlnet_scale": 0.8},
            },
            {
                "control": "ip_adapter",
                "episode": number - 1,
                "image": 0,
                "artifact": artifact.path,
                "sha256": artifact.sha256,
                "inputs": {"ip_adapter_image": artifact.path, "ip_adapter_scale": 0.6},
            },
        ]
    page = world.storage.episode_folder(2).page_path.read_text()
    assert "**Reference:** controlnet from episode 1, image 0 (controlnet_scale 0.8)" in page
    assert "**Reference:** ip_adapter from episode 1, image 0 (ip_adapter_scale 0.6)" in page

    # episode 2 is the ControlNet + IP-Adapter graph on episode 1's stored image, not what text alone draws
    state, _ = world.storage.load_episode(2)
    g, pipelines = state.generation[0], world.selecting_stage
    block_2 = {
        "prompt": g.prompt,
        "negative_prompt": g.negative_prompt,
        "width": g.width,
        "height": g.height,
        "steps": g.steps,
        "guidance_scale": g.guidance,
    }

    def run(name: str, **more) -> np.ndarray:
        engine = pipelines.item(name)
        inputs = {k: v for k, v in {**block_2, **more}.items() if k in engine.exposed_inputs}
        return pixels_of(engine.run(inputs, seed=g.seed)["image"])

    drawn = pixels(image_of(world, 2))
    previous = as_tensor(image_of(world, 1))
    assert np.abs(run("keep_the_look", control_image=previous, ip_adapter_image=previous) - drawn).max() <= 1
    assert np.abs(run("text_to_image") - drawn).mean() > 10  # an unreferenced run draws something else


def test_episode_2_follows_episode_1s_stored_image(tmp_path):
    """A user's blocks 1-3 become episode 1 (its image the user's picture); the next image is drawn from it."""
    drawn = []
    for colour in ((200, 40, 40), (40, 40, 200)):
        picture = tmp_path / f"{colour[0]}.png"
        Image.new("RGB", (64, 64), colour).save(picture)
        world = World.from_config(load_config_file(LOOK), directory=tmp_path / f"w{colour[0]}")
        prompt = {"prompt": "the harbor", "width": 64, "height": 64, "steps": 4}
        report = world.step(state={1: "the harbor", 2: prompt, 3: [str(picture)]})
        assert report.episode == 1 and report.state.generation[0].pipeline == "keep_the_look"
        assert (pixels(image_of(world, 1)) == np.array(colour)).all()
        drawn.append(pixels(world.storage.artifact_path(report.state.artifacts[0])))
    red, blue = drawn
    # the same world, block 2 and seed: only episode 1's stored image differs (the tiny random VAE draws its
    # colours faintly, so the pictures differ by a few levels, in most pixels)
    assert (red != blue).any(axis=-1).mean() > 0.5


def test_the_example_world_on_ray_matches_local(ray_session, local_world, tmp_path):
    world = run_look(tmp_path / "w", executor="ray")
    assert world.storage.episodes() == [1, 2, 3]
    for number in (1, 2, 3):
        _, meta = world.storage.load_episode(number)
        _, local_meta = local_world.storage.load_episode(number)
        assert meta.get("references") == local_meta.get("references")
        assert np.abs(pixels(image_of(world, number)) - pixels(image_of(local_world, number))).max() <= 1


# ---- the Architect's prompts ---------------------------------------------------------------------------
def test_the_architects_api_prompt_offers_the_controls_a_pipeline_takes():
    context = {
        "state": {"happening": "the keeper returns"},
        "content": {"title": "T", "story": "", "style": "", "history": ["a"], "glossary": {}, "rules": []},
        "pipelines": ["text_to_image", "from_previous"],
        "controls": {"text_to_image": [], "from_previous": ["img2img"]},
        "defaults": {"width": 64, "height": 64, "steps": 4, "guidance": 7.5},
        "seed": 1,
        "action": None,
        "step": 2,
    }
    text = render_prompt("file:architect.j2", context)
    assert (
        '"reference"' in text
        and '"from_previous" (img2img)' in text
        and "The last episode is number 1" in text
    )
    for control in ("ip_adapter", "controlnet", "img2img"):
        assert f'"{control}"' in text  # when to use which
    plain = copy.deepcopy(context) | {"controls": {"text_to_image": [], "from_previous": []}}
    assert "keeps the look" not in render_prompt("file:architect.j2", plain)
