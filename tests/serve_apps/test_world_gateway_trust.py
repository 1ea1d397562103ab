"""Configs posted to the world gateway are held to its trust policy: the server's keys and files reach no
endpoint, response, log or file, addresses off the allow-list are never called, and what is allowed works
(refs under a root are inlined and the world survives its driver's restart)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from tests.conftest import SERVER_KEY_ENV, crash_actor
from tests.openai_server import serve_openai
from tests.serve_apps.test_world_gateway import Client
from worldgen.templates import build_template

PREFIX = "/gateway-trust"
OUTSIDE = "OUTSIDE-FILE-CONTENT-9c41"


def small_world() -> dict:
    return build_template("offline_world", preset="tiny", size=32, steps=2, seed=3)


def with_development(node: dict) -> dict:
    config = small_world()
    config["stages"]["development"]["nodes"]["llm"] = node
    return config


def openai_node(url: str | None, **config) -> dict:
    base = {"model": "test-model", "api_key": f"${{env:{SERVER_KEY_ENV}}}", "prompt": "What happens next?"}
    if url is not None:
        base["base_url"] = url
    return {"type": "llm/openai", "config": {**base, "retries": 0, "temperature": 0, **config}}


@pytest.fixture(scope="module")
def trusted(serve_url, tmp_path_factory):
    """A gateway whose policy allows one root, one env name and one LLM URL; an 'attacker' server beside it."""
    from ray import serve

    from serve_apps.world_gateway import app_builder

    base = tmp_path_factory.mktemp("trust")
    root, outside, worlds = base / "server-files", base / "outside", base / "worlds"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "told.j2").write_text("Told at step {{ step }}: {{ content.title }}")
    (root / "stages").mkdir()
    (root / "stages" / "world_update.yaml").write_text(
        "name: world_update\nnodes:\n  llm: {type: llm/template, config: {template: 'file:told.j2'}}\n"
        "inputs: {context: llm.context}\noutputs: {text: llm.text}\n"
    )
    (outside / "prompts").mkdir(parents=True)
    (outside / "secret.yaml").write_text(f"secret: {OUTSIDE}\n")
    (outside / "prompts" / "passwd.j2").write_text(OUTSIDE)
    secret = os.environ[SERVER_KEY_ENV]
    with (
        serve_openai(api_key=secret) as allowed,
        serve_openai(api_key=secret) as attacker,
    ):
        trust = {"roots": [str(root)], "env": [SERVER_KEY_ENV], "urls": [allowed.url]}
        serve.run(
            app_builder({"root": str(worlds), "trust": trust}), name="gateway-trust", route_prefix=PREFIX
        )
        client = Client(serve_url + PREFIX)
        try:
            yield {
                "client": client,
                "root": root,
                "outside": outside,
                "worlds": worlds,
                "allowed": allowed,
                "attacker": attacker,
                "secret": secret,
            }
        finally:
            for world in client.get("/v1/worlds").json()["worlds"]:
                client.delete(f"/v1/worlds/{world['id']}")
            client.close()
            serve.delete("gateway-trust")


def create(client, config: dict, world_id: str):
    return client.post("/v1/worlds", json={"id": world_id, "config": config})


def assert_nowhere(needles: list[str], responses: list, *folders: Path) -> None:
    """None of `needles` in a response, in a file under `folders`, or in the Ray session's logs."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for response in responses:
        for needle in needles:
            assert needle not in response.text, f"{needle!r} in a response: {response.text[:300]}"
    for folder in [*folders, logs]:
        for file in folder.rglob("*"):
            if file.is_file() and not file.is_symlink():
                data = file.read_bytes()
                for needle in needles:
                    assert needle.encode() not in data, f"{needle!r} reached {file}"


def test_posted_configs_cannot_get_the_servers_keys_out(trusted):
    client, attacker, secret = trusted["client"], trusted["attacker"], trusted["secret"]
    port = attacker.url.split(":")[2].split("/")[0]
    attempts = {
        "base_url": openai_node(attacker.url),  # the server's key sent as a bearer token to any host
        "api_key": openai_node(trusted["allowed"].url, api_key="${env:WORLDGEN_API_TOKEN}"),
        "model": openai_node(trusted["allowed"].url, model=f"${{env:{SERVER_KEY_ENV}}}"),
        "prompt": openai_node(trusted["allowed"].url, prompt=f"${{env:{SERVER_KEY_ENV}}}"),
    }
    responses = []
    for field, node in attempts.items():
        response = create(client, with_development(node), f"leak-{field.replace('_', '-')}")
        assert response.status_code == 400, response.text
        assert f"stages.development.nodes.llm.config.{field}" in response.json()["detail"]
        responses.append(response)
    internal = small_world()  # an endpoint item calling an address inside the cluster
    internal["stages"]["creator"] = {"endpoint": f"http://127.0.0.1:{port}/internal/admin"}
    responses.append(create(client, internal, "leak-endpoint"))
    assert responses[-1].status_code == 400 and "stages.creator.endpoint" in responses[-1].json()["detail"]
    assert attacker.requests == []  # nothing was ever sent there
    assert not any((trusted["worlds"] / f"leak-{f}").exists() for f in ("base-url", "api-key", "endpoint"))
    assert_nowhere([secret], responses, trusted["worlds"])


