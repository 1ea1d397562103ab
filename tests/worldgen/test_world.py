"""The world cycle: the execution rule and the user-supplied-state table of DESIGN.md §2.3, on both executors,
episodes saved exactly once, resume after a failure, and an API-LLM stage over real HTTP that never saves
its key."""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image

import worldgen as wg
from tests.serve_apps.test_llm_server import direct_generation, llm_server, server_report
from tests.worldgen.nodes.test_llm import CHAT_TEMPLATE, _tiny_causal_lm
from worldgen.block import ModelBlock
from worldgen.config import load_config_file
from worldgen.errors import ConfigError
from worldgen.stage import CONTRACTS
from worldgen.state import WorldContent, WorldState
from worldgen.storage import WorldDamagedError, WorldStorage
from worldgen.world import World, stage_context

DEFAULT = Path(__file__).parents[2] / "configs" / "worlds" / "default.yaml"
EXAMPLES = sorted((Path(__file__).parents[2] / "configs" / "worlds").glob("*.yaml"))
CHANGING = ["development", "architect", "creator"]  # what runs after the Environment, every step
ENVIRONMENT = ["philosopher", "author", "world_update"]


def fast_config(executor: str = "local") -> dict:
    """The default world, with the tiny preset at 32x32 and 2 denoising steps."""
    config = load_config_file(DEFAULT)
    config["executor"] = executor
    config["generation_defaults"] = {"width": 32, "height": 32, "steps": 2, "guidance": 7.5}
    config["stages"]["creator"] = {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}}
    return config


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pictures") / "given.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return str(path)


def user_state(blocks: int, picture: str) -> dict:
    full = {
        1: "A ship with black sails enters the harbor.",
        2: {
            "pipeline": "text_to_image",
            "prompt": "a ship with black sails",
            "width": 32,
            "height": 32,
            "steps": 2,
        },
        3: [picture],
        4: "A red square.",
        5: "The ship was only a red kite.",
    }
    return {n: full[n] for n in range(1, blocks + 1)}


# rows of the canon's table: blocks the user passes -> (stages of the Environment that run, episode saved?)
TABLE = [
    (0, [], False),
    (1, [], False),
    (2, [], False),
    (3, ["philosopher", "author", "world_update"], True),
    (4, ["author", "world_update"], True),
    (5, ["world_update"], True),
]


def check_row(world: World, blocks: int, environment_ran: list[str], saved: bool, picture: str) -> None:
    report = world.step(state=user_state(blocks, picture) if blocks else None)
    assert report.ran == environment_ran + CHANGING
    assert report.skipped == [s for s in ENVIRONMENT if s not in environment_ran]
    assert (report.episode == 1) is saved
    assert report.state.filled() == {1, 2, 3}  # every step ends holding blocks 1-3
    episodes = world.storage.episodes()
    assert episodes == ([1] if saved else [])
    if saved:
        episode, _ = world.storage.load_episode(1)
        assert episode.filled() == {1, 2, 3, 4, 5}
        assert episode.happening == user_state(1, picture)[1]
        if blocks >= 4:
            assert episode.description == "A red square."  # what the user gave is kept, not redone
        if blocks == 5:
            assert episode.outcome == "The ship was only a red kite."
        assert world.content.history[-1] == episode.outcome


@pytest.mark.parametrize(
    ("blocks", "environment_ran", "saved"),
    TABLE,
    ids=[f"blocks_1-{b}" if b else "empty" for b, _, _ in TABLE],
)
def test_user_supplied_state_table_local(world_dir, picture, blocks, environment_ran, saved):
    world = World.from_config(fast_config(), directory=world_dir)
    check_row(world, blocks, environment_ran, saved, picture)


@pytest.mark.parametrize(
    ("blocks", "environment_ran", "saved"),
    TABLE,
    ids=[f"blocks_1-{b}" if b else "empty" for b, _, _ in TABLE],
)
def test_user_supplied_state_table_ray(ray_session, tmp_path, picture, blocks, environment_ran, saved):
    world = World.from_config(fast_config("ray"), directory=tmp_path / "w")
    check_row(world, blocks, environment_ran, saved, picture)
    # Ray ran the Creator: its models live on named host actors and were never loaded in this process
    # (the local executor loads every one of them here); only inline ones (tokenizers) run here
    models = [b for _, b in world.named_blocks() if isinstance(b, ModelBlock) and not b.inline]
    assert models and not any(b.model_loaded for b in models)
    hosts = [a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)]
    for block in models:
        assert any(name.endswith("-" + block.model_class().__name__) for name in hosts), (block, hosts)


