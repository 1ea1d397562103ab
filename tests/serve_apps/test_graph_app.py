"""The graph endpoint's trust boundary (issue 10): bad input gets a 4xx naming the field or the limit, before any
model runs; budgets, body size and bearer auth come from the app's args. Over real HTTP (Ray Serve on 127.0.0.1)
where the behaviour is HTTP; the app's error mapping in-process where a real failure has to be staged."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient

from serve_apps.graph_app import GraphAppArgs, app_builder, build_app, load_graph
from tests.conftest import PROMPT
from tests.worldgen.nodes.test_endpoint import INPUTS, NO_CPU, T2I, call, deploy, locs
from worldgen.errors import ExecutionError
from worldgen.limits import Limits
from worldgen.nodes.endpoint import decode_tensor

TOKEN_ENV = "WG_TEST_LIMITS_TOKEN"
TOKEN = "limits-s3cret"
# Small budgets, so each is reachable with the tiny model; every other limit keeps its default.
LIMITS = {"max_image_side": 64, "max_steps": 10, "max_iterations": 20, "max_prompt_chars": 2000}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def url(serve_url):
    """text_to_image_tiny behind a token, with the small budgets and a 64 KiB body limit."""
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    args = {
        "graph": str(T2I),
        "token_env": TOKEN_ENV,
        "limits": LIMITS,
        "max_body_bytes": MAX_BODY,
        "ray_actor_options": NO_CPU,
    }
    try:
        yield deploy(app_builder(args), "graph-limits", serve_url)
    finally:
        serve.delete("graph-limits")
        os.environ.pop(TOKEN_ENV, None)


def run(url: str, body: object = None, *, raw: bytes | None = None):
    return call(f"{url}/run", body, raw=raw, token=TOKEN)


# ---- what the fuzzer found: each a 500 (or unbounded work) before -------------------------------------------
@pytest.mark.parametrize(
    ("inputs", "where", "message"),
    [
        ({"steps": 1001}, "inputs.steps", "steps must be 1 to 1000 (the timesteps the scheduler was trained"),
        ({"steps": -1}, "inputs.steps", "steps must be 1 to 1000"),
        ({"steps": 0}, "inputs.steps", "steps must be 1 to 1000"),
        ({"height": -8}, "inputs.height", "positive multiples of 2, got -8x32"),
        ({"width": 0}, "inputs.width", "positive multiples of 2, got 32x0"),
        ({"prompt": ["a", "b"]}, "inputs.prompt", "2 items, but the batch is 1 (set by noise.batch_size)"),
        (
            {"prompt": [PROMPT], "negative_prompt": ["x", "y"]},
            "inputs.negative_prompt",
            "2 items, but the batch is 1",
        ),
    ],
)
def test_inputs_out_of_the_graphs_range_get_400_naming_the_input(url, inputs, where, message):
    status, answer = run(url, {"inputs": {**INPUTS, **inputs}, "seed": 1})
    assert status == 400, answer
    assert answer["detail"]["error"] == "ConfigError"
    assert answer["detail"]["message"].startswith(f"at {where}: ")
    assert message in answer["detail"]["message"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"inputs": INPUTS, "seed": False}, "body.seed", "valid integer"),  # was accepted as seed 0
        ({"inputs": INPUTS, "seed": 2**64}, "body.seed", "less than 18446744073709551616"),  # was a 500
        ({"inputs": INPUTS, "iterations": True}, "body.iterations", "valid integer"),
        ({"inputs": {**INPUTS, "steps": True}}, "body.inputs.steps", "valid integer"),
        ({"inputs": {**INPUTS, "steps": "2"}}, "body.inputs.steps", "valid integer"),
        ({"inputs": {**INPUTS, "height": 2**63}}, "body.inputs.height", "less than 9223372036854775808"),
        ({"inputs": {**INPUTS, "guidance_scale": True}}, "body.inputs.guidance_scale", "valid number"),
        ({"inputs": {**INPUTS, "prompt": []}}, "body.inputs.prompt.list[str]", "at least 1 item"),
        ({"inputs": {**INPUTS, "prompt": 7}}, "body.inputs.prompt.str", "valid string"),
    ],
)
def test_values_of_the_wrong_type_or_range_get_422(url, body, field, message):
    status, answer = run(url, body)
    assert status == 422, answer
    assert field in locs(answer)
    assert any(message in item["msg"] for item in answer["detail"]), answer


def test_nan_gets_422_not_an_unrenderable_error(url):
    # Python's JSON parser reads NaN; echoed back as a number the 422 itself failed to render (a 500).
    raw = json.dumps({"inputs": {**INPUTS, "guidance_scale": float("nan")}}).encode()
    status, answer = run(url, raw=raw)
    assert status == 422
    (error,) = answer["detail"]
    assert error["loc"] == ["body", "inputs", "guidance_scale"] and error["input"] == "nan"


def test_a_body_that_is_not_utf8_gets_422_like_malformed_json(url):
    # FastAPI's own answer was a 400 with a bare string: outside the documented {detail: {error, message}}
    status, answer = run(url, raw=b'{"inputs": {"prompt": "\xff"}}')  # not UTF-8
    assert status == 422
    assert answer["detail"][0]["loc"] == ["body"] and answer["detail"][0]["type"] == "json_invalid"


def test_the_top_of_torchs_seed_range_runs(url):
    status, answer = run(url, {"inputs": INPUTS, "seed": 2**64 - 1, "encoding": "tensor"})
    assert status == 200, answer
    assert answer["seed"] == 2**64 - 1
    assert decode_tensor(answer["outputs"]["image"]).shape == (1, 3, 32, 32)


# ---- budgets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "limit", "message"),
    [
        # held a core for 10+ minutes before
        ({"inputs": INPUTS, "iterations": 209427786}, "max_iterations", "iterations 209427786 is over 20"),
        ({"inputs": {**INPUTS, "height": 4096}}, "max_image_side", "height 4096 is over 64 pixels"),
        ({"inputs": {**INPUTS, "steps": 11}}, "max_steps", "11 steps is over 10"),
        ({"inputs": {**INPUTS, "prompt": "x" * 2001}}, "max_prompt_chars", "2,001 characters, over 2,000"),
        (
            {"inputs": {**INPUTS, "prompt": "x" * 1500, "negative_prompt": "y" * 600}},
            "max_prompt_chars",
            "2,100 characters",  # the budget is all text inputs together
        ),
    ],
)
def test_a_request_over_a_budget_gets_400_naming_the_limit_at_once(url, body, limit, message):
    started = time.perf_counter()
    status, answer = run(url, body)
    assert status == 400, answer
    assert answer["detail"] == {
        "error": "LimitExceeded",
        "limit": limit,
        "message": answer["detail"]["message"],
    }
    assert message in answer["detail"]["message"] and f"(limit '{limit}')" in answer["detail"]["message"]
    assert time.perf_counter() - started < 10  # refused before any model runs


def test_iterations_past_the_schedule_get_400(url):
    status, answer = run(url, {"inputs": INPUTS, "iterations": 3})  # the schedule has 2 steps
    assert status == 400, answer
    assert (
        "node 'solver' (loop iteration 2): the schedule has 2 steps and all have run"
        in (answer["detail"]["message"])
    )


def test_a_body_over_max_body_bytes_gets_413(url):
    body = json.dumps({"inputs": {**INPUTS, "prompt": "x" * MAX_BODY}}).encode()
    status, answer = run(url, raw=body)
    assert status == 413
    assert answer == {"detail": f"request body larger than {MAX_BODY} bytes (limit 'max_body_bytes')"}


# ---- auth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/spec", "/docs", "/openapi.json", "/run", "/no-such-path"])
def test_every_path_needs_the_token(url, path):
    for token in (None, "wrong", f"{TOKEN}x"):
        status, answer = call(f"{url}{path}", token=token)
        assert status == 401, (path, token)
        assert answer == {"detail": "missing or wrong bearer token"}
    request = urllib.request.Request(f"{url}/docs", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()


def test_a_client_without_the_token_is_refused_before_its_body_is_read(url):
    status, answer = call(f"{url}/run", raw=b"x" * (4 * MAX_BODY))
    assert status == 401 and answer == {"detail": "missing or wrong bearer token"}


# ---- the OpenAPI document states what is enforced --------------------------------------------------------
def test_openapi_states_the_bounds_the_app_enforces(url):
    status, api = call(f"{url}/openapi.json", token=TOKEN)
    assert status == 200
    schemas = api["components"]["schemas"]
    request = schemas["TextToImageTinyRunRequest"]["properties"]
    seed, iterations = request["seed"]["anyOf"][0], request["iterations"]["anyOf"][0]
    assert seed == {"type": "integer", "minimum": 0, "exclusiveMaximum": 2**64}
    assert iterations == {"type": "integer", "minimum": 1, "maximum": LIMITS["max_iterations"]}
    inputs = schemas["TextToImageTinyInputs"]["properties"]
    assert inputs["steps"]["anyOf"][0] == {"type": "integer", "minimum": -(2**63), "exclusiveMaximum": 2**63}
    assert inputs["guidance_scale"]["anyOf"][0] == {"type": "number"}
    one, many = inputs["prompt"]["anyOf"]
    assert one == {"type": "string", "maxLength": LIMITS["max_prompt_chars"]}
    assert many["minItems"] == 1
    responses = api["paths"]["/run"]["post"]["responses"]
    assert f"over {MAX_BODY} bytes" in responses["413"]["description"]
    assert {"400", "401", "413", "422", "500"} <= set(responses)
    for code, model in [("400", "RunError"), ("500", "RunError"), ("401", "Refusal"), ("413", "Refusal")]:
        assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{model}")
    assert {"401", "413"} <= set(api["paths"]["/"]["get"]["responses"])  # the middlewares answer any path
    assert schemas["ErrorDetail"]["required"] == ["error", "message"]


# ---- the app's args and its error mapping (no Serve needed) ----------------------------------------------
def test_args_default_to_the_gateways_token_variable_and_the_default_limits():
    args = GraphAppArgs.model_validate({"graph": str(T2I)})
    assert args.token_env == "WORLDGEN_API_TOKEN"
    assert args.limits == Limits() and args.max_body_bytes == 1 << 20


def test_the_token_comes_from_WORLDGEN_API_TOKEN_by_default(monkeypatch, caplog):
    import hashlib

    monkeypatch.setenv("WORLDGEN_API_TOKEN", "from-the-env")
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        app = app_builder({"graph": str(T2I)})
    assert hashlib.sha256(b"from-the-env").hexdigest() in app._bound_deployment.init_args
    assert "NO AUTHENTICATION" not in caplog.text


@pytest.mark.parametrize("args", [{}, {"token_env": None}])
def test_an_open_endpoint_warns_loudly(monkeypatch, caplog, args):
    monkeypatch.delenv("WORLDGEN_API_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        app = app_builder({"graph": str(T2I), **args})
    assert app._bound_deployment.init_args[3] is None  # no digest: no auth
    (record,) = [r for r in caplog.records if "NO AUTHENTICATION" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "set WORLDGEN_API_TOKEN" in record.getMessage()


@pytest.fixture(scope="module")
def engine():
    return load_graph(str(T2I))


def test_a_genuine_run_failure_is_a_500_that_says_where(engine):
    def runner(inputs, seed, iterations):
        raise ExecutionError(
            "node 'unet' (loop iteration 0) of graph 'text_to_image_tiny' failed: out of memory"
        )

    client = TestClient(build_app(engine, runner), raise_server_exceptions=False)
    response = client.post("/run", json={"inputs": INPUTS})
    assert response.status_code == 500
    assert response.json()["detail"] == {
        "error": "ExecutionError",
        "message": "node 'unet' (loop iteration 0) of graph 'text_to_image_tiny' failed: out of memory",
    }


def test_the_default_body_limit_is_1_MiB_and_the_runner_never_sees_a_refused_request(engine):
    calls = []
    client = TestClient(build_app(engine, lambda *args: calls.append(args)), raise_server_exceptions=False)
    fifty_mb = "x" * (50 << 20)  # the issue's 50 MB prompt
    assert client.post("/run", json={"inputs": {**INPUTS, "prompt": fifty_mb}}).status_code == 413
    over_budget = {"inputs": {**INPUTS, "height": 4096}}
    assert client.post("/run", json=over_budget).json()["detail"]["limit"] == "max_image_side"
    assert client.post("/run", json={"inputs": INPUTS, "iterations": 1001}).status_code == 400
    assert calls == []


def test_png_dimensions_are_checked_before_the_png_is_decoded():
    import base64
    import io

    from PIL import Image

    engine = load_graph("template:image_to_image", {"preset": "tiny", "steps": 2})
    client = TestClient(build_app(engine, lambda *a: {}, limits=Limits(max_image_side=64)))
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 16)).save(buffer, format="PNG")  # 4000 px wide, ~1 KB
    png = base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/run", json={"inputs": {"prompt": PROMPT, "image": {"png_base64": [png]}}})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert "png_base64[0]: 4000x16 is over 64 pixels (limit 'max_image_side')" in error["msg"]


# ---- video and audio outputs (issue 14) ---------------------------------------------------------------------
def media_graph(rate_output: bool = True):
    """A toy graph giving a clip and a sound (with the sound's sample rate unless `rate_output` is False)."""
    import tests.toy_blocks  # noqa: F401 - registers the toy blocks
    import worldgen as wg

    g = wg.Graph("clip_and_tone")
    g.add_node("toy/clip", id="clip")
    g.add_node("toy/tone", id="tone")
    g.expose_input("frames", "clip.frames", default=4)
    g.expose_input("batch_size", "clip.batch_size", default=1)
    g.expose_output("video", "clip.video")
    g.expose_output("audio", "tone.audio")
    if rate_output:
        g.expose_output("sample_rate", "tone.sample_rate")
    return g


def media_client(graph) -> TestClient:
    runner = lambda inputs, seed, iterations: graph.run(inputs, seed=seed)  # noqa: E731
    return TestClient(build_app(graph, runner), raise_server_exceptions=False)


def test_a_video_comes_back_as_mp4s_and_a_sound_as_wavs(tmp_path):
    import base64

    from worldgen import media

    client = media_client(media_graph())
    answer = client.post("/run", json={"inputs": {"frames": 6, "batch_size": 2}, "fps": 12})
    assert answer.status_code == 200, answer.text
    video, audio = answer.json()["outputs"]["video"], answer.json()["outputs"]["audio"]
    assert video["fps"] == 12 and len(video["mp4_base64"]) == 2  # one MP4 per clip
    (tmp_path / "clip.mp4").write_bytes(base64.b64decode(video["mp4_base64"][1]))
    info = media.probe(tmp_path / "clip.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (6, 24, 16, 12)
    assert audio["sample_rate"] == 8000 == answer.json()["outputs"]["sample_rate"]  # the graph's own rate
    (tmp_path / "tone.wav").write_bytes(base64.b64decode(audio["wav_base64"][0]))
    samples, rate = media.read_audio(tmp_path / "tone.wav")
    assert rate == 8000 and samples.shape == (2000, 2)
    default = client.post("/run", json={"inputs": {}}).json()["outputs"]["video"]
    assert default["fps"] == 16 and len(default["mp4_base64"]) == 1


def test_tensor_encoding_sends_video_and_audio_exactly_as_endpoint_nodes_decode_them():
    from worldgen.nodes.endpoint import decode_value

    graph = media_graph()
    local = graph.run({"frames": 3}, seed=0)
    answer = media_client(graph).post("/run", json={"inputs": {"frames": 3}, "encoding": "tensor"})
    outputs = decode_value(answer.json()["outputs"])
    assert outputs["video"].shape == (1, 3, 3, 16, 24) and outputs["video"].equal(local["video"])
    assert outputs["audio"].equal(local["audio"])


def test_a_sound_without_a_graph_rate_takes_the_requests_or_is_refused():
    client = media_client(media_graph(rate_output=False))
    refused = client.post("/run", json={"inputs": {}})
    assert refused.status_code == 400 and "sample_rate" in refused.json()["detail"]["message"]
    named = client.post("/run", json={"inputs": {}, "sample_rate": 22_050})
    assert named.status_code == 200 and named.json()["outputs"]["audio"]["sample_rate"] == 22_050
    assert (
        client.post("/run", json={"inputs": {}, "encoding": "tensor"}).status_code == 200
    )  # no WAV: no rate


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1}, "fps"),
        ({"fps": 1000}, "fps"),
        ({"fps": "16"}, "fps"),
        ({"sample_rate": 10}, "sample_rate"),
    ],
)
def test_a_bad_fps_or_sample_rate_gets_422(body, field):
    answer = media_client(media_graph()).post("/run", json={"inputs": {}, **body})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][:2] == ["body", field], answer.text


def test_openapi_describes_the_video_and_audio_payloads():
    document = media_client(media_graph()).get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert set(schemas["VideoPayload"]["required"]) == {"mp4_base64", "fps"}
    assert set(schemas["AudioPayload"]["required"]) == {"wav_base64", "sample_rate"}
    video = json.dumps(schemas["ClipAndToneOutputs"]["properties"]["video"])
    assert "VideoPayload" in video and "TensorPayload" in video
    fps = schemas["ClipAndToneRunRequest"]["properties"]["fps"]
    assert fps["exclusiveMinimum"] == 0 and fps["maximum"] == 120 and fps["default"] == 16
    plain = TestClient(build_app(load_graph(str(T2I)), lambda *a: {})).get("/openapi.json").json()
    assert "fps" not in plain["components"]["schemas"]["TextToImageTinyRunRequest"]["properties"]
