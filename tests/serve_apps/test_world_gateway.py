"""The world gateway over real HTTP: Serve on 127.0.0.1, worlds created, stepped and read through it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from actors.world_driver import ArtifactNotFound
from tests.conftest import crash_actor
from worldgen.config import load_config_file
from worldgen.errors import ConfigError, ExecutionError, StepInFlightError
from worldgen.limits import DeadlineExceeded, LimitExceeded
from worldgen.storage import Damage, WorldDamagedError, WorldExistsError

TOKEN = "gateway-test-token"
PREFIX = "/gateway-test"


class Client(requests.Session):
    """requests with a base URL and a default timeout."""

    def __init__(self, base_url: str, headers: dict | None = None):
        super().__init__()
        self.base_url = base_url
        self.headers.update(headers or {})

    def request(self, method, url, *args, **kwargs):
        kwargs.setdefault("timeout", 300)
        return super().request(method, self.base_url + url, *args, **kwargs)


SMALL = {"template": "offline_world", "params": {"preset": "tiny", "size": 32, "steps": 2, "seed": 3}}


@pytest.fixture(scope="module")
def gateway(serve_url, tmp_path_factory):
    """The gateway app with a token (read from the environment where the app is built, as in production)."""
    from ray import serve

    from serve_apps.world_gateway import app_builder

    root = tmp_path_factory.mktemp("worlds")
    os.environ["WORLDGEN_API_TOKEN"] = TOKEN
    try:
        app = app_builder({"root": str(root), "max_body_bytes": 64 * 1024})
    finally:
        del os.environ["WORLDGEN_API_TOKEN"]
    serve.run(app, name="gateway-test", route_prefix=PREFIX)
    client = Client(serve_url + PREFIX, {"Authorization": f"Bearer {TOKEN}"})
    try:
        yield client, root
    finally:
        for world in client.get("/v1/worlds").json()["worlds"]:  # stop every driver the tests started
            client.delete(f"/v1/worlds/{world['id']}")
        client.close()
        serve.delete("gateway-test")


def test_create_step_twice_page_episodes_and_fetch_a_png(gateway):
    client, root = gateway
    created = client.post("/v1/worlds", json={"id": "harbor", **SMALL})
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "harbor" and created.json()["step"] == 0
    first = client.post("/v1/worlds/harbor/step", json={"action": "ring the bell"})
    assert first.status_code == 200, first.text
    assert (
        first.json()["step"] == 1 and first.json()["episode"] is None
    )  # the empty start: nothing to save yet
    second = client.post("/v1/worlds/harbor/step")
    assert second.json()["step"] == 2 and second.json()["episode"] == 1
    third = client.post("/v1/worlds/harbor/step", json={})
    assert third.json()["episode"] == 2

    page = client.get("/v1/worlds/harbor/episodes", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 2 and [e["episode"] for e in page["items"]] == [2]
    assert client.get("/v1/worlds/harbor/episodes").json()["total"] == 2
    episode = client.get("/v1/worlds/harbor/episodes/1").json()
    assert episode["action"] == "ring the bell" and all(episode["state"][k] for k in ("happening", "outcome"))
    (artifact,) = episode["state"]["artifacts"]
    png = client.get(artifact["url"].removeprefix(PREFIX))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert (
        png.content.startswith(b"\x89PNG")
        and png.content == (root / "harbor" / artifact["path"]).read_bytes()
    )

    info = client.get("/v1/worlds/harbor").json()
    assert info["step"] == 3 and info["episodes"] == 2
    assert client.get("/v1/worlds/harbor/state").json()["generation"][0]["width"] == 32  # block 2: a list
    assert [w["id"] for w in client.get("/v1/worlds").json()["worlds"]] == ["harbor"]
    assert client.get("/openapi.json").json()["paths"]["/v1/worlds/{world_id}/step"]


def test_streamed_step_sends_stages_then_the_report(gateway):
    client, _ = gateway
    assert client.post("/v1/worlds", json={"id": "streamed", **SMALL}).status_code == 201
    events = []
    with client.post("/v1/worlds/streamed/step", params={"stream": "true"}, json={}, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    names = [n for n, _ in events]
    assert names[-1] == "report" and events[-1][1]["step"] == 1
    stages = [data["last_stage"] for n, data in events if n == "stage"]
    assert "creator" in stages or "architect" in stages  # the stages were streamed as they finished


def test_concurrent_steps_on_one_world_are_serialised(gateway):
    client, root = gateway
    assert client.post("/v1/worlds", json={"id": "busy", **SMALL}).status_code == 201
    results = []

    def step():
        results.append(client.post("/v1/worlds/busy/step").json())

    threads = [threading.Thread(target=step) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["step"] for r in results) == [1, 2, 3]  # each request got its own step
    assert sorted(r["episode"] for r in results if r["episode"]) == [1, 2]
    assert sorted(p.name for p in (root / "busy" / "episodes").iterdir() if p.is_dir()) == [
        "000001",
        "000002",
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/worlds", {"template": "offline_world", "config": {}}, 422),  # both sources
        ("post", "/v1/worlds", {}, 422),  # neither
        ("post", "/v1/worlds", {"template": "offline_world", "params": {"size": 32}, "extra": 1}, 422),
        ("post", "/v1/worlds", {"id": "../escape", "template": "offline_world"}, 422),
        ("post", "/v1/worlds", {"template": "offline_wrld"}, 400),  # unknown template: did you mean
        ("post", "/v1/worlds", {"template": "offline_world", "params": {"sise": 32}}, 400),
        ("post", "/v1/worlds", {"config": {"kind": "world", "stages": 3}}, 400),  # a bad config
        ("post", "/v1/worlds/harbor/step", {"action": 123}, 422),  # wrong type
        ("get", "/v1/worlds/harbor/episodes?limit=abc", None, 422),
        ("get", "/v1/worlds/harbor/episodes?limit=1000", None, 422),
        ("get", "/v1/worlds/nowhere", None, 404),
        ("post", "/v1/worlds/nowhere/step", {}, 404),
        ("get", "/v1/worlds/harbor/episodes/99", None, 404),
        ("get", "/v1/worlds/harbor/artifacts/world.yaml", None, 404),  # not an image of the world
        ("get", "/v1/worlds/harbor/artifacts/episodes/..%2F..%2Fworld.yaml", None, 404),
        ("get", "/v1/worlds/harbor/artifacts/episodes/000001/../../content.json", None, 404),
        ("get", "/v1/worlds/harbor/artifacts/episodes/%2Fetc%2Fpasswd.png", None, 404),
        ("get", "/v1/worlds/harbor/artifacts/episodes/000001/999.png", None, 404),
    ],
)
def test_bad_requests_get_the_right_4xx(gateway, method, path, body, status):
    client, _ = gateway
    if client.get("/v1/worlds/harbor").status_code == 404:
        assert client.post("/v1/worlds", json={"id": "harbor", **SMALL}).status_code == 201
    response = client.request(method.upper(), path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["detail"]  # a body that says what is wrong


def test_bad_config_message_names_the_field(gateway):
    client, root = gateway
    response = client.post("/v1/worlds", json={"id": "broken", "config": {"kind": "world", "stages": 3}})
    assert response.status_code == 400 and "stages" in response.json()["detail"]
    assert not (root / "broken").exists()  # nothing of a world that never opened stays


@pytest.mark.parametrize(
    ("template", "kind"), [("text_to_image", "graph"), ("generate_and_refine", "pipeline")]
)
def test_a_graph_or_pipeline_template_is_a_400_listing_the_world_templates(gateway, template, kind):
    client, root = gateway
    response = client.post(
        "/v1/worlds", json={"id": "from-graph", "template": template, "params": {"preset": "tiny"}}
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        f"template '{template}' builds a {kind}, not a world; the world templates: moving_world, offline_world"
    )
    assert not (root / "from-graph").exists()


def test_oversized_body_gets_413(gateway):
    client, _ = gateway
    huge = {"template": "offline_world", "params": {"story": "x" * 100_000}}
    assert client.post("/v1/worlds", json=huge).status_code == 413

    def chunks():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(20):
            yield b"x" * 8192

    assert client.post("/v1/worlds", data=chunks()).status_code == 413


def test_wrong_or_missing_token_gets_401(gateway, serve_url):
    with Client(serve_url + PREFIX) as anonymous:
        assert anonymous.get("/v1/worlds").status_code == 401
        wrong = anonymous.get("/v1/worlds", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v1/worlds", json=SMALL).status_code == 401
        for path in ("/docs", "/redoc", "/openapi.json", "/no-such-path"):  # every path: the docs too
            assert anonymous.get(path).status_code == 401, path
    with Client(serve_url + PREFIX, {"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").json()["paths"]


def test_delete_stops_the_driver_and_removes_the_world(gateway):
    client, root = gateway
    assert client.post("/v1/worlds", json={"id": "doomed", **SMALL}).status_code == 201
    assert client.delete("/v1/worlds/doomed").status_code == 204
    assert client.get("/v1/worlds/doomed").status_code == 404
    assert not (root / "doomed").exists()
    assert client.delete("/v1/worlds/doomed").status_code == 404


@pytest.mark.parametrize(
    ("cause", "status"),
    [
        (ArtifactNotFound("artifact 'x.png': not found"), 404),
        (LimitExceeded("max_steps", "500 steps is over 100"), 400),
        (ConfigError("prompt template 'x' tried something the sandbox forbids"), 400),
        (DeadlineExceeded("stage_seconds", "stage 'creator' ran past its time limit of 1 s"), 504),
        (ExecutionError("node 'unet' failed"), 500),
        (StepInFlightError("a step is in flight past Development; finish it with step()"), 409),
        (WorldExistsError("worlds/x already holds a different world"), 409),
        (WorldDamagedError(Path("worlds/x"), [Damage("content.json", "is missing")]), 409),
        (KeyError("surprise"), 500),
    ],
)
def test_driver_errors_map_to_statuses_by_type(cause, status):
    """What a world driver raises reaches the client with a status chosen by the error's type."""
    import asyncio

    import ray
    from fastapi import HTTPException

    from serve_apps.world_gateway import GatewaySettings, WorldGateway

    async def failing():
        raise ray.exceptions.RayTaskError("step", "Traceback: ...", cause)

    gateway = SimpleNamespace(settings=GatewaySettings())  # `call` reads only the settings
    with pytest.raises(HTTPException) as err:
        asyncio.run(WorldGateway.func_or_class.call(gateway, failing()))
    assert err.value.status_code == status and str(cause) in err.value.detail


