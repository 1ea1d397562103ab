"""A world on the S3 test server run by its driver on a multi-node cluster (tests/sim_cluster.py), and the loss of
the node that holds its driver and model hosts in the middle of a step: Ray brings both back on another node, the
restarted driver reads the world from the store (that node's cache starts empty), and the world goes on with no
episode lost or duplicated."""

from __future__ import annotations

import json
import time

import pytest
import ray

from actors.model_host import list_hosts, unload_hosts
from actors.world_driver import RemoteWorld
from tests.sim_cluster import node_of, wait_until, world_config
from worldgen.stage import CYCLE
from worldgen.storage import WorldStorage
from worldgen.stores import Store, child_uri

SLOW_CREATOR_STEPS = 10  # denoising steps: the Creator runs long enough to be caught running on the store
TIMEOUT_S = 600  # one call, on a busy 2-core machine
STAGES = len(CYCLE)
TARGET = 5  # steps completed at the end: episodes 1..4


def committed(uri: str) -> list[tuple[int, str]]:
    """(episode, state id) of every commit object on the store, as listed (duplicates would show)."""
    found = []
    for key in Store(uri).list("commits"):
        name = key.rpartition("/")[2]
        number, state_id, _ = name.split(".", 2)
        found.append((int(number), state_id))
    return sorted(found)


def check_world(uri: str, steps: int) -> None:
    """After `steps` steps from an empty start: episodes 1..steps-1 on the store, each committed once with its
    own state id, and the content's history has one entry per episode."""
    storage = WorldStorage(uri)
    progress = storage.load_progress()
    assert (progress.step, progress.stage_index) == (steps, 0)
    numbers = storage.episodes()
    assert numbers == list(range(1, steps)), numbers
    commits = committed(uri)
    assert [n for n, _ in commits] == numbers, commits  # no gap, no episode committed twice
    assert len({state_id for _, state_id in commits}) == len(commits)  # no state saved twice
    for number, state_id in commits:
        state, meta = storage.load_episode(number)
        assert state.id == state_id and meta["step"] == number + 1
    content = json.loads(Store(uri).get("content.json"))
    assert len(content["history"]) == len(numbers)


def on_store(uri: str):
    """The resume point on the store (None while it is being replaced)."""
    try:
        return WorldStorage(uri).load_progress()
    except Exception:  # a read racing the writer's PUT: ask again
        return None


@pytest.fixture
def world_uri(sim_cluster, s3_root):
    """A world root on the S3 test server; its driver and the model hosts are stopped at the end."""
    uri = child_uri(s3_root, "harbor")
    unload_hosts()
    yield uri
    from actors.world_driver import stop_world

    stop_world(uri)
    unload_hosts()


def test_a_world_on_the_store_survives_the_loss_of_its_node(sim_cluster, world_uri):
    (first,) = sim_cluster.keep_gpu_nodes(1)  # the only worker: the driver and the hosts land there
    world = RemoteWorld(world_uri, world_config(steps=SLOW_CREATOR_STEPS), timeout=TIMEOUT_S)
    started = time.monotonic()
    reports = world.run(2)
    assert [r["episode"] for r in reports] == [None, 1]
    print(f"\ntwo steps on the cluster in {time.monotonic() - started:.1f}s")
    check_world(world_uri, 2)  # the episode is committed on the store
    assert node_of(world.name) == first.node_id
    hosts = list_hosts()
    assert len(hosts) == 3 and {h["node_id"] for h in hosts} == {first.node_id}
    first_cache = sim_cluster.cache_of(first) / "worlds"
    assert any(first_cache.iterdir())  # the driver's working copy, on its own node

    second = sim_cluster.add_gpu_node()
    in_flight = world.handle.step.remote()
    progress = wait_until(
        lambda: (p := on_store(world_uri)) is not None and (p.step > 2 or p.stage_index == STAGES - 1) and p,
        "the Creator of step 3 to start",
    )
    assert progress.step == 2, "step 3 ended before the node was killed: slow the Creator down"
    killed = time.monotonic()
    sim_cluster.remove(first)  # every process of the node: the driver, the hosts, their workers
    removed = time.monotonic() - killed
    with pytest.raises(ray.exceptions.RayActorError):  # the step in flight died with its driver
        ray.get(in_flight, timeout=TIMEOUT_S)

    # Step again until a step goes through: the restarted driver first finishes the interrupted step.
    report = None
    while report is None:
        assert time.monotonic() - killed < TIMEOUT_S, f"the world did not come back within {TIMEOUT_S} s"
        try:
            report = world.step()
        except ray.exceptions.RayActorError:  # its node is not declared dead yet, or it is restarting
            time.sleep(0.2)
    failover = time.monotonic() - killed
    print(
        f"\nfailover: node killed -> first step done in {failover:.1f}s (removing the node took {removed:.1f}s)"
    )
    assert report["step"] == 3 and report["episode"] == 2
    assert report["ran"] + report["skipped"] == list(CYCLE)  # every stage of the step once, no more

    info = world.info()
    assert info["restarted"] and node_of(world.name) == second.node_id
    hosts = list_hosts()
    assert len(hosts) == 3 and {h["node_id"] for h in hosts} == {second.node_id}
    assert any((sim_cluster.cache_of(second) / "worlds").iterdir())  # read from the store into its own cache

    assert world.run_until(TARGET) == TARGET
    check_world(world_uri, TARGET)
    assert [h["episode"] for h in world.history()] == list(range(1, TARGET))
