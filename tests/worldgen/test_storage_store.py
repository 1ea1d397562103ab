"""A world stored on an object store (a real S3 API: moto's server on 127.0.0.1): episodes become visible by one
commit object, nothing is renamed or appended there, the resume point is one whole object, in-flight artifacts are
published, and a fresh node (an empty cache) continues the world with no episode lost or saved twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worldgen.test_world import fast_config
from worldgen.storage import WorldStorage
from worldgen.stores import Store, child_uri
from worldgen.world import World


@pytest.fixture
def world_uri(s3_root):
    return child_uri(s3_root, "harbor")


def another_node(monkeypatch, tmp_path, name: str) -> None:
    """From here on, this process has the empty cache of a node that never saw the world."""
    monkeypatch.setenv("WORLDGEN_CACHE_DIR", str(tmp_path / name))


def test_the_store_holds_the_layout_with_one_commit_per_episode(world_uri):
    world = World.from_config(fast_config(), directory=world_uri)
    world.run(3)
    keys = Store(world_uri).list(recursive=True)
    commits = [k for k in keys if k.startswith("commits/")]
    assert [k.split(".")[0] for k in commits] == ["commits/000001", "commits/000002"]
    index = {n: state_id for n, state_id in WorldStorage(world_uri)._commits()}
    for n, state_id in index.items():
        commit = json.loads(Store(world_uri).get(commits[n - 1]))
        assert commit["state_id"] == state_id and commit["episode"] == n
        for name, size in commit["files"].items():  # every file the commit lists is there, whole
            assert Store(world_uri).size(f"episodes/{n:06d}/{name}") == size
    # nothing a local disk would rename or append: no temp objects, no episode index, one line of progress
    assert not any("/.tmp" in k or k.startswith(".tmp") or k.endswith(".tmp") for k in keys)
    assert "episodes/index.jsonl" not in keys
    progress = Store(world_uri).get("progress.jsonl")
    assert progress.count(b"\n") == 1 and json.loads(progress)["step"] == 3
    assert "report.html" in world.write_report().name and "report.html" in Store(world_uri).list()
    # the in-flight state's picture is on the store too (a driver resumed elsewhere needs it)
    assert world.state.artifacts and Store(world_uri).exists(world.state.artifacts[0].path)


def test_an_episode_without_its_commit_is_invisible_and_saved_once_on_resume(
    world_uri, monkeypatch, tmp_path
):
    world = World.from_config(fast_config(), directory=world_uri)
    world.run(2)  # episode 1
    put = Store.put

    def lose_commits(self, key, data):  # the node dies after uploading episode 2's files, before its commit
        if key.startswith("commits/"):
            raise RuntimeError("node lost")
        put(self, key, data)

    monkeypatch.setattr(Store, "put", lose_commits)
    with pytest.raises(RuntimeError, match="node lost"):
        world.step()
    monkeypatch.setattr(Store, "put", put)
    reader = WorldStorage(world_uri)
    assert Store(world_uri).exists("episodes/000002/state.json")  # written ...
    assert reader.episodes() == [1] and reader.check() == []  # ... but not committed: not the world's yet
    with pytest.raises(FileNotFoundError):
        reader.read_artifact("episodes/000002/000.png")

    another_node(monkeypatch, tmp_path, "node-b")
    again = World.load(world_uri)
    assert again.step().episode == 2  # the interrupted step finishes: episode 2, once
    again.run(2)
    storage = WorldStorage(world_uri)
    assert storage.episodes() == [1, 2, 3, 4]
    states = [storage.load_episode(n)[0].id for n in storage.episodes()]
    assert len(set(states)) == 4 and len(again.content.history) == 4


def test_a_fresh_node_reads_the_world_from_the_store(world_uri, monkeypatch, tmp_path):
    world = World.from_config(fast_config(), directory=world_uri)
    world.run(3)
    picture = world.storage.load_episode(1)[0].artifacts[0]
    local_bytes = (world.directory / picture.path).read_bytes()
    another_node(monkeypatch, tmp_path, "node-c")
    reader = WorldStorage(world_uri)
    assert not reader.root.exists()  # nothing cached on this node
    assert reader.exists() and reader.load_config()["name"] == world.settings.name
    assert reader.load_content().history == world.content.history
    assert reader.load_progress().step == 3
    # artifacts stream: a slice is one ranged read, the size comes from the store
    assert reader.artifact_size(picture.path) == len(local_bytes)
    assert reader.read_artifact(picture.path, 8, 24) == local_bytes[8:24]
    assert reader.read_artifact(picture.path) == local_bytes
    assert not (reader.root / picture.path).exists()  # read without a local copy
    # the Philosopher and training read files: fetched into this node's cache on demand
    assert reader.local_artifact(picture).read_bytes() == local_bytes
    # world.yaml and content.json are not artifacts, whatever the store holds
    with pytest.raises(Exception, match="expected a file under episodes/ or artifacts/"):
        reader.read_artifact("world.yaml")


def test_a_world_under_a_root_of_worlds_is_listed(s3_root):
    World.from_config(fast_config(), directory=child_uri(s3_root, "a")).step()
    World.from_config(fast_config() | {"seed": 5}, directory=child_uri(s3_root, "b"))
    Store(s3_root).put("not-a-world/readme.txt", b"x")
    assert WorldStorage.world_dirs(s3_root) == [child_uri(s3_root, "a"), child_uri(s3_root, "b")]
    assert WorldStorage.is_world(child_uri(s3_root, "a")) and not WorldStorage.is_world(
        child_uri(s3_root, "not-a-world")
    )


def test_a_trained_world_keeps_its_weights_and_prompts_on_the_store(world_uri, monkeypatch, tmp_path):
    config = fast_config()
    world = World.from_config(config, directory=world_uri)
    saved = world.save()  # weights into checkpoints/, published
    keys = Store(world_uri).list("checkpoints", recursive=True)
    assert keys and all(Store(world_uri).size(k) == (saved / k).stat().st_size for k in keys)
    another_node(monkeypatch, tmp_path, "node-d")
    again = World.load(world_uri)
    assert Path(again.storage.checkpoints_dir).is_dir()  # fetched before the weights were loaded