def _race(client: Client, bodies: list[dict]) -> list[requests.Response]:
    """POST /v1/worlds with every body at once."""
    barrier = threading.Barrier(len(bodies))
    answers: list = [None] * len(bodies)

    def create(i: int) -> None:
        barrier.wait()
        answers[i] = client.post("/v1/worlds", json=bodies[i])

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_creates_are_exclusive(gateway):
    """Of concurrent creates of one id exactly one gets 201: with other configs the rest get 409 (never a world
    that is another's), with the same config 200 and that world. Later creates: 200 the same, 409 another."""
    client, root = gateway
    from worldgen.templates import build_template

    # two share the world's name (so the driver's name), two have names of their own
    bodies = [
        {"id": "raced", "config": build_template(SMALL["template"], **SMALL["params"] | {"seed": i})}
        for i in range(4)
    ]
    for i, body in enumerate(bodies):
        body["config"]["name"] = "racer" if i < 2 else f"racer{i}"
    answers = _race(client, bodies)
    assert sorted(a.status_code for a in answers) == [201, 409, 409, 409], [a.text for a in answers]
    (winner,) = [i for i, a in enumerate(answers) if a.status_code == 201]
    assert yaml.safe_load((root / "raced" / "world.yaml").read_text())["seed"] == winner
    assert all("exists already" in a.json()["detail"] for a in answers if a.status_code == 409)
    assert client.get("/v1/worlds/raced").json()["name"] == bodies[winner]["config"]["name"]

    answers = _race(client, [{"id": "twin", **SMALL}] * 4)
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201], [a.text for a in answers]
    assert len({a.json()["actor"] for a in answers}) == 1
    again = client.post("/v1/worlds", json={"id": "twin", **SMALL})
    assert again.status_code == 200 and again.json()["id"] == "twin"
    other = client.post("/v1/worlds", json={"id": "twin", **SMALL, "params": {**SMALL["params"], "seed": 9}})
    assert other.status_code == 409, other.text
    documented = client.get("/openapi.json").json()["paths"]["/v1/worlds"]["post"]["responses"]
    assert {"200", "201", "409"} <= set(documented)


