"""Graph endpoints over real HTTP (Ray Serve on 127.0.0.1) and endpoint nodes in pipelines, stages and worlds."""

from __future__ import annotations

import base64
import json
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

import worldgen as wg
from serve_apps.graph_app import GraphAppArgs, app_builder
from tests.conftest import PROMPT, free_port
from worldgen.config import load_config_file
from worldgen.nodes.endpoint import EndpointError, EndpointGraph, decode_tensor, encode_png, encode_tensor

ROOT = Path(__file__).resolve().parents[3]
T2I = ROOT / "configs" / "graphs" / "text_to_image_tiny.yaml"
INPUTS = {"prompt": PROMPT, "steps": 2, "height": 32, "width": 32}
SEED = 3
TOKEN_ENV = "WG_TEST_GRAPH_TOKEN"
TOKEN = "s3cret-for-tests"
# The session's Ray has 2 CPUs: replicas reserve none, so Ray-executor runs still get CPUs for their tasks.
NO_CPU = {"num_cpus": 0}


# ---- HTTP helpers ---------------------------------------------------------------------------------------
def call(url: str, body: object = None, *, raw: bytes | None = None, token: str | None = None):
    """(status, parsed JSON body) of a GET (no body) or POST."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def locs(answer: dict) -> list[str]:
    return [".".join(str(p) for p in item["loc"]) for item in answer["detail"]]


# ---- fixtures -------------------------------------------------------------------------------------------
def deploy(app, name: str, serve_url: str):
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"{serve_url}/{name}"


@pytest.fixture(scope="module")
def t2i_url(serve_url):
    from ray import serve

    # open on purpose (token_env: null), whatever WORLDGEN_API_TOKEN the environment holds
    app = app_builder({"graph": str(T2I), "token_env": None, "ray_actor_options": NO_CPU})
    try:
        yield deploy(app, "graph-test", serve_url)
    finally:
        serve.delete("graph-test")


@pytest.fixture(scope="module")
def i2i_url(serve_url):
    """The image-to-image template behind a bearer token (only its digest reaches the replica)."""
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    args = {
        "graph": "template:image_to_image",
        "params": {"preset": "tiny", "steps": 2},
        "token_env": TOKEN_ENV,
        "ray_actor_options": NO_CPU,
    }
    try:
        yield deploy(app_builder(args), "graph-test-i2i", serve_url)
    finally:
        serve.delete("graph-test-i2i")
        os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def local_image():
    return wg.Graph.from_config(T2I).run(INPUTS, seed=SEED)["image"]


@pytest.fixture(scope="module")
def init_image_32():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def assert_same(remote: torch.Tensor, local: torch.Tensor, tol: float = 1e-6) -> None:
    assert remote.dtype == local.dtype and remote.shape == local.shape
    assert (remote - local).abs().max().item() <= tol


# ---- the endpoint ---------------------------------------------------------------------------------------
def test_spec_lists_the_exposed_ports(t2i_url):
    status, spec = call(f"{t2i_url}/")
    assert status == 200 and call(f"{t2i_url}/spec")[1] == spec
    assert (spec["name"], spec["level"]) == ("text_to_image_tiny", "graph")
    assert spec["inputs"]["prompt"] == {"kind": "text", "doc": "a prompt or a list of prompts"}
    assert spec["inputs"]["negative_prompt"]["optional"] is True
    assert spec["inputs"]["negative_prompt"]["default"] == ""
    assert spec["inputs"]["steps"] == {"kind": "int", "optional": True}
    assert spec["inputs"]["guidance_scale"] == {"kind": "scalar", "optional": True, "default": 7.5}
    assert spec["outputs"] == {"image": {"kind": "image", "doc": "tensor in [0, 1] (B, 3, H, W)"}}
    assert spec["options"]["encoding"] == ["png", "tensor"]


def test_openapi_shows_request_and_response_built_from_the_ports(t2i_url):
    status, api = call(f"{t2i_url}/openapi.json")
    assert status == 200
    schemas = api["components"]["schemas"]
    inputs = schemas["TextToImageTinyInputs"]
    assert inputs["required"] == ["prompt"]
    assert set(inputs["properties"]) == {
        "prompt",
        "negative_prompt",
        "height",
        "width",
        "steps",
        "guidance_scale",
    }
    request = schemas["TextToImageTinyRunRequest"]["properties"]
    assert {"inputs", "seed", "iterations", "encoding"} <= set(request)
    run = api["paths"]["/run"]["post"]
    assert run["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "TextToImageTinyRunResponse"
    )
    assert {"400", "401", "413", "422", "500"} <= set(run["responses"])


def test_run_with_tensor_encoding_equals_the_local_run(t2i_url, local_image):
    status, answer = call(f"{t2i_url}/run", {"inputs": INPUTS, "seed": SEED, "encoding": "tensor"})
    assert status == 200, answer
    assert (answer["encoding"], answer["seed"]) == ("tensor", SEED)
    assert_same(decode_tensor(answer["outputs"]["image"]), local_image)


def test_run_with_png_encoding_equals_the_local_png(t2i_url, local_image):
    status, answer = call(f"{t2i_url}/run", {"inputs": INPUTS, "seed": SEED})
    assert status == 200, answer
    assert answer["encoding"] == "png"
    assert answer["outputs"]["image"] == encode_png(local_image)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"inputs": {"steps": 2}}, "body.inputs.prompt", "Field required"),
        ({"inputs": {"prompt": PROMPT, "steps": "many"}}, "body.inputs.steps", "valid integer"),
        ({"inputs": {"promt": PROMPT}}, "body.inputs.promt", "Extra inputs are not permitted"),
        ({"inputs": {"prompt": PROMPT}, "encoding": "jpeg"}, "body.encoding", "'png' or 'tensor'"),
        ({"inputs": {"prompt": PROMPT}, "seed": -1}, "body.seed", "greater than or equal to 0"),
    ],
)
def test_bad_requests_get_422_naming_the_field(t2i_url, body, field, message):
    status, answer = call(f"{t2i_url}/run", body)
    assert status == 422
    assert field in locs(answer)
    assert any(message in item["msg"] for item in answer["detail"])


def test_malformed_json_gets_422(t2i_url):
    status, answer = call(f"{t2i_url}/run", raw=b'{"inputs": ')
    assert status == 422 and "json" in json.dumps(answer).lower()


def test_inputs_the_graph_refuses_get_400_with_its_message(t2i_url):
    status, answer = call(f"{t2i_url}/run", {"inputs": {**INPUTS, "height": 33}, "seed": 0})
    assert status == 400
    assert answer["detail"]["error"] == "ConfigError"
    assert (
        "at inputs.height: height and width must be positive multiples of 2, got 33x32"
        in (answer["detail"]["message"])
    )


def test_image_inputs_as_tensor_or_png_match_local_runs(i2i_url, init_image_32):
    local = wg.Graph.from_template("image_to_image", preset="tiny", steps=2)
    inputs = {"prompt": PROMPT, "strength": 0.6}
    as_tensor = {
        "inputs": {**inputs, "image": encode_tensor(init_image_32)},
        "seed": SEED,
        "encoding": "tensor",
    }
    status, answer = call(f"{i2i_url}/run", as_tensor, token=TOKEN)
    assert status == 200, answer
    expected = local.run({**inputs, "image": init_image_32}, seed=SEED)["image"]
    assert_same(decode_tensor(answer["outputs"]["image"]), expected)
    # PNG in: the same as running locally on the 8-bit image the PNG holds
    png = encode_png(init_image_32)
    as_png = {"inputs": {**inputs, "image": png}, "seed": SEED, "encoding": "tensor"}
    status, answer = call(f"{i2i_url}/run", as_png, token=TOKEN)
    assert status == 200, answer
    eight_bit = (init_image_32 * 255 + 0.5).floor().clamp(0, 255) / 255
    assert_same(
        decode_tensor(answer["outputs"]["image"]),
        local.run({**inputs, "image": eight_bit}, seed=SEED)["image"],
    )


def test_bad_image_payloads_get_422_naming_the_field(i2i_url, init_image_32):
    good = encode_tensor(init_image_32)
    cases = [
        ({**good, "data_base64": "not base64!"}, "data_base64: not valid base64"),
        ({**good, "shape": [1, 3, 32, 31]}, "do not match shape [1, 3, 32, 31]"),
        ({**good, "dtype": "float99"}, "unknown tensor dtype 'float99'"),
        # no bytes, so the size check passes, but no tensor torch can make (was a 500)
        ({**good, "shape": [0, 10**20], "data_base64": ""}, "shape: not a tensor shape torch can make"),
        ({**good, "shape": [0, 2**62, 2**62], "data_base64": ""}, "shape: not a tensor shape torch can make"),
        ({"png_base64": ["%%%"]}, "png_base64[0]: not valid base64"),
        ({"png_base64": [base64.b64encode(b"not a png").decode()]}, "png_base64[0]: not a readable image"),
    ]
    for image, message in cases:
        status, answer = call(f"{i2i_url}/run", {"inputs": {"prompt": PROMPT, "image": image}}, token=TOKEN)
        assert status == 422, (image, answer)
        assert any(loc.startswith("body.inputs.image") for loc in locs(answer)), answer
        assert any(message in item["msg"] for item in answer["detail"]), answer


def test_an_image_the_codec_cannot_take_gets_400_before_the_run(i2i_url):
    # Was a 500 from inside the VAE ("expected 3 channels"); now the codec's own check refuses it up front.
    five_channels = encode_tensor(torch.rand(1, 5, 32, 32))
    status, answer = call(
        f"{i2i_url}/run", {"inputs": {"prompt": PROMPT, "image": five_channels}}, token=TOKEN
    )
    assert status == 400
    assert answer["detail"]["error"] == "ConfigError"
    message = answer["detail"]["message"]
    assert message.startswith("at inputs.image: image must be a float tensor (B, 3, H, W)")
    assert "(1, 5, 32, 32)" in message and "node 'vae_enc'" in message


def test_bearer_token_is_required_when_configured(i2i_url):
    assert call(f"{i2i_url}/spec")[0] == 401
    assert call(f"{i2i_url}/spec", token="wrong")[0] == 401
    assert call(f"{i2i_url}/spec", token=TOKEN)[0] == 200


# ---- endpoint nodes -------------------------------------------------------------------------------------
def draw_and_refine(draw: dict, refine: dict | None = None) -> dict:
    """A pipeline config: `draw` (text to image) feeding a local image-to-image graph."""
    refine = refine or wg.Graph.from_template("image_to_image", preset="tiny", steps=2).to_config()
    return {
        "kind": "pipeline",
        "name": "draw_and_refine",
        "graphs": {"draw": draw, "refine": refine},
        "edges": ["draw.image -> refine.image"],
        "inputs": {
            "prompt": ["draw.prompt", "refine.prompt"],
            "steps": "draw.steps",
            "height": "draw.height",
            "width": "draw.width",
        },
        "outputs": {"draft": "draw.image", "image": "refine.image"},
    }


@pytest.fixture(scope="module")
def local_pipeline_result():
    return wg.Pipeline.from_config(draw_and_refine(load_config_file(T2I))).run(INPUTS, seed=SEED)


def test_pipeline_with_an_endpoint_node_equals_the_local_pipeline(t2i_url, local_pipeline_result):
    remote = wg.Pipeline.from_config(draw_and_refine({"endpoint": t2i_url, "name": "t2i"}))
    assert isinstance(remote.graph("draw"), EndpointGraph)
    assert remote.validate() == []
    out = remote.run(INPUTS, seed=SEED)
    assert_same(out["draft"], local_pipeline_result["draft"])
    assert_same(out["image"], local_pipeline_result["image"])
    # config round trip: the node is written back as the endpoint, not as the served graph
    config = remote.to_config()
    assert config["graphs"]["draw"] == {"endpoint": t2i_url, "name": "t2i"}
    assert wg.Pipeline.from_config(config).to_config() == config
    # what Ray ships: plain data (config and spec), no client
    block = pickle.loads(pickle.dumps(remote.graph("draw").block))
    assert block.spec() == remote.graph("draw").block.spec()


def test_endpoint_node_on_the_ray_executor(t2i_url, local_pipeline_result, clean_hosts):
    remote = wg.Pipeline.from_config(draw_and_refine({"endpoint": t2i_url, "name": "t2i"}))
    out = remote.run(INPUTS, seed=SEED, executor="ray")
    assert_same(out["draft"], local_pipeline_result["draft"])  # the endpoint ran it locally in its replica
    assert_same(out["image"], local_pipeline_result["image"], tol=1e-5)  # Ray vs local executor: DESIGN §3


def test_endpoint_with_a_bearer_token_from_the_environment(i2i_url, local_image):
    refine = {"endpoint": i2i_url, "name": "i2i", "headers_env": TOKEN_ENV, "timeout": 120}
    remote = wg.Pipeline.from_config(draw_and_refine(load_config_file(T2I), refine))
    local = wg.Pipeline.from_config(draw_and_refine(load_config_file(T2I)))
    assert_same(remote.run(INPUTS, seed=SEED)["image"], local.run(INPUTS, seed=SEED)["image"])
    assert remote.to_config()["graphs"]["refine"] == refine
    os.environ.pop(TOKEN_ENV)
    try:
        with pytest.raises(wg.WorldgenError, match=f"environment variable {TOKEN_ENV} is not set"):
            remote.run(INPUTS, seed=SEED)
    finally:
        os.environ[TOKEN_ENV] = TOKEN


def test_endpoint_refusal_is_reported_with_the_servers_message(t2i_url):
    remote = wg.Pipeline.from_config(draw_and_refine({"endpoint": t2i_url}))
    with pytest.raises(
        EndpointError, match=r"rejected the request \(HTTP 400 on POST /run\).*multiples of 2"
    ):
        remote.run({**INPUTS, "height": 33}, seed=SEED)


def test_stage_and_world_accept_endpoint_items(t2i_url, tmp_path):
    stage = wg.Stage.from_config(
        {"kind": "stage", "role": "creator", "pipelines": {"remote": {"endpoint": t2i_url}}}
    )
    assert isinstance(stage.item("remote"), EndpointGraph)
    assert stage.to_config()["pipelines"]["remote"] == {"endpoint": t2i_url, "name": "graph-test"}

    def world(creator: dict, directory: Path) -> wg.World:
        config = load_config_file(ROOT / "configs" / "worlds" / "default.yaml")
        config["stages"]["creator"] = creator
        config["generation_defaults"] = {"width": 32, "height": 32, "steps": 2, "guidance": 7.5}
        return wg.World.from_config(config, directory=directory)

    remote = world({"endpoint": t2i_url, "name": "draw"}, tmp_path / "remote")
    local = world({**load_config_file(T2I), "name": "draw"}, tmp_path / "local")
    assert remote.validate() == []
    remote_report, local_report = remote.step(), local.step()
    assert "creator" in remote_report.ran
    (remote_art,), (local_art,) = remote_report.state.artifacts, local_report.state.artifacts
    remote_png = (remote.directory / remote_art.path).read_bytes()
    assert remote_png == (local.directory / local_art.path).read_bytes()


def test_unreachable_endpoint_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/nothing-here"
    graph = EndpointGraph(url, retries=0)  # building needs no endpoint: the spec is fetched on first use
    assert graph.to_config() == {"endpoint": url, "name": "nothing-here", "retries": 0}
    with pytest.raises(EndpointError, match=f"endpoint {url} is unreachable"):
        graph.input_ports()
    config = draw_and_refine({"endpoint": url, "retries": 0})
    with pytest.raises(wg.ConfigError, match=f"endpoint {url} is unreachable"):  # wiring it needs the spec
        wg.Pipeline.from_config(config)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"endpoint": "ftp://host/x"}, "endpoint: Value error, expected an http:// or https:// URL"),
        ({"endpoint": "http://host:8000/x", "tmeout": 3}, "tmeout: Extra inputs are not permitted"),
        (
            {"endpoint": "http://host:8000/x", "retries": -1},
            "retries: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_endpoint_items_name_the_key(item, message):
    with pytest.raises(wg.ConfigError, match=r"at graphs\.draw: .*" + message.replace("(", r"\(")):
        wg.Pipeline.from_config({"kind": "pipeline", "graphs": {"draw": item}})


# ---- the application and its Serve config ---------------------------------------------------------------
def test_serve_config_validates_and_builds():
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "configs/serve/graph.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "serve_apps.graph_app:app_builder"
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)  # the config's paths are relative to the repository root
        assert Path(GraphAppArgs.model_validate(app.args).graph) == T2I  # pinned where the app is built
        assert isinstance(app_builder(app.args), serve.Application)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "args.graph: Field required"),
        ({"graph": str(T2I), "replicas": 2}, "args.replicas: Extra inputs are not permitted"),
        ({"graph": str(T2I), "num_replicas": 0}, "num_replicas must be at least 1"),
        (
            {"graph": str(T2I), "executor": "rey"},
            "args.executor: Value error, unknown executor 'rey'",
        ),
        ({"graph": "configs/graphs/nope.yaml"}, "nope.yaml: no such file or directory"),
        ({"graph": str(T2I), "params": {"steps": 2}}, "`params` apply only to a template"),
        (
            {"graph": "template:text_to_image", "params": {"preset": "tiny", "stpes": 2}},
            "no parameter 'stpes'",
        ),
        ({"graph": "template:text_to_imag"}, "unknown template 'text_to_imag'"),
        ({"graph": str(T2I), "token_env": "WG_TEST_UNSET_TOKEN"}, "WG_TEST_UNSET_TOKEN is not set"),
        ({"graph": str(T2I), "max_body_bytes": 0}, "args.max_body_bytes: Input should be greater than 0"),
        ({"graph": str(T2I), "limits": {"max_stpes": 5}}, "args.limits.max_stpes: Extra inputs"),
        ({"graph": str(T2I), "limits": {"max_steps": 0}}, "args.limits.max_steps: Input should be greater"),
    ],
)
def test_bad_app_args_fail_at_build_with_a_clear_message(args, message):
    with pytest.raises(wg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        app_builder(args)
