"""The world gateway at scale: two replicas answer any world, and a world whose driver is down is still read
from its storage (serve_apps/world_reads.py) while steps get 503 + Retry-After, never a 500."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_apps.world_reads import saved_episodes, saved_info, saved_state
from worldgen.storage import WorldStorage

PREFIX = "/reads-test"
SMALL = {"template": "offline_world", "params": {"preset": "tiny", "size": 32, "steps": 2, "seed": 5}}


@pytest.fixture(scope="module")
def gateway(serve_url, tmp_path_factory):
    """The gateway with two replicas (a sliver of a CPU each: the session's Ray has two for the drivers) and a
    short driver timeout, so a driver that is restarting counts as down at once."""
    from ray import serve

    from serve_apps.world_gateway import app_builder

    root = tmp_path_factory.mktemp("worlds")
    args = {
        "root": str(root),
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 0.05},
        "driver_timeout_s": 0.5,
        "retry_after_s": 7,
        "token_env": "WORLDGEN_READS_TEST_NO_TOKEN",
    }
    serve.run(app_builder(args), name="reads-test", route_prefix=PREFIX)
    session = requests.Session()
    base = serve_url + PREFIX
    try:
        yield session, base, root
    finally:
        for world in session.get(base + "/v1/worlds", timeout=60).json()["worlds"]:
            session.delete(f"{base}/v1/worlds/{world['id']}", timeout=60)
        session.close()
        serve.delete("reads-test")


def _driver(root, world_id: str):
    import ray

    from actors.cluster import NAMESPACE
    from actors.world_driver import driver_name

    return ray.get_actor(driver_name(root / world_id), namespace=NAMESPACE)


def test_any_replica_answers_any_world(gateway):
    session, base, _ = gateway
    assert session.post(base + "/v1/worlds", json={"id": "shared", **SMALL}, timeout=300).status_code == 201
    for _ in range(2):
        assert session.post(base + "/v1/worlds/shared/step", timeout=300).status_code == 200

    def read(path: str) -> requests.Response:
        with requests.Session() as own:  # its own connection: the proxy spreads requests over replicas
            return own.get(base + path, timeout=60)

    paths = ["/v1/worlds/shared", "/v1/worlds/shared/episodes", "/v1/worlds/shared/episodes/1"] * 20
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(read, paths))
    assert [a.status_code for a in answers] == [200] * len(paths), [a.text for a in answers if not a.ok]
    assert all(a.json()["id"] == "shared" for a in answers[::3])
    assert len({a.headers["X-Replica-Id"] for a in answers}) == 2  # both replicas answered, all correctly
    step = session.post(base + "/v1/worlds/shared/step", timeout=300)  # and a step from either replica
    assert step.status_code == 200 and step.json()["step"] == 3 and step.headers["X-Replica-Id"]


def _reads(session, base: str, world_id: str, root) -> dict:
    """Every read route of a world, each asserted 200; the answers by route."""
    info = session.get(f"{base}/v1/worlds/{world_id}", timeout=60)
    assert info.status_code == 200, info.text
    page = session.get(f"{base}/v1/worlds/{world_id}/episodes", timeout=60)
    assert page.status_code == 200, page.text
    episode = session.get(f"{base}/v1/worlds/{world_id}/episodes/1", timeout=60)
    assert episode.status_code == 200, episode.text
    state = session.get(f"{base}/v1/worlds/{world_id}/state", timeout=60)
    assert state.status_code == 200, state.text
    (artifact,) = episode.json()["state"]["artifacts"]
    png = session.get(base + artifact["url"].removeprefix(PREFIX), timeout=60)
    assert png.status_code == 200 and png.content == (root / world_id / artifact["path"]).read_bytes()
    part = session.get(
        base + artifact["url"].removeprefix(PREFIX), headers={"Range": "bytes=0-7"}, timeout=60
    )
    assert part.status_code == 206 and part.content == b"\x89PNG\r\n\x1a\n"
    assert session.head(base + artifact["url"].removeprefix(PREFIX), timeout=60).status_code == 200
    missing = session.get(f"{base}/v1/worlds/{world_id}/episodes/99", timeout=60)
    assert missing.status_code == 404, missing.text
    return {"info": info.json(), "page": page.json(), "episode": episode.json(), "state": state.json()}


def test_reads_come_from_storage_while_the_driver_is_down_and_steps_get_503(gateway):
    import ray

    from actors.cluster import cluster_address, get_named
    from actors.world_driver import driver_name

    session, base, root = gateway
    assert session.post(base + "/v1/worlds", json={"id": "downed", **SMALL}, timeout=300).status_code == 201
    for _ in range(2):
        assert session.post(base + "/v1/worlds/downed/step", timeout=300).status_code == 200
    live = _reads(session, base, "downed", root)
    assert live["info"]["driver"] == "running"

    # Dead for good (no restart): every read answers from the storage, with what the driver answered; no read
    # starts a driver.
    ray.kill(_driver(root, "downed"), no_restart=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            get_named(driver_name(root / "downed"))
        except ValueError:
            break  # the name is free: the driver is gone
        assert time.monotonic() < deadline, "the killed driver kept its name"
        time.sleep(0.1)
    saved = _reads(session, base, "downed", root)
    assert saved["info"]["driver"] == "unavailable" and saved["info"]["pid"] is None
    for key in ("name", "title", "step", "episodes", "last_episode", "directory"):
        assert saved["info"][key] == live["info"][key], key
    assert saved["page"] == live["page"] and saved["episode"] == live["episode"]
    assert saved["state"] == live["state"]
    with pytest.raises(ValueError):
        get_named(driver_name(root / "downed"))  # reads started no driver

    # A step starts the driver again and the world goes on from where it was.
    step = session.post(base + "/v1/worlds/downed/step", timeout=300)
    assert step.status_code == 200 and step.json()["step"] == 3, step.text

    # Crashed (Ray restarts it): while it restarts, reads answer 200 and steps 503 with Retry-After.
    from ray.util.state import get_actor

    handle = _driver(root, "downed")
    actor_id = handle._actor_id.hex()  # Ray has no public id getter
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + 60
    while get_actor(actor_id, address=cluster_address()).state == "ALIVE":  # ray.kill is asynchronous
        assert time.monotonic() < deadline, "the driver was not killed"
        time.sleep(0.05)
    refused = session.post(base + "/v1/worlds/downed/step", timeout=60)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "7" and "unavailable" in refused.json()["detail"]
    statuses = set()
    deadline = time.monotonic() + 120
    while get_actor(actor_id, address=cluster_address()).state != "ALIVE":  # reads all through the restart
        statuses.add(session.get(base + "/v1/worlds/downed/episodes/1", timeout=60).status_code)
        assert time.monotonic() < deadline, "the driver did not come back"
    assert statuses <= {200}, statuses
    while (step := session.post(base + "/v1/worlds/downed/step", timeout=300)).status_code == 503:
        assert time.monotonic() < deadline, step.text
        time.sleep(0.2)
    assert step.status_code == 200 and step.json()["step"] == 4, step.text  # nothing lost, nothing twice
    assert session.get(base + "/v1/worlds/downed/episodes", timeout=60).json()["total"] == 3


def test_the_storage_answers_have_the_drivers_shapes_before_any_step(tmp_path):
    """A world that never stepped: step 0, no episodes, an empty state (what a fresh driver says)."""
    from worldgen.templates import build_world_template
    from worldgen.world import World

    world = World.from_config(build_world_template("offline_world", **SMALL["params"]), tmp_path / "w")
    storage = WorldStorage(tmp_path / "w")
    info = saved_info(storage, str(tmp_path / "w"))
    assert (info["step"], info["episodes"], info["last_episode"], info["running"]) == (0, 0, None, False)
    assert info["name"] == world.settings.name
    assert saved_episodes(storage, 0, 20) == {"total": 0, "offset": 0, "limit": 20, "items": []}
    assert saved_state(storage) == world.state.model_dump(mode="json")