def test_empty_start_saves_the_first_episode_on_step_two(world_dir):
    world = World.from_config(fast_config(), directory=world_dir)
    first = world.step()
    assert first.episode is None and first.state.filled() == {1, 2, 3}
    second = world.step()
    assert second.ran == ENVIRONMENT + CHANGING and second.episode == 1
    third = world.step()
    assert third.episode == 2
    assert world.storage.episodes() == [1, 2]
    assert len(world.content.history) == 2
    assert (world.directory / "episodes" / "000001" / "episode.md").exists()
    world.write_report()
    assert (world.directory / "report.html").exists() and (world.directory / "report.md").exists()
    html = (world.directory / "report.html").read_text()
    assert html.count("<img") >= 2
    state, _ = world.storage.load_episode(1)
    assert all(
        (world.directory / "episodes" / "000001" / Path(a.path).name).exists() for a in state.artifacts
    )


def test_action_goes_only_to_development(world_dir):
    config = fast_config()
    for role in ["author", "world_update", "development"]:
        config["stages"][role]["nodes"]["llm"]["config"]["template"] = f"{role} sees action={{{{ action }}}}"
    world = World.from_config(config, directory=world_dir)
    world.step(action="open the gate")
    assert world.state.happening == "development sees action=open the gate"
    world.step()
    episode, meta = world.storage.load_episode(1)
    assert episode.outcome == "author sees action=None"
    # the episode records the action its happening was developed from (step 1's), not the saving step's
    assert meta["action"] == "open the gate" and world.storage.load_progress().step == 2


def test_the_action_goes_where_the_contracts_say(world_dir, monkeypatch):
    """Who hears the user's action is a contract field, not a role name: moved to the Author, the Author's
    text shows it and Development's does not."""
    monkeypatch.setitem(CONTRACTS, "development", replace(CONTRACTS["development"], receives_action=False))
    monkeypatch.setitem(CONTRACTS, "author", replace(CONTRACTS["author"], receives_action=True))
    config = fast_config()
    for role in ["author", "development"]:
        config["stages"][role]["nodes"]["llm"]["config"]["template"] = f"{role} sees action={{{{ action }}}}"
    world = World.from_config(config, directory=world_dir)
    world.step(action="open the gate")
    assert world.state.happening == "development sees action=None"
    world.step(action="close it")
    episode, _ = world.storage.load_episode(1)
    assert episode.outcome == "author sees action=close it"
    context = stage_context(
        "author", WorldState(), WorldContent(), action="a", step=1, pipelines=[], defaults={}, seed=0
    )
    assert context["action"] == "a"  # training rebuilds the same context (worldgen.training)


def test_world_resumes_after_a_failed_stage_without_losing_or_repeating(tmp_path, world_dir, monkeypatch):
    world = World.from_config(fast_config(), directory=world_dir)
    world.run(2)  # episode 1 saved
    original = World._update_world
    calls = {"n": 0}

    def crash_after_saving(self, story):  # the episode is written, then the process "dies"
        original(self, story)
        calls["n"] += 1
        raise RuntimeError("power cut")

    monkeypatch.setattr(World, "_update_world", crash_after_saving)
    with pytest.raises(RuntimeError, match="power cut"):
        world.step()
    monkeypatch.setattr(World, "_update_world", original)
    # a new process picks up from storage (on a store: on another node, whose cache holds nothing)
    monkeypatch.setenv("WORLDGEN_CACHE_DIR", str(tmp_path / "another-node"))
    again = World.load(world_dir)
    assert again.progress.stage_index == 2  # philosopher, author done; world update in flight
    with pytest.raises(wg.StepInFlightError, match="finish it with step"):  # a new state: finish first
        again.step(state={1: "a calm sea"})
    report = again.step()
    assert report.episode == 2
    assert again.storage.episodes() == [1, 2]
    assert len(again.content.history) == 2  # applied once
    assert again.progress.step == 3

    # a step stopped past Development takes no new action: a typed conflict (the gateway's 409), nothing changes
    def crash_in_creator(self, role, stage):
        if role == "creator":
            raise RuntimeError("power cut")
        return original_run(self, role, stage)

    original_run = World._run
    monkeypatch.setattr(World, "_run", crash_in_creator)
    with pytest.raises(RuntimeError, match="power cut"):
        again.step(action="a storm")
    monkeypatch.setattr(World, "_run", original_run)
    again = World.load(world_dir)
    in_flight = again.progress.model_copy()
    with pytest.raises(wg.StepInFlightError, match="in flight past Development"):
        again.step(action="another storm")
    assert isinstance(wg.StepInFlightError("x"), wg.ExecutionError)
    assert again.progress == in_flight and again.step().step == 4