def test_posted_configs_cannot_read_files_outside_the_roots(trusted):
    client, outside = trusted["client"], trusted["outside"]
    attempts = {
        "prompts": {**small_world(), "prompts": str(outside / "prompts")},
        "prompts ..": {**small_world(), "prompts": "../outside/prompts"},
        "base": {**small_world(), "base": str(outside / "secret.yaml")},
        "ref": with_development(openai_node(None, extra_body={"ref": str(outside / "secret.yaml")})),
        "file": copy.deepcopy(small_world()),
    }
    attempts["file"]["stages"]["author"]["nodes"]["llm"]["config"]["template"] = "file:../../outside/x.j2"
    responses = []
    for what, config in attempts.items():
        response = create(client, config, "reader")
        assert response.status_code == 400, (what, response.text)
        responses.append(response)
    # The id was never taken: nothing of the refused worlds stays, and the id can be used at once.
    assert not (trusted["worlds"] / "reader").exists()
    assert create(client, small_world(), "reader").status_code == 201
    assert client.delete("/v1/worlds/reader").status_code == 204
    # A missing file and one outside the roots are refused alike: the answer tells nothing about the disk.
    missing = create(client, {**small_world(), "base": "no/such/world.yaml"}, "probe")
    linked = trusted["root"] / "escape.yaml"
    linked.symlink_to(outside / "secret.yaml")
    escaped = create(client, {**small_world(), "base": "escape.yaml"}, "probe")
    assert missing.status_code == escaped.status_code == 400
    assert missing.json()["detail"].replace("no/such/world.yaml", "X") == escaped.json()["detail"].replace(
        "escape.yaml", "X"
    )
    assert_nowhere([OUTSIDE], [*responses, missing, escaped], trusted["worlds"])


def test_allowed_key_and_url_reach_only_the_allowed_server(trusted):
    client, allowed, secret = trusted["client"], trusted["allowed"], trusted["secret"]
    config = with_development(openai_node(allowed.url))
    assert create(client, config, "keyed").status_code == 201
    before = len(allowed.chat_requests)
    step = client.post("/v1/worlds/keyed/step")
    assert step.status_code == 200, step.text
    assert step.json()["state"]["happening"].startswith("echo:")
    sent = allowed.chat_requests[before:]
    assert len(sent) == 1 and sent[0].authorized  # the key went there, and only there
    assert trusted["attacker"].requests == []
    stored = (trusted["worlds"] / "keyed" / "world.yaml").read_text()
    assert f"${{env:{SERVER_KEY_ENV}}}" in stored
    assert_nowhere([secret], [step], trusted["worlds"])


def test_refs_under_a_root_are_stored_resolved_and_survive_a_driver_restart(trusted):
    import ray

    from actors.cluster import NAMESPACE
    from actors.world_driver import driver_name

    client, worlds = trusted["client"], trusted["worlds"]
    config = {**small_world(), "prompts": "prompts"}
    config["stages"]["world_update"] = {"ref": "stages/world_update.yaml"}
    assert create(client, config, "included").status_code == 201
    stored = (worlds / "included" / "world.yaml").read_text()
    assert "ref" not in stored and "file:told.j2" in stored and str(trusted["root"]) in stored
    for _ in range(2):
        assert client.post("/v1/worlds/included/step").status_code == 200
    crash_actor(ray.get_actor(driver_name(worlds / "included"), namespace=NAMESPACE))
    step = client.post("/v1/worlds/included/step")
    for _ in range(20):  # the driver restarts and reloads the stored config: no 500, no "different world"
        if step.status_code != 503:
            break
        step = client.post("/v1/worlds/included/step")
    assert step.status_code == 200, step.text
    episode = client.get("/v1/worlds/included/episodes/1").json()
    assert episode["state"]["outcome"]
    assert client.get("/v1/worlds/included").json()["restarted"] is True
    assert "Told at step 3" in (worlds / "included" / "content.json").read_text()


def test_posted_work_is_bounded_before_any_model_runs(trusted):
    """A template that would build a gigabyte, one that escapes the sandbox, and generation settings over the
    server's limits: each a 400 naming the limit or the rule, and the world stays usable."""
    client = trusted["client"]
    big = small_world()
    big["generation_defaults"] |= {"width": 4096, "height": 4096}  # valid for block 2, over max_image_side
    refused = create(client, big, "huge")
    assert refused.status_code == 400 and "max_image_side" in refused.json()["detail"], refused.text
    assert not (trusted["worlds"] / "huge").exists()

    for world_id, template in [
        ("bomb", "{{ 'x' * 10**9 }}"),
        ("escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ]:
        config = small_world()
        config["stages"]["development"]["nodes"]["llm"]["config"]["template"] = template
        assert create(client, config, world_id).status_code == 201
        step = client.post(f"/v1/worlds/{world_id}/step")
        assert step.status_code == 400, step.text
        assert ("template_chars" if world_id == "bomb" else "sandbox") in step.json()["detail"]
        assert client.get(f"/v1/worlds/{world_id}").json()["step"] == 0  # nothing of the step was kept
