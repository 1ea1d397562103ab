"""The OpenAI-compatible LLM server (serve_apps/llm_server.py) on real Ray Serve (multiplexing does not run in
Serve's local testing mode), with tiny random-initialised models and LoRA adapters built here: answers equal
plain transformers generation token for token, streams, serves adapters on one base loaded once per replica,
answers OpenAI-shaped errors (404, 400, 401, 413), keeps every path (docs included) behind its key, holds requests
to its budgets before generating, and never logs its key. `llm_server()` also serves the `llm/openai` tests in
worldgen/nodes/test_llm.py, worldgen/test_world.py and test_fuzz.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
import yaml

from serve_apps.llm_runtime import ModelRuntime, TextDeltas, cut_at_stop
from serve_apps.llm_server import LLMServerArgs, app_builder
from tests.worldgen.nodes.test_llm import CHAT_TEMPLATE, _tiny_causal_lm

APP = "llm-test"
KEY = "sk-llm-server-4b7e0c2a9d1f6e83"
KEY_ENV = "WORLDGEN_TEST_LLM_SERVER_KEY"
CONFIG = Path(__file__).parents[2] / "configs" / "serve" / "llm.yaml"
CHAT = [
    {"role": "system", "content": "You narrate."},
    {"role": "user", "content": "a harbor at dawn"},
]
TOKENS = 12
# The test server's budgets: small, so that going over them costs the tests nothing.
LIMITS = {"max_new_tokens": 64, "max_prompt_chars": 4000}
MAX_BODY = 64 * 1024


# ---- helpers (worldgen/nodes/test_llm.py and worldgen/test_world.py use them too) ---------------------------------------------
@contextmanager
def llm_server(
    serve_url: str,
    models: dict[str, Any],
    *,
    adapters: dict[str, dict[str, Any]] | None = None,
    key_env: str = KEY_ENV,
    key: str | None = None,
    max_models_per_replica: int = 4,
    name: str = APP,
    **more_args: Any,
) -> Iterator[str]:
    """The server deployed on the running Serve as application `name`, its OpenAI base URL while the `with`
    lasts. `key` is put in `key_env` only while the application is built: the builder keeps its hash.
    `more_args`: further LLMServerArgs (limits, max_body_bytes, ...)."""
    args = {
        "models": {k: str(v) for k, v in models.items()},
        "adapters": {k: {"base": a["base"], "path": str(a["path"])} for k, a in (adapters or {}).items()},
        "max_models_per_replica": max_models_per_replica,
        "api_key_env": key_env,
        "ray_actor_options": {"num_cpus": 0},  # tiny models; leave the test cluster's CPUs to the others
        **more_args,
    }
    with pytest.MonkeyPatch.context() as patch:
        if key is None:
            patch.delenv(key_env, raising=False)
        else:
            patch.setenv(key_env, key)
        app = app_builder(args)
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_url}/{name}/v1"
    finally:
        serve.delete(name)


def server_report(name: str = APP) -> dict[str, Any]:
    """What the (single) model replica of application `name` loaded and served (LLMModels.report)."""
    from ray import serve

    return serve.get_deployment_handle("LLMModels", app_name=name).report.remote().result()


def direct_generation(
    model_dir: Path, messages: list[dict[str, str]], max_new_tokens: int, adapter: Path | None = None
) -> tuple[str, int, int]:
    """(text, prompt tokens, new tokens) of greedy generation with plain transformers (+ peft): the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer("\n\n".join(m["content"] for m in messages), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
    new = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), encoded["input_ids"].shape[1], len(new)