def test_same_directory_continues_and_a_different_world_is_refused(world_dir):
    world = World.from_config(fast_config(), directory=world_dir)
    world.step()
    again = World.from_config(fast_config(), directory=world_dir)
    assert again.progress.step == 1 and again.state.filled() == {1, 2, 3}
    other = fast_config() | {"seed": 99}
    with pytest.raises(wg.ConfigError, match="already holds a different world"):
        World.from_config(other, directory=world_dir)
    assert WorldStorage(world_dir).load_progress().step == 1  # nothing was lost


def test_bad_world_configs_name_the_yaml_path(tmp_path):
    config = fast_config()
    del config["stages"]["author"]
    with pytest.raises(
        wg.ConfigError, match=r"at stages: a world has exactly the stages .* missing \['author'\]"
    ):
        World.check(config)
    config = fast_config()
    config["stages"]["architect"]["nodes"]["llm"]["type"] = "llm/templat"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(wg.ConfigError) as err:
        World.check(path)
    assert str(path) in str(err.value) and "stages.architect.nodes.llm.type" in str(err.value)
    assert "did you mean 'llm/template'" in str(err.value)
    config = fast_config() | {"seed": -1}
    with pytest.raises(wg.ConfigError, match="seed: Input should be greater than or equal to 0"):
        World.check(config)


def test_invalid_state_from_the_user_is_refused_clearly(world_dir):
    world = World.from_config(fast_config(), directory=world_dir)
    with pytest.raises(
        wg.ConfigError, match=r"state.generation.0.width: Value error, must be a multiple of 8"
    ):
        world.step(state={1: "x", 2: {"prompt": "p", "width": 30}})
    with pytest.raises(wg.ConfigError, match="unknown block 7"):
        world.step(state={7: "x"})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_worlds_validate(path, capsys):
    from worldgen.cli import main

    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: world")


WORLD_LLM_KEY = "sk-test-7c1d9e0b5a4f"


@pytest.fixture(scope="module")
def world_llm(serve_url, tmp_path_factory):
    """The project's OpenAI-compatible server (serve_apps/llm_server.py) serving a tiny local causal LM as
    'test-model', with a key; (its base URL, the model's directory)."""
    model = _tiny_causal_lm(tmp_path_factory.mktemp("world-lm"), CHAT_TEMPLATE, context=4096)
    with llm_server(serve_url, {"test-model": model}, key_env="WG_TEST_LLM_KEY", key=WORLD_LLM_KEY) as url:
        yield url, model


def test_openai_stages_over_http_never_save_the_key(tmp_path, monkeypatch, world_llm):
    url, model = world_llm
    monkeypatch.setenv("WG_TEST_LLM_KEY", WORLD_LLM_KEY)
    config = fast_config()
    llm = {
        "type": "llm/openai",
        "config": {
            "model": "test-model",
            "base_url": url,
            "api_key": "${env:WG_TEST_LLM_KEY}",
            "prompt": "file:development.j2",
            "system": "file:system.j2",
            "retries": 0,
            "temperature": 0,
            "max_tokens": 8,
        },
    }
    config["stages"]["development"]["nodes"]["llm"] = copy.deepcopy(llm)
    world = World.from_config(config, directory=tmp_path / "w")
    # What Development sends at step 1: the world's content rendered into the prompts.
    messages = wg.create_block("llm/openai", llm["config"]).messages(world._context("development"))
    assert "The Harbor at the End of the Map" in messages[-1]["content"]
    served = server_report()["completions"].get("test-model", 0)
    happening = world.step().state.happening
    # the served model's greedy answer to exactly those messages became block 1
    assert happening and happening == direct_generation(model, messages, 8)[0]
    world.step()
    world.write_report()
    assert world.storage.episodes() == [1]
    assert server_report()["completions"]["test-model"] - served == 2  # one Development per step, both let in
    for file in (tmp_path / "w").rglob("*"):
        if file.is_file():
            assert WORLD_LLM_KEY.encode() not in file.read_bytes(), f"the key leaked into {file}"
    assert "${env:WG_TEST_LLM_KEY}" in (tmp_path / "w" / "world.yaml").read_text()