def _restart_driver(client: Client, root, world_id: str) -> requests.Response:
    """Kill the world's driver as a crash would (Ray restarts it); the first answer of the restarted driver (not
    a 503, nor one the gateway read from storage while the driver was down)."""
    import ray

    from actors.cluster import NAMESPACE
    from actors.world_driver import driver_name

    crash_actor(ray.get_actor(driver_name(root / world_id), namespace=NAMESPACE))
    deadline = time.monotonic() + 120
    while (answer := client.get(f"/v1/worlds/{world_id}")).status_code == 503 or (
        answer.ok and answer.json()["driver"] == "unavailable"
    ):
        assert time.monotonic() < deadline, "the driver did not come back"
        time.sleep(0.2)
    return answer


def test_damage_and_outside_links_get_a_clear_4xx(gateway, tmp_path):
    client, root = gateway
    assert client.post("/v1/worlds", json={"id": "scarred", **SMALL}).status_code == 201
    for _ in range(2):
        assert client.post("/v1/worlds/scarred/step").status_code == 200
    (artifact,) = client.get("/v1/worlds/scarred/episodes/1").json()["state"]["artifacts"]
    url = artifact["url"].removeprefix(PREFIX)
    assert client.get(url).status_code == 200

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG not the world's")
    png = root / "scarred" / artifact["path"]
    png.unlink()
    os.link(outside, png)  # the world's name for an outside file
    refused = client.get(url)
    assert (
        refused.status_code == 404 and "hard-linked to a file outside the world" in refused.json()["detail"]
    )

    (root / "scarred/episodes/000001/state.json").unlink()
    damaged = "world damaged: episode 1: episodes/000001/state.json is missing"
    page = client.get("/v1/worlds/scarred/episodes")
    assert page.status_code == 409 and page.json()["detail"].startswith(damaged), page.text
    answer = _restart_driver(client, root, "scarred")  # a restarted driver finds it at load
    assert answer.status_code == 409 and answer.json()["detail"].startswith(damaged), answer.text
    assert client.post("/v1/worlds/scarred/step").status_code == 409