def make_lora_adapter(base_dir: Path, directory: Path, seed: int) -> Path:
    """A LoRA adapter on the tiny model whose lora_B weights are random (non-zero): it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-server")
    tiny = _tiny_causal_lm(root / "tiny", CHAT_TEMPLATE)
    return {
        "tiny": tiny,
        "plain": _tiny_causal_lm(root / "plain", chat_template=None),
        "tiny-a": make_lora_adapter(tiny, root / "lora-a", seed=1),
        "tiny-b": make_lora_adapter(tiny, root / "lora-b", seed=2),
    }


@pytest.fixture(scope="module")
def url(serve_url, dirs) -> Iterator[str]:
    """Two bases (one without a chat template), two adapters on the first; at most 2 model ids per replica,
    so the tests also exercise eviction; a key is required."""
    adapters = {name: {"base": "tiny", "path": dirs[name]} for name in ("tiny-a", "tiny-b")}
    models = {"tiny": dirs["tiny"], "plain": dirs["plain"]}
    with llm_server(
        serve_url,
        models,
        adapters=adapters,
        key=KEY,
        max_models_per_replica=2,
        limits=LIMITS,
        max_body_bytes=MAX_BODY,
    ) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def complete(client: openai.OpenAI, model: str, **options: Any) -> Any:
    request = {"messages": CHAT, "max_tokens": TOKENS, "temperature": 0} | options
    return client.chat.completions.create(model=model, **request)


def post(url: str, body: Any, key: str | None = KEY, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


# ---- configuration (no Ray) ----------------------------------------------------------------------------
def test_serve_config_file_loads_with_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "serve_apps.llm_server:app_builder" and app.route_prefix == "/llm"
    args = LLMServerArgs.model_validate(app.args)
    assert {a.base for a in args.adapters.values()} <= set(args.models)
    assert args.api_key_env == "WORLDGEN_LLM_API_KEY" and "sk-" not in CONFIG.read_text()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, "models: Field required"),
        ({"models": {}}, "models: "),
        ({"models": {"m": "d"}, "adapters": {"a": {"base": "x", "path": "p"}}}, "adapters.a.base: 'x'"),
        ({"models": {"m": "d"}, "adapters": {"m": {"base": "m", "path": "p"}}}, "adapters.m: the name"),
        ({"models": {"m": "d"}, "adapters": {"a": {"base": "m"}}}, "adapters.a.path: Field required"),
        ({"models": {"m": "d"}, "max_models_per_replica": 0}, "max_models_per_replica: "),
        ({"models": {"m": "d"}, "api_key_env": "sk-not-a-name"}, "api_key_env: "),
        ({"models": {"m": "d"}, "modles": {}}, "modles: Extra inputs"),
        ({"models": {"m": "d"}, "max_body_bytes": 0}, "max_body_bytes: "),
        ({"models": {"m": "d"}, "limits": {"max_new_tokens": 0}}, "limits.max_new_tokens: "),
        ({"models": {"m": "d"}, "limits": {"max_tokens": 9}}, "limits.max_tokens: Extra inputs"),
        (
            {"models": {"m": "d"}, "default_max_tokens": 600, "limits": {"max_new_tokens": 500}},
            "default_max_tokens: 600 is over limits.max_new_tokens (500)",
        ),
    ],
)
def test_builder_validates_args_naming_the_field(args, field):
    with pytest.raises(ValueError, match="llm server args") as err:
        app_builder(args)
    assert field in str(err.value)


def test_default_max_tokens_follows_a_lower_limit():
    args = LLMServerArgs.model_validate({"models": {"m": "d"}, "limits": {"max_new_tokens": 100}})
    assert args.default_max_tokens == 100 and LLMServerArgs(models={"m": "d"}).default_max_tokens == 512


def test_replica_refuses_missing_model_dirs_naming_the_field(tmp_path, dirs):
    with pytest.raises(ValueError, match=r"models.m: .*nowhere is not a directory"):
        ModelRuntime({"m": str(tmp_path / "nowhere")}, {})
    with pytest.raises(ValueError, match=r"adapters.a.path: .* has no adapter_config.json"):
        ModelRuntime({"m": str(dirs["tiny"])}, {"a": ("m", str(dirs["tiny"]))})


def test_text_deltas_hold_back_split_characters_and_possible_stops():
    """Streamed pieces add up to the final text: a character split across byte tokens waits for its last
    byte, and a tail that may become a stop sequence waits until it cannot."""
    data = "né, stop here".encode()

    def decode(ids: list[int]) -> str:  # one "token" per byte
        return bytes(ids).decode("utf-8", errors="replace")

    plain = TextDeltas(decode, stop=[])
    pieces = [plain.add([b]) for b in data]
    assert pieces[:3] == ["n", "", "é"]  # the first byte of é gives no text
    assert "".join(pieces) + plain.finish(data.decode()) == data.decode()
    deltas = TextDeltas(decode, stop=["stop"])
    pieces = [deltas.add([b]) for b in data]
    assert "".join(pieces) == "né, " and deltas.stopped  # cut before the stop sequence, never past it
    assert "\ufffd" not in "".join(pieces) and "s" not in "".join(pieces)
    assert deltas.finish(cut_at_stop(decode(list(data)), ["stop"])[0]) == ""


# ---- the server ----------------------------------------------------------------------------------------
def test_models_lists_models_and_adapters(client, url):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"tiny", "plain", "tiny-a", "tiny-b"}
    assert all(m.object == "model" and m.owned_by == "worldgen" for m in listed.values())
    assert listed["tiny-a"].parent == "tiny" and listed["tiny"].parent is None
    assert client.models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_equals_direct_greedy_generation(client, dirs):
    answer = complete(client, "tiny")
    text, prompt_tokens, new_tokens = direct_generation(dirs["tiny"], CHAT, TOKENS)
    assert answer.object == "chat.completion" and answer.model == "tiny" and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == text and text.strip()
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert answer.usage.total_tokens == prompt_tokens + new_tokens
    assert choice.finish_reason == ("length" if new_tokens == TOKENS else "stop")
    # the newer token-limit field, and JSON mode (accepted, not enforced), give the same answer
    again = complete(
        client, "tiny", max_tokens=None, max_completion_tokens=TOKENS, response_format={"type": "json_object"}
    )
    assert again.choices[0].message.content == text
    # a tokenizer without a chat template: the messages' contents, as llm/transformers prompts it
    plain = complete(client, "plain")
    assert plain.choices[0].message.content == direct_generation(dirs["plain"], CHAT, TOKENS)[0]


def test_stream_sends_chunks_that_add_up_to_the_completion(client, url):
    whole = complete(client, "tiny").choices[0].message.content
    stream = complete(client, "tiny", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"] or finishing == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # on the wire: server-sent events, one JSON object per `data:` line, then [DONE]
    body = {"model": "tiny", "messages": CHAT, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with post(url, body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(d for d in deltas if d) == whole


def test_stop_sequences_cut_the_answer(client):
    whole = complete(client, "tiny").choices[0].message.content
    stop = whole[4:6]
    assert stop.strip() and len(stop) == 2
    cut = complete(client, "tiny", stop=[stop, "never-generated"])
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = complete(client, "tiny", stop=stop, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[: whole.index(stop)]
    )


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return complete(client, "tiny", temperature=1.5, seed=seed).choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    assert {sample(s) for s in (12, 13, 14)} - {first}


def test_adapters_answer_differently_and_match_peft(client, dirs):
    base = complete(client, "tiny").choices[0].message.content
    answers = {name: complete(client, name).choices[0].message.content for name in ("tiny-a", "tiny-b")}
    assert len({base, *answers.values()}) == 3
    for name, text in answers.items():
        assert text == direct_generation(dirs["tiny"], CHAT, TOKENS, adapter=dirs[name])[0]
    # switching back and forth (and concurrently) keeps each model's answer
    order = ["tiny-a", "tiny", "tiny-b", "tiny-a", "tiny-b", "tiny"]
    expected = {"tiny": base, **answers}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda name: complete(client, name).choices[0].message.content, order))
    assert got == [expected[name] for name in order]


def test_base_loads_once_per_replica_while_adapters_come_and_go(client):
    complete(client, "plain")
    complete(client, "tiny")  # the replica now holds 2 model ids (its limit): plain, tiny
    before = server_report()
    first_a = complete(client, "tiny-a").choices[0].message.content  # evicts plain
    complete(client, "tiny-b")  # evicts the base's own id; its adapters still hold the weights
    complete(client, "tiny")  # evicts tiny-a: the adapter is detached
    assert complete(client, "tiny-a").choices[0].message.content == first_a  # attached again
    after = server_report()
    # from here on the replica holds exactly `plain` and `tiny` (its limit is 2), whatever earlier tests left
    assert after["base_loads"]["tiny"] == before["base_loads"]["tiny"]  # not reloaded, however many evictions
    assert after["adapter_loads"]["tiny-a"] - before["adapter_loads"].get("tiny-a", 0) == 2
    assert after["adapter_loads"]["tiny-b"] - before["adapter_loads"].get("tiny-b", 0) == 1
    assert after["loaded"] == {"tiny": ["tiny-a"]}  # plain unloaded; tiny-b detached when evicted
    assert after["completions"]["tiny-a"] - before["completions"].get("tiny-a", 0) == 2


def test_unknown_model_is_404_in_openais_shape(client, url):
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "gpt-nonexistent")
    assert "gpt-nonexistent" in str(err.value)
    response = post(url, {"model": "nope", "messages": CHAT})
    assert response.status_code == 404
    error = response.json()["error"]
    assert (
        error["code"] == "model_not_found" and error["type"] == "invalid_request_error" and error["message"]
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny"}, "messages"),
        ({"messages": CHAT}, "model"),
        ({"model": "tiny", "messages": CHAT, "temperature": 5}, "temperature"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "n": 2}, "n"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": True}, "max_tokens"),  # no bool for a number
        ({"model": "tiny", "messages": CHAT, "seed": False}, "seed"),
        ({"model": "tiny", "messages": CHAT, "temperature": True}, "temperature"),
        ({"model": "tiny", "messages": CHAT, "stream": "yes"}, "stream"),
        ({"model": "tiny", "messages": CHAT, "stream": 1}, "stream"),
        ({"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "harbor " * 200}]}, "at most 128"),
        (
            {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "harbor " * 200}]},
            "at most 128",
        ),
        ("not an object", ""),
    ],
)
def test_bad_requests_are_400_never_500(url, body, says):
    response = post(url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"] + str(error["param"])


def test_a_body_that_is_not_json_is_400(url):
    response = requests.post(
        f"{url}/chat/completions", data=b"{not json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
    missing = requests.get(f"{url}/no-such-route", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


@pytest.mark.parametrize(
    ("options", "limit", "param"),
    [
        ({"max_tokens": LIMITS["max_new_tokens"] + 1}, "max_new_tokens", "max_tokens"),
        ({"max_completion_tokens": 10**9}, "max_new_tokens", "max_completion_tokens"),
        (
            {"messages": [{"role": "user", "content": "x" * (LIMITS["max_prompt_chars"] + 1)}]},
            "max_prompt_chars",
            "messages",
        ),
        (  # the characters of all messages count, content parts included
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 2001}]}] * 2},
            "max_prompt_chars",
            "messages",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_requests_over_the_budgets_are_400_naming_the_limit(url, options, limit, param, stream):
    before = server_report()["completions"]
    response = post(url, {"model": "tiny", "messages": CHAT, "stream": stream} | options)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"limit '{limit}'" in error["message"] and error["param"] == param
    assert error["code"] == "limit_exceeded" and error["type"] == "invalid_request_error"
    assert server_report()["completions"] == before  # refused before any generation
    # at the limit, the request is served (the answer ends early at this tiny model's context)
    if limit == "max_new_tokens":
        at_limit = {"model": "tiny", "messages": CHAT, "max_tokens": LIMITS["max_new_tokens"]}
        assert post(url, at_limit).status_code == 200


def test_a_body_over_the_limit_is_413_before_it_is_read(url):
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "z" * MAX_BODY}]}
    response = post(url, huge)
    assert response.status_code == 413
    error = response.json()["error"]
    assert "max_body_bytes" in error["message"] and str(MAX_BODY) in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the guard counts what arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"z" * 1024
        yield b'"}]}'

    streamed = requests.post(
        f"{url}/chat/completions", data=chunks(), headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "invalid_request_error"
    # without the key, the body is not even looked at
    assert post(url, huge, key=None).status_code == 401


def test_docs_and_openapi_need_the_key_and_show_the_request_schema(url):
    root = url.removesuffix("/v1")
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/models/tiny"):
        response = requests.get(root + path, timeout=30)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    api = requests.get(f"{root}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    operation = api["paths"]["/v1/chat/completions"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = api["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert set(request["required"]) == {"model", "messages"}
    assert {"max_tokens", "temperature", "stream", "stop", "seed"} <= set(request["properties"])
    # what it answers, as documented: the completion (or its event stream), and OpenAI-shaped errors; no 422
    responses = operation["responses"]
    assert set(responses) == {"200", "400", "401", "404", "413", "500"}
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_key_is_required_and_never_logged(url):
    for key in (None, "sk-wrong", KEY + "x"):
        response = post(url, {"model": "tiny", "messages": CHAT, "max_tokens": 2}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        listing = requests.get(
            f"{url}/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30
        )
        assert listing.status_code == 401
    wrong = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert post(url, {"model": "tiny", "messages": CHAT, "max_tokens": 2}).status_code == 200
    # nothing the cluster logged (builder, replicas, proxy, controller) holds the key
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("serve" in p.parts for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path}"
    assert KEY not in os.environ.get(KEY_ENV, "")  # set only while the application was built
