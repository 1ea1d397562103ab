"""The world driver actor: one named, long-lived actor per world; steps serialised; a killed driver resumes."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import ray
import yaml

from tests.conftest import crash_actor
from worldgen.errors import ConfigError
from worldgen.stage import CYCLE
from worldgen.storage import WorldDamagedError, WorldExistsError, WorldStorage

ROOT = Path(__file__).resolve().parents[2]


def fast_config(steps: int = 2) -> dict:
    """The offline default world, small: `steps` denoising steps at 32x32 on the tiny preset."""
    config = yaml.safe_load((ROOT / "configs/worlds/default.yaml").read_text())
    config["generation_defaults"] = {"width": 32, "height": 32, "steps": steps, "guidance": 7.5}
    config["stages"]["creator"] = {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}}
    return config


@pytest.fixture
def new_dir(ray_session, tmp_path):
    """Fresh world directories; every driver of them is stopped at the end (nothing is left behind)."""
    from actors.world_driver import driver_name, stop_world

    made: list[Path] = []

    def make(name: str = "world") -> Path:
        made.append(tmp_path / name)
        return made[-1]

    yield make
    for directory in made:
        stop_world(directory)
    deadline = time.monotonic() + 20
    while any(_alive(driver_name(d)) for d in made) and time.monotonic() < deadline:
        time.sleep(0.1)


def _alive(name: str) -> bool:
    from actors.cluster import get_named

    try:
        get_named(name)
    except ValueError:  # no actor of that name any more
        return False
    return True


def progress_on_disk(directory: Path):
    try:
        return WorldStorage(directory).load_progress()
    except ConfigError:  # a file being replaced right now: read again
        return None


def check_episodes(directory: Path, steps: int) -> None:
    """After `steps` steps from an empty start: episodes 1..steps-1, each once, content history to match."""
    storage = WorldStorage(directory)
    assert storage.load_progress().step == steps
    assert storage.load_progress().stage_index == 0
    numbers = storage.episodes()
    assert numbers == list(range(1, steps)), numbers
    content = json.loads(storage.content_path.read_text())
    assert len(content["history"]) == len(numbers)
    states = [storage.load_episode(n) for n in numbers]
    assert len({state.id for state, _ in states}) == len(numbers)  # no state saved twice
    assert [meta["step"] for _, meta in states] == list(range(2, steps + 1))


def test_driver_steps_and_answers(new_dir):
    from actors.world_driver import RemoteWorld, driver_name, list_worlds

    directory = new_dir("quay")  # the world "harbor" in the directory "quay"
    world = RemoteWorld(directory, fast_config())
    # named from the directory alone: its name and the hash of its resolved path
    assert world.name == driver_name(directory) and world.name.startswith("wg-world-quay-")
    first = world.step()
    assert first["step"] == 1 and first["episode"] is None
    assert first["ran"] == ["development", "architect", "creator"]
    second = world.step(action="a storm rolls in")
    assert second["step"] == 2 and second["episode"] == 1
    assert second["ran"] == list(CYCLE)

    state = world.state()
    assert state["happening"] and state["generation"] and state["artifacts"]
    history = world.history()
    assert [h["episode"] for h in history] == [1]
    assert history[0]["step"] == 2 and history[0]["state"]["outcome"]
    info = world.info()
    assert info["name"] == "harbor" and info["directory"] == str(directory.resolve())
    assert (info["step"], info["stage_index"], info["episodes"]) == (2, 0, 1)
    assert info["actor"] == world.name and not info["restarted"]
    assert world.progress()["last_stage"] == "creator"
    assert any(w["actor"] == world.name and w["step"] == 2 for w in list_worlds())

    episode = directory / "episodes" / "000001"
    assert (episode / "state.json").is_file() and (episode / "meta.json").is_file()
    assert list(episode.glob("*.png"))
    assert world.report() == str(directory.resolve() / "report.html")
    assert (directory / "report.md").is_file() and (directory / "report.html").is_file()
    check_episodes(directory, 2)

    # same world, other directory (of the same name too): another driver
    other = new_dir("other")
    assert driver_name(other) != world.name
    assert driver_name(other / "quay").startswith("wg-world-quay-")
    assert driver_name(other / "quay") not in (world.name, driver_name(other))
    world.shutdown()


def test_concurrent_steps_are_serialised(ray_session, new_dir):
    from actors.world_driver import get_or_create_driver

    directory = new_dir()
    handle = get_or_create_driver(directory, fast_config(steps=20))
    refs = [handle.step.remote() for _ in range(3)]
    # progress() answers from its own concurrency group while the steps run
    seen_running = False
    while ray_session.wait(refs, num_returns=len(refs), timeout=0.02)[1]:
        seen_running |= ray_session.get(handle.progress.remote(), timeout=10)["running"]
    reports = ray_session.get(refs)
    assert [r["step"] for r in reports] == [1, 2, 3]
    assert [r["episode"] for r in reports] == [None, 1, 2]
    for report in reports[1:]:
        assert report["ran"] == list(CYCLE) and report["skipped"] == []
    assert seen_running
    check_episodes(directory, 3)


def step_to(name: str, directory: Path, target: int, ray) -> None:
    """Step through the driver looked up by name until `target` steps are complete (a call that reached a
    restarting driver fails and is simply repeated: each step first finishes the interrupted one)."""
    from actors.cluster import NAMESPACE

    for _ in range(target + 10):
        if WorldStorage(directory).load_progress().step >= target:
            return
        try:
            ray.get(ray.get_actor(name, namespace=NAMESPACE).step.remote(), timeout=120)
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    raise AssertionError(f"could not reach step {target}")


def test_killed_driver_resumes_without_losing_or_duplicating_episodes(ray_session, new_dir):
    """Killing the world driver actor between stages, then stepping again, continues from the persisted state
    with no episode lost or duplicated."""
    from actors.world_driver import RemoteWorld

    ray = ray_session
    directory = new_dir()
    world = RemoteWorld(directory, fast_config(steps=30))  # a slow Creator: kills land mid-step
    world.run(2)
    pid = world.info()["pid"]

    handle = world.handle
    in_flight = handle.step.remote()
    deadline = time.monotonic() + 60
    while True:
        progress = progress_on_disk(directory)
        if progress is not None and progress.step == 2 and 1 <= progress.stage_index <= 5:
            break
        assert time.monotonic() < deadline, "the step never persisted a stage"
        time.sleep(0.002)
    crash_actor(handle)
    with pytest.raises(ray.exceptions.RayActorError):  # ActorUnavailableError: the driver was restarted
        ray.get(in_flight, timeout=120)

    # the restarted driver resumed the persisted state, mid-step
    persisted = WorldStorage(directory).load_progress()
    assert persisted.step == 2 and 1 <= persisted.stage_index <= 5
    info = world.info()
    assert info["restarted"] and info["pid"] != pid
    assert (info["step"], info["stage_index"]) == (2, persisted.stage_index)
    report = world.step()  # finishes the interrupted step: step 3, every stage once
    assert report["step"] == 3 and report["episode"] == 2
    assert report["ran"] + report["skipped"] == list(CYCLE)
    check_episodes(directory, 3)

    # a few more kills at random points, stepping again through the name each time
    rng = random.Random(0)
    target, interrupted = 3, 0
    for attempt in range(3):
        ref = ray.get_actor(world.name, namespace="worldgen").step.remote()
        while (p := progress_on_disk(directory)) is None or (p.step == target and p.stage_index == 0):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.4))
        crash_actor(ray.get_actor(world.name, namespace="worldgen"))
        try:
            ray.get(ref, timeout=120)
        except ray.exceptions.RayActorError:  # killed mid-step (one landing after the step is fine too)
            interrupted += 1
        target += 2
        if attempt % 2:
            assert world.run_until(target) == target  # the same, through the Python API
        else:
            step_to(world.name, directory, target, ray)
        check_episodes(directory, target)
    assert interrupted >= 1
    assert world.info()["step"] == target
    assert len(world.history()) == target - 1
    world.shutdown()


def test_existing_directory_resumes_without_config(ray_session, new_dir):
    from actors.world_driver import RemoteWorld, WorldDriver, driver_name, get_or_create_driver, list_worlds

    directory = new_dir()
    world = RemoteWorld(directory, fast_config())
    world.run(2)
    world.shutdown()

    again = RemoteWorld(directory)  # no config: continues the world on disk
    info = again.info()
    assert info["resumed"] and (info["step"], info["episodes"]) == (2, 1)
    assert [h["episode"] for h in again.history()] == [1]
    with pytest.raises(ConfigError, match="different world"):
        RemoteWorld(directory, {**fast_config(), "seed": 7})
    again.shutdown()

    empty = new_dir("empty")
    with pytest.raises(ConfigError, match="no world in .* and no config given"):
        RemoteWorld(empty)
    with pytest.raises(ConfigError, match="no world in"):  # the actor says the same
        ray_session.get(WorldDriver.remote(str(empty)).ready.remote())
    with pytest.raises(ConfigError, match="exactly the stages"):  # a bad config: raised, no driver left
        get_or_create_driver(empty, {"kind": "world", "name": "bad", "stages": {}})
    deadline = time.monotonic() + 10
    while [w for w in list_worlds() if w["actor"] == driver_name(empty)]:
        assert time.monotonic() < deadline, "the driver of a bad config was left behind"
        time.sleep(0.1)


def test_a_world_with_a_ref_survives_its_driver(ray_session, new_dir, tmp_path, monkeypatch):
    """A `ref:` in a mapping config is read once, on the caller's side (relative to its working directory),
    and stored resolved: a killed driver restarts from world.yaml alone, answers and steps."""
    from actors.world_driver import RemoteWorld

    monkeypatch.chdir(tmp_path)
    Path("glossary.yaml").write_text(yaml.safe_dump({"the fog": "it leaves objects behind"}))
    config = fast_config()
    config["initial_world"]["glossary"] = {"ref": "glossary.yaml"}  # free-form, as `extra_body` is
    directory = new_dir()
    world = RemoteWorld(directory, config)
    assert world.step()["step"] == 1
    Path("glossary.yaml").unlink()  # nothing may read it again
    pid = world.info()["pid"]
    crash_actor(world.handle)
    info = world.info()
    assert info["restarted"] and info["pid"] != pid and info["step"] == 1
    assert world.step()["step"] == 2 and world.step()["episode"] == 2
    world.shutdown()


def test_a_damaged_world_is_named_at_driver_start(ray_session, new_dir):
    from actors.world_driver import RemoteWorld

    directory = new_dir()
    world = RemoteWorld(directory, fast_config())
    world.run(3)
    world.shutdown()
    (directory / "episodes/000002/meta.json").write_text("garbage")
    with pytest.raises(
        WorldDamagedError, match="world damaged: episode 2: episodes/000002/meta.json is unread"
    ):
        RemoteWorld(directory)


def test_a_driver_found_by_name_must_hold_the_callers_world(ray_session, new_dir):
    """Configs for one directory share its driver: a caller that reaches the driver another caller's create
    started (its world.yaml not written yet) is refused, never handed that world as its own."""
    from actors.world_driver import get_or_create_driver

    directory = new_dir()
    first = get_or_create_driver(directory, fast_config(), wait=False)
    with pytest.raises(WorldExistsError, match="already holds a different world"):
        get_or_create_driver(directory, {**fast_config(), "seed": 7})
    assert ray_session.get(first.ready.remote(), timeout=120)  # the first world is intact
    assert WorldStorage(directory).load_config()["seed"] == 0


def test_a_restarted_driver_keeps_its_limits(new_dir):
    from actors.world_driver import RemoteWorld
    from worldgen.limits import LimitExceeded, Limits

    world = RemoteWorld(new_dir(), fast_config(), limits=Limits(max_steps=2))  # the defaults ask for 2
    too_many = {1: "a ship", 2: {"prompt": "a ship", "width": 32, "height": 32, "steps": 3}}
    with pytest.raises(LimitExceeded, match=r"3 steps is over 2 \(limit 'max_steps'\)") as err:
        world.step(state=too_many)
    assert err.value.limit == "max_steps"  # the error crossed from the driver with its type and limit
    pid = world.info()["pid"]
    world.kill()  # Ray restarts the driver with its constructor's arguments: the limits come back with it
    deadline = time.monotonic() + 60

    def current_pid() -> int:
        try:
            return world.info()["pid"]
        except ray.exceptions.ActorUnavailableError:  # still restarting (slow on a busy machine)
            return pid

    while current_pid() == pid and time.monotonic() < deadline:
        time.sleep(0.2)
    assert world.info()["restarted"]
    with pytest.raises(LimitExceeded, match="limit 'max_steps'"):
        world.step(state=too_many)
    assert world.info()["step"] == 0
