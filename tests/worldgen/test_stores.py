"""Store URIs (worldgen/stores.py) on a real S3 API (moto's server on 127.0.0.1): whole-object writes, ranged reads,
listings, and a clear error naming the setting for each way a root cannot be used, before any world step."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port, s3_uri
from tests.worldgen.test_world import fast_config
from worldgen.errors import ConfigError
from worldgen.stores import Store, StoreError, child_uri, is_uri, local_path, open_store
from worldgen.world import World


def test_uris_and_local_paths():
    assert is_uri("s3://bucket/w") and is_uri("gs://bucket/w")
    assert not is_uri("worlds/w") and not is_uri("/tmp/w") and not is_uri("file:///tmp/w")
    assert str(local_path("file:///tmp/w")) == "/tmp/w"
    assert child_uri("s3://b/root?endpoint_override=h:1&scheme=http", "w") == (
        "s3://b/root/w?endpoint_override=h:1&scheme=http"
    )


def test_objects_are_written_whole_read_in_ranges_listed_and_deleted(s3_root):
    store = open_store(s3_root)
    store.put("episodes/000001/state.json", b"{}")
    store.put("episodes/000001/000.png", bytes(range(200)))
    store.put("world.yaml", b"name: w\n")
    assert store.get("episodes/000001/000.png", 10, 20) == bytes(range(10, 20))  # one ranged read
    assert store.get("episodes/000001/000.png", 190) == bytes(range(190, 200))
    assert store.get("episodes/000001/000.png", 300, 400) == b""
    assert store.get("missing.json") is None and store.size("missing.json") is None
    assert store.size("episodes/000001/000.png") == 200
    assert store.list() == ["episodes/", "world.yaml"]
    assert store.list("episodes", recursive=True) == ["episodes/000001/000.png", "episodes/000001/state.json"]
    store.delete_prefix("episodes")
    assert store.list("episodes", recursive=True) == [] and store.exists("world.yaml")


def test_a_scheme_without_a_filesystem_is_named():
    with pytest.raises(
        StoreError, match=r"the world root 'nosuch://bucket/w': no filesystem is installed"
    ) as info:
        Store("nosuch://bucket/w")
    assert isinstance(info.value, ConfigError)  # the CLI's exit 2, the gateway's 400


def test_missing_credentials_are_named_before_any_request(monkeypatch, tmp_path, s3_server):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws here
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        StoreError, match="no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    ):
        Store(s3_uri(s3_server, "w"), setting="--out")


def test_an_unreachable_store_is_named_before_any_step(tmp_path):
    nothing_there = s3_uri(f"127.0.0.1:{free_port()}", "worlds/w")
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        World.from_config(fast_config(), directory=nothing_there)
    message = str(info.value)
    assert message.startswith("the world root 's3://worldgen-test/worlds/w'") and "does not answer" in message
    assert "endpoint_override" in message  # the setting to fix
    assert time.monotonic() - started < 60


def test_credentials_in_the_uri_are_refused_without_showing_them(s3_server):
    with pytest.raises(StoreError, match="give them in the environment") as info:
        Store(s3_uri(s3_server, "w").replace("s3://", "s3://KEYID:SECRETKEY@"))
    assert "SECRETKEY" not in str(info.value)