def test_a_user_block_2_may_reference_an_earlier_episode(gateway):
    """A step may carry the user's blocks: block 2's reference is checked against the world's episodes and
    pipelines (400 naming the field), block 3 (files) is refused over HTTP, and a good reference is taken."""
    client, root = gateway
    config = load_config_file(Path(__file__).parents[2] / "configs" / "worlds" / "keeps_its_look.yaml")
    assert client.post("/v1/worlds", json={"id": "look", "config": config}).status_code == 201
    for _ in range(2):  # the second step saves episode 1
        assert client.post("/v1/worlds/look/step").status_code == 200
    block_2 = {
        "prompt": "the keeper again",
        "pipeline": "from_previous",
        "width": 64,
        "height": 64,
        "steps": 4,
    }
    refused = [
        (
            {"episode": 5, "control": "img2img"},
            "state.generation.0.reference.0.episode: episode 5 does not exist",
        ),
        ({"control": "img2img", "scale": 0.5}, "state.generation.0.reference.0.scale"),
        ({"control": "ip_adapter"}, "pipelines that take control 'ip_adapter': keep_the_look"),
    ]
    for reference, detail in refused:
        response = client.post(
            "/v1/worlds/look/step", json={"state": {"1": "x", "2": {**block_2, "reference": reference}}}
        )
        assert response.status_code == 400 and detail in response.json()["detail"], response.text
    files = client.post("/v1/worlds/look/step", json={"state": {"3": ["/etc/hostname"]}})
    assert files.status_code == 400 and "state.3" in files.json()["detail"]
    assert client.get("/v1/worlds/look").json()["step"] == 2  # nothing ran
    taken = {"1": "the keeper again", "2": {**block_2, "reference": {"episode": 1, "control": "img2img"}}}
    assert client.post("/v1/worlds/look/step", json={"state": taken}).status_code == 200