def test_world_from_template(world_dir):
    world = wg.World.from_template(
        "offline_world", directory=world_dir, title="Glass Orchard", preset="tiny", size=32, steps=2
    )
    assert world.content.title == "Glass Orchard"
    reports = world.run(2)
    assert reports[1].episode == 1 and (world.directory / "report.html").exists()
    assert "Glass Orchard" in (world.directory / "report.html").read_text()


def test_world_from_a_graph_or_pipeline_template_names_what_it_builds_and_the_world_templates(tmp_path):
    for template, kind in (("text_to_image", "graph"), ("generate_and_refine", "pipeline")):
        with pytest.raises(ConfigError) as caught:
            wg.World.from_template(template, directory=tmp_path / "w", preset="tiny")
        assert str(caught.value) == (
            f"template '{template}' builds a {kind}, not a world; the world templates: moving_world, offline_world"
        )
    assert not (tmp_path / "w").exists()
    assert list(wg.list_templates(kind="world")) == ["moving_world", "offline_world"]


def test_a_mapping_config_with_a_ref_is_stored_resolved(tmp_path, monkeypatch):
    """A `ref:` in a mapping config (here in a free-form mapping, as `extra_body` is) is read once, relative to
    the working directory, and world.yaml holds its content: a reload reads no other file (here the file is
    gone) and finds the same world."""
    monkeypatch.chdir(tmp_path)
    Path("glossary.yaml").write_text(yaml.safe_dump({"the fog": "it leaves objects behind"}))
    config = fast_config()
    config["initial_world"]["glossary"] = {"ref": "glossary.yaml"}
    world = World.from_config(config, directory=tmp_path / "w")
    assert world.created and world.step().step == 1
    stored = WorldStorage(tmp_path / "w").load_config()
    assert stored["initial_world"]["glossary"] == {"the fog": "it leaves objects behind"}
    assert World.from_config(config, directory=tmp_path / "w").progress.step == 1  # the same world
    Path("glossary.yaml").unlink()
    monkeypatch.chdir(tmp_path / "w")
    again = World.load(tmp_path / "w")
    assert not again.created and again.content.glossary == {"the fog": "it leaves objects behind"}
    assert again.step().step == 2


@pytest.fixture(scope="module")
def two_episodes(tmp_path_factory) -> Path:
    world = World.from_config(fast_config(), directory=tmp_path_factory.mktemp("worlds") / "w")
    world.run(3)
    assert world.storage.episodes() == [1, 2]
    return world.directory


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "episodes/000001/state.json").unlink(),
            "episode 1: episodes/000001/state.json is missing",
        ),
        (
            lambda d: (d / "episodes/000002/meta.json").write_text("garbage"),
            "episode 2: episodes/000002/meta.json is unreadable: malformed JSON",
        ),
        (lambda d: shutil.rmtree(d / "episodes/000001"), "episode 1: episodes/000001/ is missing (a gap"),
    ],
    ids=["state.json deleted", "meta.json garbage", "episode folder deleted"],
)
def test_a_damaged_world_names_episode_and_file_at_load(tmp_path, two_episodes, damage, message):
    directory = shutil.copytree(two_episodes, tmp_path / "w")
    damage(directory)
    with pytest.raises(WorldDamagedError, match=re.escape(f"world damaged: {message}")):
        World.load(directory)
    with pytest.raises(WorldDamagedError, match=re.escape(message)):  # the same through from_config
        World.from_config(fast_config(), directory=directory)


