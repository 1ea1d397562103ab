"""The world gateway with its root on an S3-compatible store (moto's server on 127.0.0.1): worlds are created,
stepped, listed, read (artifacts in ranges, from the store) and deleted as on local disk, and a root the store
does not answer for is refused when the application is built, naming the setting."""

from __future__ import annotations

import pytest

from tests.conftest import free_port, s3_uri
from tests.serve_apps.test_world_gateway import SMALL, Client
from worldgen.storage import WorldStorage
from worldgen.stores import StoreError, child_uri

PREFIX = "/gateway-store-test"


@pytest.fixture(scope="module")
def store_gateway(serve_url, s3_server):
    from ray import serve

    from serve_apps.world_gateway import app_builder

    root = s3_uri(s3_server, "gateway-worlds")
    serve.run(app_builder({"root": root}), name="gateway-store-test", route_prefix=PREFIX)
    client = Client(serve_url + PREFIX)
    try:
        yield client, root
    finally:
        for world in client.get("/v1/worlds").json()["worlds"]:
            client.delete(f"/v1/worlds/{world['id']}")
        client.close()
        serve.delete("gateway-store-test")


def test_a_world_on_the_store_is_created_stepped_read_and_deleted(store_gateway):
    client, root = store_gateway
    assert client.post("/v1/worlds", json={"id": "isle", **SMALL}).status_code == 201
    for expected in (None, 1, 2):
        step = client.post("/v1/worlds/isle/step")
        assert step.status_code == 200 and step.json()["episode"] == expected, step.text
    storage = WorldStorage(child_uri(root, "isle"))
    assert storage.episodes() == [1, 2]  # committed on the store, where every node reads them
    assert [w["id"] for w in client.get("/v1/worlds").json()["worlds"]] == ["isle"]
    episode = client.get("/v1/worlds/isle/episodes/2").json()
    (artifact,) = episode["state"]["artifacts"]
    whole = client.get(artifact["url"].removeprefix(PREFIX))
    assert whole.status_code == 200 and whole.content == storage.read_artifact(artifact["path"])
    part = client.get(artifact["url"].removeprefix(PREFIX), headers={"Range": "bytes=4-19"})
    assert part.status_code == 206 and part.content == whole.content[4:20]

    assert client.delete("/v1/worlds/isle").status_code == 204
    assert client.get("/v1/worlds/isle").status_code == 404
    assert not storage.exists() and storage.store.list(recursive=True) == []


def test_a_root_the_store_does_not_answer_for_is_refused_at_build():
    from serve_apps.world_gateway import app_builder

    with pytest.raises(StoreError, match="the gateway's root 's3://worldgen-test/w'.*does not answer"):
        app_builder({"root": s3_uri(f"127.0.0.1:{free_port()}", "w")})