# ---- limits (issue 10) ---------------------------------------------------------------------------------
def test_generation_defaults_the_creator_cannot_run_are_refused_at_creation(gateway):
    client, root = gateway
    body = {"id": "sixty", "template": "offline_world", "params": {"preset": "tiny", "size": 60}}
    response = client.post("/v1/worlds", json=body)
    assert response.status_code == 400, response.text
    assert (
        "generation_defaults.width" in response.json()["detail"]
        and "multiple of 8" in response.json()["detail"]
    )
    assert not (root / "sixty").exists()


@pytest.fixture
def limited_gateway(serve_url, tmp_path):
    """A gateway holding at most one world, whose stages get 10 ms each (any Creator takes longer)."""
    from ray import serve

    from serve_apps.world_gateway import app_builder

    limits = {"max_worlds": 1, "stage_seconds": 0.01, "max_image_side": 32}
    serve.run(app_builder({"root": str(tmp_path), "limits": limits}), name="limited", route_prefix="/limited")
    client = Client(serve_url + "/limited")
    try:
        yield client
    finally:
        for world in client.get("/v1/worlds").json()["worlds"]:
            client.delete(f"/v1/worlds/{world['id']}")
        client.close()
        serve.delete("limited")


def test_a_gateway_holds_at_most_max_worlds_and_names_its_limits(limited_gateway):
    client = limited_gateway
    big = {"id": "big", "template": "offline_world", "params": {"preset": "tiny", "size": 64}}
    response = client.post("/v1/worlds", json=big)  # the driver checks its defaults against the limits
    assert response.status_code == 400 and "limit 'max_image_side'" in response.json()["detail"]

    assert client.post("/v1/worlds", json={"id": "one", **SMALL}).status_code == 201
    second = client.post("/v1/worlds", json={"id": "two", **SMALL})
    assert second.status_code == 409 and "limit 'max_worlds'" in second.json()["detail"], second.text

    step = client.post("/v1/worlds/one/step")  # a stage past its time: 504 naming the stage and the limit
    assert step.status_code == 504, step.text
    assert "stage '" in step.json()["detail"] and "limit 'stage_seconds'" in step.json()["detail"]
    assert client.get("/v1/worlds/one").json()["step"] == 0  # the world is intact; a retry resumes it

    assert client.delete("/v1/worlds/one").status_code == 204
    assert client.post("/v1/worlds", json={"id": "two", **SMALL}).status_code == 201  # room again


# ---- media: types, ranges, a browser seeking (issue 14) ------------------------------------------------
@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        ("bytes=0-99", 1000, (0, 100)),
        ("bytes=100-", 1000, (100, 1000)),
        ("bytes=-100", 1000, (900, 1000)),
        ("bytes=-5000", 1000, (0, 1000)),  # a suffix longer than the file: all of it
        ("bytes=900-5000", 1000, (900, 1000)),  # a last byte past the end: up to the end
        (" Bytes = 5 - 9 ", 1000, (5, 10)),
        ("bytes=1000-", 1000, None),  # starts at the end: unsatisfiable (416)
        ("bytes=-0", 1000, None),
        ("bytes=0-", 0, None),  # an empty file has no byte 0
    ],
)
def test_a_range_resolves_to_the_slice_http_means(header, size, span):
    from serve_apps.world_gateway import parse_range, resolve_range

    assert resolve_range(parse_range(header), size) == span


@pytest.mark.parametrize(
    "header", [None, "", "bytes=", "bytes=-", "bytes=5-1", "bytes=0-1,5-6", "items=0-1", "x"]
)
def test_a_range_header_to_ignore_parses_to_none(header):
    from serve_apps.world_gateway import parse_range

    assert parse_range(header) is None  # the whole file, 200, as HTTP allows


