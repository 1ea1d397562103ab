"""LLM task nodes: the offline template LLM, the OpenAI-compatible API over real HTTP (the project's own Ray Serve
LLM server on a tiny local model; scripted answers and errors from tests/openai_server.py), Anthropic's API,
JSON output validated against the generation-config schema with retries, and a tiny local causal LM."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
import torch

import worldgen as wg
from tests.openai_server import serve_openai
from worldgen.nodes.llm import LocalLLM, OpenAILLM, TemplateLLM, extract_json, output_schema
from worldgen.prompts import DEFAULT_PROMPT_DIR, prompt_dirs, render_prompt, set_prompt_dirs
from worldgen.rng import RngState
from worldgen.state import GenerationConfig, GenerationPlan

KEY = "sk-test-4f9c2a7e1b3d5f60a8c4e2d1"
KEY_ENV = "WORLDGEN_TEST_LLM_KEY"
VALID = '{"prompt": "a lighthouse over the drowned harbor", "width": 64, "height": 64, "steps": 4}'


def sample_context(**overrides):
    context = {
        "state": {
            "happening": "The tide rises over the drowned harbor.",
            "generation": {"prompt": "a drowned harbor", "width": 64, "height": 64},
            "artifacts": [{"path": "episodes/1/image_0.png"}],
            "description": "A flooded pier under a pink sky, one lamp lit.",
            "outcome": "The keeper lit the lamp as the tide came in.",
        },
        "content": {
            "title": "The Drowned Harbor",
            "story": "The sea came back.\nThe keeper stayed.",
            "history": ["The sea came back."],
            "glossary": {"keeper": "the last lighthouse keeper", "tide": "the living sea"},
            "style": "watercolor, muted",
            "rules": ["No one leaves the harbor."],
        },
        "action": "light the lamp",
        "step": 2,
        "pipelines": ["text_to_image", "image_to_image"],
        "defaults": {"width": 64, "height": 64, "steps": 4, "guidance": 5.0},
        "seed": 7,
    }
    return context | overrides


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


@pytest.fixture(scope="module")
def llm_server_url(serve_url, tiny_lm_dir):
    """serve_apps/llm_server.py serving the tiny causal LM as 'test-model'; requests need KEY."""
    from tests.serve_apps.test_llm_server import llm_server  # here: that module imports this one's tiny model

    with llm_server(serve_url, {"test-model": tiny_lm_dir}, key_env=KEY_ENV, key=KEY) as url:
        yield url


def openai_block(url, **config) -> OpenAILLM:
    base = {
        "model": "test-model",
        "base_url": url,
        "api_key": f"${{env:{KEY_ENV}}}",
        "retries": 0,
        "timeout": 10,
    }
    return wg.create_block("llm/openai", base | config)


# ---- prompts and the template LLM ----------------------------------------------------------------------
def test_template_llm_is_deterministic():
    block = wg.create_block(
        "llm/template",
        {
            "prompt": "Go {{ where }}.",
            "system": "Narrate {{ title }}.",
            "template": "[{{ system }}] {{ prompt }} #{{ n }}",
        },
    )
    assert isinstance(block, TemplateLLM) and block.role == "llm"
    context = {"where": "north", "title": "the harbor", "n": 3}
    first = block(context=context)
    assert first == {"text": "[Narrate the harbor.] Go north. #3", "data": None}
    assert block(context=context) == first
    # the prompt/system inputs override the rendered templates
    assert block(context=context, prompt="Stay.", system="S")["text"] == "[S] Stay. #3"


def test_missing_variable_names_variable_and_template():
    block = wg.create_block("llm/template", {"template": "Step {{ step }} in {{ content.title }}"})
    with pytest.raises(wg.ConfigError) as err:
        block(context={"content": {"title": "x"}})
    assert "'step'" in str(err.value) and "Step {{ step }}" in str(err.value)
    with pytest.raises(wg.ConfigError, match=r"'title'"):
        block(context={"step": 1, "content": {}})
    file_block = wg.create_block("llm/template", {"template": "file:offline/development.j2"})
    with pytest.raises(wg.ConfigError, match=r"file:offline/development.j2.*undefined variable 'step'"):
        file_block(context={k: v for k, v in sample_context().items() if k != "step"})
    with pytest.raises(wg.ConfigError, match=r"'file:nowhere.j2' was not found"):
        render_prompt("file:nowhere.j2", {})


def test_prompt_dirs_let_a_world_override_prompts(tmp_path):
    (tmp_path / "development.j2").write_text("My world, step {{ step }}.")
    assert prompt_dirs() == [DEFAULT_PROMPT_DIR]
    set_prompt_dirs([tmp_path])
    try:
        assert prompt_dirs() == [tmp_path.resolve(), DEFAULT_PROMPT_DIR]
        assert render_prompt("file:development.j2", {"step": 4}) == "My world, step 4."
        # files the world does not override still come from configs/prompts/
        assert "Step 2" in render_prompt("file:offline/development.j2", sample_context())
    finally:
        set_prompt_dirs([])
    assert render_prompt("file:development.j2", {"step": 4}, dirs=[tmp_path]) == "My world, step 4."
    assert "Write what happens next" in render_prompt("file:development.j2", sample_context())


def test_prompts_render_in_a_sandbox():
    with pytest.raises(wg.ConfigError, match="sandbox"):
        render_prompt("{{ x.__class__.__mro__ }}", {"x": "a"})


def test_offline_templates_render_and_architect_validates():
    context = sample_context()
    texts = {
        name: render_prompt(f"file:offline/{name}.j2", context)
        for name in ("development", "architect", "author", "world_update")
    }
    assert texts["development"].startswith("Step 2: In The Drowned Harbor")
    assert "Prompted by the visitor: light the lamp." in texts["development"]
    assert "A flooded pier" in texts["author"]
    assert texts["world_update"].endswith("The keeper lit the lamp as the tide came in.")
    config = GenerationConfig.model_validate_json(texts["architect"])
    assert config.pipeline == "text_to_image" and (config.width, config.height, config.steps) == (64, 64, 4)
    assert config.seed == 7 and "The tide rises" in config.prompt
    # no action, empty world: still readable
    empty = sample_context(
        action=None,
        step=0,
        state=dict.fromkeys(("happening", "generation", "artifacts", "description", "outcome")),
        content={"title": "T", "story": "", "history": [], "glossary": {}, "style": "", "rules": []},
    )
    assert (
        render_prompt("file:offline/development.j2", empty)
        == "Step 0: In T, at first light, the story begins."
    )
    GenerationConfig.model_validate_json(render_prompt("file:offline/architect.j2", empty))
    # the prompts for real LLMs render with the same variables
    for name in ("system", "development", "architect", "author", "world_update"):
        assert render_prompt(f"file:{name}.j2", context)
    assert '"text_to_image", "image_to_image"' in render_prompt("file:architect.j2", context)


def test_template_llm_json_output_validates_generation_config():
    block = wg.create_block(
        "llm/template",
        {"template": "file:offline/architect.j2", "output": "json", "schema": "generation"},
    )
    out = block(context=sample_context())
    assert out["data"] == GenerationPlan.model_validate_json(out["text"]).model_dump(mode="json")
    assert [r["kind"] for r in out["data"]] == [
        "image"
    ]  # block 2: a list of requests (one written as an object)
    with pytest.raises(wg.ConfigError, match="unknown output schema 'generation_cfg'.*did you mean"):
        wg.create_block("llm/template", {"template": "x", "output": "json", "schema": "generation_cfg"})
    with pytest.raises(wg.ConfigError, match="output: json"):
        wg.create_block("llm/template", {"template": "x", "schema": "generation_config"})
    assert output_schema("generation_config") is GenerationConfig  # one image request: block 2 as it was
    assert output_schema("generation") is GenerationPlan


def test_extract_json_tolerates_fences_and_prose():
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure!\n```json\n{"a": {"b": [1, 2]}}\n```\nEnjoy.') == {"a": {"b": [1, 2]}}
    assert extract_json('Here it is: {"a": "}"} and that is all') == {"a": "}"}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("[1, 2] is not an object")


# ---- OpenAI-compatible API -----------------------------------------------------------------------------
def test_openai_sends_chat_messages_and_bearer_key(api_key, llm_server_url, tiny_lm_dir, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WORLDGEN_TEST_LLM_URL", llm_server_url)
    prompts = {"prompt": "Describe {{ place }}.", "system": "You narrate {{ world }}.", "temperature": 0.2}
    block = openai_block("${env:WORLDGEN_TEST_LLM_URL}", **prompts, max_tokens=10, extra_body={"seed": 3})
    context = {"place": "the harbor", "world": "The Drowned Harbor"}
    out = block(context=context)
    # The same model, messages (system + user), token limit, temperature and seed, run here as
    # llm/transformers: the server got everything the block sent, and the key let it in.
    local = wg.create_block("llm/transformers", {"model": str(tiny_lm_dir), **prompts, "max_tokens": 10})
    expected = local(context=context, rng=RngState.seeded(3))["text"]
    assert expected and out["data"] is None and out["text"].strip() == expected
    assert block.messages(context) == [
        {"role": "system", "content": "You narrate The Drowned Harbor."},
        {"role": "user", "content": "Describe the harbor."},
    ]
    # a second block for the same endpoint + model shares the client
    assert openai_block("${env:WORLDGEN_TEST_LLM_URL}").client()._client is block.client()._client
    assert KEY not in caplog.text


def test_openai_key_never_in_config_repr_or_saved_graph(api_key, llm_server_url, tmp_path):
    block = openai_block(llm_server_url, prompt="Hello {{ name }}", temperature=0, max_tokens=6)
    assert KEY not in json.dumps(block.config_dict()) and KEY not in repr(block)
    assert block.config_dict()["api_key"] == f"${{env:{KEY_ENV}}}"
    first = block(context={"name": "world"})  # the key was resolved and used
    assert first["text"]
    assert KEY not in repr(vars(block)) and KEY not in repr(block.config)

    graph = wg.Graph("chat")
    graph.add_node(block, id="llm")
    graph.expose_input("context", "llm.context")
    graph.expose_output("text", "llm.text")
    saved = graph.save(tmp_path / "chat")
    files = [p for p in saved.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert f"${{env:{KEY_ENV}}}" in (saved / "graph.yaml").read_text()
    loaded = wg.Graph.load(saved)
    again = block(context={"name": "again"})["text"]
    assert loaded.run({"context": {"name": "again"}}) == {"text": again}
    assert loaded.run({"context": {"name": "world"}}) == {"text": first["text"]}


def test_openai_literal_key_is_refused():
    with pytest.raises(wg.ConfigError, match=r"environment variable") as err:
        wg.create_block("llm/openai", {"model": "m", "api_key": KEY})
    assert KEY not in str(err.value)
    config = {
        "kind": "graph",
        "nodes": {"llm": {"type": "llm/openai", "config": {"model": "m", "api_key": KEY}}},
    }
    with pytest.raises(wg.ConfigError, match=r"\$\{env:") as err:
        wg.Graph.from_config(config)
    assert KEY not in str(err.value)
    with pytest.raises(wg.ConfigError, match="environment variable"):
        wg.create_block("llm/anthropic", {"model": "m", "api_key": "my-key"})


def test_openai_wrong_key_is_an_execution_error_without_the_key(llm_server_url, monkeypatch):
    wrong = "sk-wrong-9d8c7b6a5f4e3d2c"
    monkeypatch.setenv(KEY_ENV, wrong)
    block = openai_block(llm_server_url, prompt="hi")
    with pytest.raises(wg.ExecutionError) as err:
        block()
    message = str(err.value)
    assert "401" in message and llm_server_url in message and "test-model" in message
    assert wrong not in message


def test_openai_json_mode_against_a_model_that_never_writes_json(api_key, llm_server_url):
    """JSON mode (response_format json_object) is accepted by the server; the tiny model's answers are never
    JSON, so the block asks again with the error and fails after max_attempts, naming the schema."""
    block = openai_block(
        llm_server_url,
        prompt="Plan.",
        output="json",
        schema="generation_config",
        max_attempts=2,
        temperature=0,
        max_tokens=6,
    )
    with pytest.raises(wg.ExecutionError, match=r"'generation_config' after 2 attempt\(s\)"):
        block()


def test_openai_json_retries_until_valid(api_key):
    answers = ["I think the picture should be calm.", '{"prompt": "", "width": 63}', f"```json\n{VALID}\n```"]
    with serve_openai(responses=answers, api_key=api_key) as server:
        block = openai_block(
            server.url, prompt="Plan the picture.", output="json", schema="generation_config"
        )
        out = block()
        assert len(server.requests) == 3
        assert out["data"] == GenerationConfig.model_validate_json(VALID).model_dump(mode="json")
        assert out["data"]["pipeline"] == "text_to_image" and out["text"].startswith("```json")
        first, second, third = (r.body for r in server.requests)
        assert first["response_format"] == {"type": "json_object"}
        assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
        assert second["messages"][1]["content"] == answers[0]
        correction = third["messages"][-1]["content"]
        assert "Return only a JSON object matching this schema" in correction and '"properties"' in correction
        assert "prompt" in correction and "multiple of 8" in correction  # the validation error


def test_openai_json_always_invalid_fails_after_max_attempts(api_key):
    with serve_openai(responses=['{"width": 64}'], api_key=api_key) as server:
        block = openai_block(
            server.url,
            prompt="Plan.",
            output="json",
            schema="generation_config",
            max_attempts=2,
            json_mode=False,
        )
        with pytest.raises(wg.ExecutionError) as err:
            block()
    assert len(server.requests) == 2 and "response_format" not in server.requests[0].body
    message = str(err.value)
    assert "llm/openai" in message and "'generation_config'" in message and "2 attempt(s)" in message
    assert "prompt" in message  # the last error: the missing field


def test_openai_connection_refused_names_endpoint(api_key):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    block = openai_block(url, prompt="hi", timeout=2)
    start = time.monotonic()
    with pytest.raises(wg.ExecutionError, match="cannot|Connection|connect") as err:
        block()
    assert time.monotonic() - start < 5
    assert url in str(err.value) and KEY not in str(err.value)


def test_openai_in_a_graph_error_names_the_node(api_key):
    with serve_openai(responses=[{"status": 400, "error": "bad model"}], api_key=api_key) as server:
        graph = wg.Graph("g")
        graph.add_node(openai_block(server.url, prompt="hi"), id="writer")
        graph.expose_output("text", "writer.text")
        with pytest.raises(wg.ExecutionError, match=r"writer.*400.*bad model"):
            graph.run()


def test_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    block = openai_block("http://127.0.0.1:9/v1", prompt="hi")
    with pytest.raises(wg.ConfigError, match=f"{KEY_ENV} is not set"):
        block()


# ---- Anthropic -----------------------------------------------------------------------------------------
def test_anthropic_messages_api(api_key):
    with serve_openai(responses=["The tide rose."], api_key=api_key) as server:
        block = wg.create_block(
            "llm/anthropic",
            {
                "model": "claude-test",
                "base_url": server.root,
                "api_key": f"${{env:{KEY_ENV}}}",
                "prompt": "What happened at {{ place }}?",
                "system": "You are the narrator.",
                "retries": 0,
            },
        )
        assert block(context={"place": "the harbor"}) == {"text": "The tide rose.", "data": None}
        (request,) = server.requests
        assert request.path == "/v1/messages" and request.authorized
        assert request.body["system"] == "You are the narrator."
        assert request.messages == [{"role": "user", "content": "What happened at the harbor?"}]
        assert request.body["max_tokens"] == 512 and request.body["model"] == "claude-test"
        assert "x-api-key" not in request.headers
        assert KEY not in json.dumps(block.config_dict())


# ---- local transformers causal LM ----------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tiny_causal_lm(directory: Path, chat_template: str | None, context: int = 128) -> Path:
    """A random-initialised Llama (2 layers, hidden 16) with a BPE tokenizer trained here, saved to `directory`;
    `context` tokens of positions (a world's prompts need more than the default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["a harbor at dawn", "the lighthouse keeper walks", "ships sail north"] * 5, trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return _tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), CHAT_TEMPLATE, context=4096)


def test_local_llm_is_reproducible_per_seed(tiny_lm_dir):
    block = wg.create_block(
        "llm/transformers",
        {"model": str(tiny_lm_dir), "prompt": "Tell of {{ place }}.", "system": "Narrate.", "max_tokens": 8},
    )
    assert isinstance(block, LocalLLM) and type(block.model).__name__ == "LlamaForCausalLM"
    text, templated = block.prompt_text(block.messages({"place": "the harbor"}))
    assert templated and text == "<s>system: Narrate.\n<s>user: Tell of the harbor.\nassistant:"
    context = {"place": "the harbor"}
    first = block(context=context, rng=RngState.seeded(1))
    again = block(context=context, rng=RngState.seeded(1))
    assert first["text"] == again["text"] and first["text"]
    assert torch.equal(first["rng"].state, again["rng"].state)
    assert not torch.equal(first["rng"].state, RngState.seeded(1).state)  # the generator advanced
    others = {block(context=context, rng=RngState.seeded(s))["text"] for s in (2, 3, 4)}
    assert others - {first["text"]}
    # temperature 0: greedy, no randomness needed
    greedy = wg.create_block(
        "llm/transformers", {"model": str(tiny_lm_dir), "temperature": 0, "max_tokens": 6}
    )
    assert greedy(prompt="a harbor")["text"] == greedy(prompt="a harbor")["text"]


def test_local_llm_in_a_graph_and_saved(tiny_lm_dir, tmp_path):
    graph = wg.Graph("local_chat")
    graph.add_node("llm/transformers", id="llm", config={"model": str(tiny_lm_dir), "max_tokens": 6})
    graph.expose_input("prompt", "llm.prompt")
    graph.expose_output("text", "llm.text")
    assert graph.validate() == []
    out = graph.run({"prompt": "ships sail north"}, seed=5)
    assert out == graph.run({"prompt": "ships sail north"}, seed=5)
    direct = graph.block("llm")(prompt="ships sail north", rng=RngState.seeded(5))
    assert out["text"] == direct["text"]
    loaded = wg.Graph.load(graph.save(tmp_path / "saved"))
    assert loaded.run({"prompt": "ships sail north"}, seed=5) == out


def test_local_llm_without_chat_template(tmp_path):
    from tests.serve_apps.test_llm_server import direct_generation  # here: that module imports this one

    directory = _tiny_causal_lm(tmp_path / "plain", chat_template=None)
    block = wg.create_block("llm/transformers", {"model": str(directory), "temperature": 0, "max_tokens": 4})
    text, templated = block.prompt_text(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    )
    assert (text, templated) == ("S\n\nU", False)
    # greedy generation on the joined contents (special tokens added by the tokenizer), as plain transformers
    chat = [{"role": "system", "content": "Narrate."}, {"role": "user", "content": "a harbor"}]
    expected = direct_generation(directory, chat, 4)[0].strip()
    assert expected and block(prompt="a harbor", system="Narrate.")["text"] == expected
