"""The trust policy for configs from the network: every rule refuses what it must, names the field, quotes no
file and no secret, and the admitted config is resolved (refs inlined, paths absolute)."""

from __future__ import annotations

import copy
import json

import pytest

from worldgen.config import load_config_file
from worldgen.templates import build_template
from worldgen.trust import PROJECT_CONFIGS, TrustError, TrustPolicy, admit_config
from worldgen.world import World

SECRET = "sk-server-only-0123456789abcdef"
OUTSIDE = "OUTSIDE-FILE-CONTENT-7f3a"


def world_config() -> dict:
    return build_template("offline_world", preset="tiny", size=32, steps=2)


def openai_node(**config) -> dict:
    return {
        "type": "llm/openai",
        "config": {"model": "test-model", "api_key": "${env:SERVER_KEY}", "prompt": "hi", **config},
    }


def with_author(node: dict) -> dict:
    config = world_config()
    config["stages"]["author"]["nodes"]["llm"] = node
    return config


@pytest.fixture
def files(tmp_path):
    """A server root with a prompt folder, a graph config and an include; an outside folder with a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "mine.j2").write_text("Story so far: {{ content.story }}")
    (root / "graphs").mkdir()
    (root / "graphs" / "body.yaml").write_text(
        json.dumps({"temperature": 0.1, "nested": {"ref": "leaf.yaml"}})
    )
    (root / "graphs" / "leaf.yaml").write_text("leaf: true\n")
    (outside / "prompts").mkdir(parents=True)
    (outside / "secret.yaml").write_text(f"secret: {OUTSIDE}\n")
    (outside / "prompts" / "x.j2").write_text(OUTSIDE)
    (root / "escape.yaml").symlink_to(outside / "secret.yaml")
    return root, outside


def refused(config, policy, field: str, rule: str) -> str:
    with pytest.raises(TrustError) as caught:
        admit_config(config, policy)
    message = str(caught.value)
    assert caught.value.path == field, message
    assert rule in message, message
    assert OUTSIDE not in message and SECRET not in message
    return message


def test_template_worlds_and_the_default_world_are_admitted_unchanged():
    config = world_config()
    assert admit_config(config, TrustPolicy()) == config
    default = load_config_file(PROJECT_CONFIGS / "worlds" / "default.yaml")
    assert admit_config(default, TrustPolicy()) == default


@pytest.mark.parametrize("field", ["model", "base_url", "prompt", "extra_body.header"])
def test_env_references_only_in_secret_fields(field, monkeypatch):
    monkeypatch.setenv("SERVER_KEY", SECRET)
    node = openai_node()
    head, _, tail = field.partition(".")
    if tail:
        node["config"][head] = {tail: "Bearer ${env:SERVER_KEY}"}
    else:
        node["config"][field] = "${env:SERVER_KEY}"
    policy = TrustPolicy(env=["SERVER_KEY"], urls=["http://127.0.0.1:9/v1"])
    refused(with_author(node), policy, f"stages.author.nodes.llm.config.{field}", "only in secret fields")


def test_env_names_must_be_allowed():
    policy = TrustPolicy(env=["SERVER_KEY"])
    config = with_author(openai_node(api_key="${env:WORLDGEN_API_TOKEN}"))
    message = refused(config, policy, "stages.author.nodes.llm.config.api_key", "WORLDGEN_API_TOKEN")
    assert "allowed: SERVER_KEY" in message
    assert admit_config(with_author(openai_node()), policy)  # the allowed name, the vendor's default URL
    endpoint = world_config()
    endpoint["stages"]["creator"] = {"endpoint": "http://127.0.0.1:9/t2i", "headers_env": "HOME"}
    refused(endpoint, TrustPolicy(urls=["http://127.0.0.1:9"]), "stages.creator.headers_env", "HOME")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/v1",
        "http://127.0.0.1:9/v1",  # another port than the allowed prefix's
        "http://llm.internal:8000/v10",  # a path that only starts with the prefix's characters
        "https://llm.internal:8000/v1",  # another scheme
        "http://evil@llm.internal:8000/v1",
        "http://llm.internal:8000@10.0.0.1/v1",
    ],
)
def test_urls_only_under_allowed_prefixes(url):
    policy = TrustPolicy(env=["SERVER_KEY"], urls=["http://llm.internal:8000/v1"])
    refused(with_author(openai_node(base_url=url)), policy, "stages.author.nodes.llm.config.base_url", "URL")
    assert admit_config(with_author(openai_node(base_url="http://llm.internal:8000/v1/")), policy)
    endpoint = world_config()
    endpoint["stages"]["creator"] = {"endpoint": url}
    refused(endpoint, policy, "stages.creator.endpoint", "not under a prefix")


def test_refs_only_under_roots_inlined_and_never_an_oracle(files):
    root, outside = files
    policy = TrustPolicy(roots=[str(root)], env=["SERVER_KEY"])
    good = with_author(openai_node(extra_body={"ref": "graphs/body.yaml"}))
    admitted = admit_config(good, policy)
    body = admitted["stages"]["author"]["nodes"]["llm"]["config"]["extra_body"]
    assert body == {"temperature": 0.1, "nested": {"leaf": True}}  # nested refs inlined too
    assert "ref" not in json.dumps(admitted)
    field = "stages.author.nodes.llm.config.extra_body"
    for name in (
        str(outside / "secret.yaml"),
        "../outside/secret.yaml",
        "~/x.yaml",
        "graphs/../../outside/x",
    ):
        refused(with_author(openai_node(extra_body={"ref": name})), policy, field, "relative path")
    # A link out of the root and a missing file get the same answer: nothing tells whether a file exists.
    linked = refused(with_author(openai_node(extra_body={"ref": "escape.yaml"})), policy, field, "not found")
    missing = refused(
        with_author(openai_node(extra_body={"ref": "nothere.yaml"})), policy, field, "not found"
    )
    assert linked.replace("escape.yaml", "X") == missing.replace("nothere.yaml", "X")
    no_roots = refused(good, TrustPolicy(env=["SERVER_KEY"]), field, "no roots")
    assert "graphs" not in no_roots.split(":", 1)[0]


def test_prompts_base_and_adapters_only_under_roots(files):
    root, outside = files
    policy = TrustPolicy(roots=[str(root)])
    refused({**world_config(), "base": "graphs"}, policy, "adapters", "names its adapters folder")
    for key in ("prompts", "base", "adapters"):
        config = {**world_config(), "adapters": "graphs", key: str(outside / "prompts")}
        refused(config, policy, key, "relative path")
        refused(
            {**world_config(), "adapters": "graphs", key: "../outside/prompts"}, policy, key, "relative path"
        )
    admitted = admit_config({**world_config(), "prompts": "prompts"}, policy)
    assert admitted["prompts"] == str((root / "prompts").resolve())


def test_file_prompts_from_the_worlds_prompts_or_the_library(files):
    root, _ = files
    policy = TrustPolicy(roots=[str(root)])
    field = "stages.author.nodes.llm.config.template"
    for name in ("file:../outside/prompts/x.j2", "file:/etc/passwd", "file:mine.j2"):
        config = world_config()
        config["stages"]["author"]["nodes"]["llm"]["config"]["template"] = name
        refused(config, policy, field, "file:")
    config["prompts"] = "prompts"  # the world's own prompts, under a root: now file:mine.j2 is found
    assert admit_config(config, policy)["prompts"].endswith("prompts")


def test_model_sources_presets_or_allowed():
    config = world_config()
    config["stages"]["creator"]["params"] = {"model": "/root/.cache/huggingface/some-model"}
    refused(config, TrustPolicy(), "stages.creator.params.model", "model source")
    direct = copy.deepcopy(load_config_file(PROJECT_CONFIGS / "graphs" / "text_to_image_tiny.yaml"))
    direct["nodes"]["unet"]["config"]["model"] = {"source": "org/any-hub-model", "subfolder": "unet"}
    config["stages"]["creator"] = direct
    refused(config, TrustPolicy(), "stages.creator.nodes.unet.config.model", "model source")
    assert admit_config(config, TrustPolicy(models=["org/any-hub-model"]))


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ({"controlnet": {"model": "/srv/any-controlnet"}}, "controlnet.model"),
        ({"controlnet": [{"model": "preset:controlnet-tiny"}, {"model": "org/cn"}]}, "controlnet.1.model"),
        ({"controlnet": {"nets": [{"model": {"source": "org/cn"}}]}}, "controlnet.nets.0.model"),
        ({"ip_adapter": "org/ip-adapter"}, "ip_adapter.model"),
        (
            {"ip_adapter": {"model": "preset:ip-adapter-tiny", "image_encoder": {"source": "/srv/encoder"}}},
            "ip_adapter.image_encoder",
        ),
    ],
)
def test_adapter_models_presets_or_allowed(option, field):
    config = world_config()
    config["stages"]["creator"]["params"] = {"preset": "tiny", **option}
    refused(config, TrustPolicy(), f"stages.creator.params.{field}", "model source")
    allowed = ["/srv/any-controlnet", "org/cn", "org/ip-adapter", "/srv/encoder"]
    assert admit_config(config, TrustPolicy(models=allowed))


def test_the_admitted_config_builds_the_same_world(files, tmp_path):
    root, _ = files
    config = {**world_config(), "prompts": "prompts"}
    config["stages"]["author"]["nodes"]["llm"]["config"]["template"] = "file:mine.j2"
    admitted = admit_config(config, TrustPolicy(roots=[str(root)]))
    world = World.from_config(admitted, tmp_path / "w")
    world.run(2)
    reloaded = World.load(tmp_path / "w")  # the stored config reads no file outside the world
    assert reloaded.history()[0]["state"]["outcome"].startswith("Story so far:")


def test_lora_files_only_under_roots_and_made_absolute(files):
    root, outside = files
    (root / "styles").mkdir()
    (root / "styles" / "ink.safetensors").write_bytes(b"{}")
    (outside / "evil.safetensors").write_bytes(b"{}")
    policy = TrustPolicy(roots=[str(root)])
    config = world_config()
    params = config["stages"]["creator"]["params"]
    params["lora"] = [{"path": "styles/ink.safetensors", "weight": 0.5}]
    admitted = admit_config(config, policy)["stages"]["creator"]["params"]["lora"]
    assert admitted == [{"path": str(root / "styles" / "ink.safetensors"), "weight": 0.5}]
    params["lora"] = str(outside / "evil.safetensors")
    refused(config, policy, "stages.creator.params.lora", "relative path")
    params["lora"] = [{"path": "../outside/evil.safetensors"}]
    refused(config, policy, "stages.creator.params.lora[0].path", "relative path")
    node = {"type": "adapter/lora", "config": {"path": "styles/missing.safetensors"}}
    config["stages"]["author"]["nodes"]["style"] = node
    params["lora"] = "styles/ink.safetensors"
    refused(config, policy, "stages.author.nodes.style.config.path", "not found under")