def test_a_video_and_a_sound_are_served_with_their_types_and_in_ranges(gateway, serve_url):
    """An episode holding an MP4 (and its preview) and a WAV, made by hand: each served with its MIME type, the
    MP4 in the byte ranges a player seeks by (206, exactly the slice), and played by chromium from its URL."""
    from tests.media_episode import FPS, FRAMES, HEIGHT, WIDTH, save_media_episode
    from worldgen.storage import WorldStorage

    client, root = gateway
    assert client.post("/v1/worlds", json={"id": "lighthouse", **SMALL}).status_code == 201
    save_media_episode(WorldStorage(root / "lighthouse"))
    video, audio = client.get("/v1/worlds/lighthouse/episodes/1").json()["state"]["artifacts"]
    assert (video["kind"], audio["kind"]) == ("video", "audio")
    if video.get("preview"):  # a preview kept with the episode is linked beside its clip
        preview = client.get(video["preview_url"].removeprefix(PREFIX))
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"

    url = video["url"].removeprefix(PREFIX)
    data = (root / "lighthouse" / video["path"]).read_bytes()
    size = len(data)
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
    for header, (start, stop) in [("bytes=100-199", (100, 200)), ("bytes=-50", (size - 50, size))]:
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, part.text
        assert part.content == data[start:stop] and part.headers["content-type"] == "video/mp4"
        assert part.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
    tail = client.get(url, headers={"Range": f"bytes={size - 10}-{size + 500}"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert "past the end" in past.json()["detail"]
    ignored = client.get(url, headers={"Range": "bytes=oops"})
    assert ignored.status_code == 200 and ignored.content == data
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(size) and not head.content

    wav = client.get(audio["url"].removeprefix(PREFIX), headers={"Range": "bytes=0-3"})
    assert wav.status_code == 206 and wav.content == b"RIFF" and wav.headers["content-type"] == "audio/wav"
    assert client.get("/v1/worlds/lighthouse/artifacts/episodes/000001/state.json").status_code == 404

    # a browser loads the clip's metadata through the gateway (it asks for ranges to find the index)
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (`make setup` installs Debian's)")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            context = browser.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
            page = context.new_page()
            page.set_content(f'<video controls preload="metadata" src="{serve_url}{video["url"]}"></video>')
            page.wait_for_function("() => document.querySelector('video').readyState >= 1", timeout=20_000)
            shown = page.eval_on_selector("video", "v => [v.duration, v.videoWidth, v.videoHeight]")
            assert shown == [pytest.approx(FRAMES / FPS, abs=0.2), WIDTH, HEIGHT]
        finally:
            browser.close()


def test_episodes_give_each_artifact_its_url_and_a_videos_preview_its_own():
    from types import SimpleNamespace

    from serve_apps.world_gateway import WorldGateway

    episode = {
        "state": {
            "artifacts": [
                {"path": "episodes/000001/000.mp4", "preview": "episodes/000001/000.preview.webp"},
                {"path": "episodes/000001/001.wav", "preview": None},
            ]
        }
    }
    request = SimpleNamespace(scope={"root_path": "/api"})
    video, sound = WorldGateway.func_or_class.with_urls(None, request, "bay", episode)["state"]["artifacts"]
    base = "/api/v1/worlds/bay/artifacts/episodes/000001/"
    assert (video["url"], video["preview_url"]) == (base + "000.mp4", base + "000.preview.webp")
    assert sound["url"] == base + "001.wav" and "preview_url" not in sound


# ---- the world that moves, over HTTP (issue 14) --------------------------------------------------------
MOVING_SIDE, MOVING_FRAMES = 32, 5
SMALL_MOVING = {
    "template": "moving_world",
    "params": {"size": MOVING_SIDE, "frames": MOVING_FRAMES, "steps": 2},
}


@pytest.fixture(scope="module")
def moving(gateway):
    """The world that moves (configs/worlds/moving.yaml as the `moving_world` template) made small, created and
    stepped twice through the gateway: episode 1 holds a picture and a Wan clip from it."""
    client, root = gateway
    created = client.post("/v1/worlds", json={"id": "moving", **SMALL_MOVING})
    assert created.status_code == 201, created.text
    for _ in range(2):
        step = client.post("/v1/worlds/moving/step")
        assert step.status_code == 200, step.text
    return client, root / "moving"


def test_the_moving_worlds_clip_is_listed_with_its_preview_and_served_in_ranges(moving):
    client, directory = moving
    page = client.get("/v1/worlds/moving/episodes").json()
    assert page["total"] == 1
    image, video = page["items"][0]["state"]["artifacts"]
    assert (image["kind"], image["mime"]) == ("image", "image/png")
    assert (video["kind"], video["mime"], video["frames"], video["width"]) == (
        "video",
        "video/mp4",
        MOVING_FRAMES,
        MOVING_SIDE,
    )
    base = f"{PREFIX}/v1/worlds/moving/artifacts/episodes/000001/"
    assert (video["url"], video["preview_url"]) == (base + "001.mp4", base + "001.preview.webp")

    preview = client.get(video["preview_url"].removeprefix(PREFIX))
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"
    assert preview.content == (directory / video["preview"]).read_bytes()

    data = (directory / video["path"]).read_bytes()
    part = client.get(video["url"].removeprefix(PREFIX), headers={"Range": "bytes=16-1039"})
    assert part.status_code == 206, part.text
    assert part.content == data[16:1040] and part.headers["content-type"] == "video/mp4"
    assert part.headers["content-range"] == f"bytes 16-1039/{len(data)}"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_bad_video_requests_are_400_naming_the_field_and_change_nothing(moving):
    """A user's block 2 whose clip cannot be made is refused before any model runs: the world's step count and
    every file it saved stay as they were."""
    client, directory = moving
    picture = {"prompt": "the harbor", "width": MOVING_SIDE, "height": MOVING_SIDE, "steps": 2}
    clip = {
        "kind": "video",
        "prompt": "the fog rolls in",
        "width": MOVING_SIDE,
        "height": MOVING_SIDE,
        "frames": 5,
        "steps": 2,
    }
    from_picture = clip | {"source": {"request": 0}}
    from_previous = clip | {"source": {"episode": "previous"}}
    cases = [
        (
            [picture, from_picture | {"frames": 0}],
            "state.generation.1.frames: Input should be greater than or",
        ),
        (
            [picture, from_picture | {"frames": -1}],
            "state.generation.1.frames: Input should be greater than or",
        ),
        (
            [picture, from_picture | {"fps": 1000}],
            "state.generation.1.fps: Input should be less than or equal",
        ),
        (
            [clip | {"source": {"episode": 9}}],
            "state.generation.0.source.episode: episode 9 does not exist (the world has episodes 1 to 1)",
        ),
        (
            [picture, from_picture | {"source": {"request": 1}}],
            "state.generation: Value error, request 1: source.request 1 is not an earlier request",
        ),
        (
            [from_previous, from_picture],
            "state.generation: Value error, request 1: source.request 0 is a video request, not an image one",
        ),
        (  # 241 frames of 2048x2048 as float32: 11.3 GiB, over the gateway's default 4 GiB
            [from_previous | {"width": 2048, "height": 2048, "frames": 241, "steps": 1}],
            "state.generation.0: 1 clip(s) of 241 frames at 2048x2048 need 11,568 MiB as float32, over "
            "4,096 MiB (limit 'max_request_bytes')",
        ),
        (
            [picture, from_picture | {"frames": 6}],
            "state.generation.1.frames: pipeline 'image_to_video' cannot run request 1: frames must be 4k+1 (the video "
            "VAE packs 4 frames per latent frame after the first), got 6; nearest valid: 5 or 9",
        ),
    ]
    before = _files(directory)
    for block_2, detail in cases:
        response = client.post("/v1/worlds/moving/step", json={"state": {"1": "The fog.", "2": block_2}})
        assert response.status_code == 400 and detail in response.json()["detail"], (block_2, response.text)
    assert client.get("/v1/worlds/moving").json()["step"] == 2  # no step ran
    assert _files(directory) == before

    # the same shapes with values the model takes are accepted (the canon's cycle then drops a state of blocks
    # 1-2 at World update, and the step goes on from Development)
    taken = client.post("/v1/worlds/moving/step", json={"state": {"1": "The fog.", "2": [from_previous]}})
    assert taken.status_code == 200 and taken.json()["step"] == 3, taken.text