# ---- limits (issue 10): checked before any model runs; a stage past its wall time fails cleanly -----------
@pytest.mark.parametrize(
    "defaults, field, message",
    [
        ({"width": 100000, "height": 100000}, "width", "less than or equal to 4096"),
        ({"width": -8, "height": 0}, "width", "greater than or equal to 8"),
        ({"width": 60, "height": 60}, "width", "must be a multiple of 8, got 60"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
    ],
)
def test_generation_defaults_validate_as_block_2_does(defaults, field, message):
    config = fast_config()
    config["generation_defaults"] |= defaults
    with pytest.raises(wg.ConfigError, match=f"generation_defaults.{field}: .*{message}"):
        World.check(config)


def test_limits_refuse_generation_settings_before_any_model_runs(tmp_path):
    from worldgen.limits import LimitExceeded, Limits

    config = fast_config()  # defaults: 32x32, 2 steps
    with pytest.raises(LimitExceeded, match=r"at generation_defaults: width 32 is over 16 pixels") as err:
        World.check(config, limits=Limits(max_image_side=16))
    assert err.value.limit == "max_image_side"
    World.check(config)  # no limits (the CLI, the Python API): the config's author decides

    world = World.from_config(config, directory=tmp_path / "w", limits=Limits(max_steps=2))
    given = user_state(2, "unused") | {2: {"prompt": "a ship", "width": 32, "height": 32, "steps": 3}}
    with pytest.raises(
        LimitExceeded, match=r"at state.generation.0: 3 steps is over 2 \(limit 'max_steps'\)"
    ):
        world.step(state=given)
    assert world.progress.step == 0 and world.state.filled() == set()  # refused before anything ran

    # the Architect asks for more than the server allows: its stage fails, naming the limit, before the Creator
    config["stages"]["architect"]["nodes"]["llm"]["config"]["template"] = (
        '{"prompt": "{{ state.happening }}", "width": 32, "height": 32, "steps": 2, "count": 3}'
    )
    world = World.from_config(config, directory=tmp_path / "a", limits=Limits(max_count=2))
    with pytest.raises(
        LimitExceeded, match=r"stage 'architect': block 2: at generation.0: count 3 is over 2"
    ) as err:
        world.step()
    assert err.value.limit == "max_count"
    saved = WorldStorage(tmp_path / "a").load_progress()
    assert saved.stage_index == 4 and saved.state.filled() == {1}  # Development kept; no block 2, no images
    assert not list((tmp_path / "a").rglob("*.png"))


def slow_stage(seconds: float) -> dict:
    """An Architect that passes the offline Architect's JSON through three slow nodes."""
    config = copy.deepcopy(load_config_file(DEFAULT)["stages"]["architect"])
    config["nodes"] |= {f"slow{i}": {"type": "toy/slow", "config": {"seconds": seconds}} for i in range(3)}
    config["edges"] = ["llm.data -> slow0.x", "slow0.x -> slow1.x", "slow1.x -> slow2.x"]
    config["outputs"] = {"data": "slow2.x"}
    return config


def test_a_stage_past_its_time_limit_fails_cleanly_and_the_world_resumes(world_dir):
    import tests.toy_blocks  # noqa: F401 - registers the toy blocks
    from worldgen.limits import DeadlineExceeded, Limits

    config = fast_config()
    config["stages"]["architect"] = slow_stage(0.4)
    world = World.from_config(config, directory=world_dir, limits=Limits(stage_seconds=0.5))
    with pytest.raises(DeadlineExceeded) as err:
        world.step()
    message = str(err.value)
    assert message.startswith(
        "stage 'architect': node 'main': node 'slow2': the stage ran past its time limit"
    )
    assert err.value.limit == "stage_seconds" and message.endswith("(limit 'stage_seconds')")
    saved = WorldStorage(world_dir).load_progress()
    assert saved.stage_index == 4 and saved.state.filled() == {
        1
    }  # Development kept, nothing of the Architect

    again = World.load(world_dir, limits=Limits(stage_seconds=30))  # a restarted driver, a bigger limit
    report = again.step()
    assert report.ran == ["development", "architect", "creator"] and report.state.filled() == {1, 2, 3}
    assert report.state.happening == saved.state.happening  # Development was not run again
    assert again.step().episode == 1


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_block_2_can_name_a_pipeline_of_any_family(family, world_dir):
    """The Creator holds one pipeline per family; the Architect's block 2 picks one by name and it draws."""
    config = fast_config()
    config["stages"]["creator"] = {
        "pipelines": {
            name: {"template": "text_to_image", "params": {"preset": "tiny", "family": name, "steps": 2}}
            for name in ("sd", "sdxl", "sd3", "flux")
        }
    }
    config["stages"]["architect"]["nodes"]["llm"]["config"]["template"] = (
        f'{{"pipeline": "{family}", "prompt": "a ship at dawn", "width": 32, "height": 48, "steps": 2}}'  # a short prompt: the tiny T5 vocabulary spells most words letter by letter, past T5's 256 tokens
    )
    world = World.from_config(config, directory=world_dir)
    world.run(2)
    state, _ = world.storage.load_episode(1)
    assert state.generation[0].pipeline == family
    (artifact,) = state.artifacts
    assert Image.open(world.storage.artifact_path(artifact)).size == (32, 48)
