"""Config and checkpoint round trips, and bad input that names the file, the YAML path and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import tests.toy_blocks  # noqa: F401 - registers the toy blocks
import worldgen as wg
from worldgen.config import dump_config, load_config_file, resolve_env

CONFIGS = Path(__file__).parents[2] / "configs" / "graphs"


def toy_config() -> dict:
    return {
        "schema_version": 1,
        "kind": "graph",
        "name": "toy",
        "nodes": {
            "double": {"type": "toy/scale", "config": {"factor": 2.0}},
            "plus": {"type": "toy/add"},
        },
        "edges": ["double.y -> plus.a"],
        "inputs": {"x": "double.x", "offset": {"to": "plus.b", "default": 1.0}},
        "outputs": {"y": "plus.y"},
    }


def write_yaml(tmp_path, data, name="graph.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", solver="euler", steps=3)
    path = dump_config(graph.to_config(), tmp_path / f"t2i{suffix}")
    again = wg.Graph.from_config(path)
    assert again.to_config() == graph.to_config()
    assert again.block("tok") is again.block("tok_neg")  # sharing survives the round trip
    a = graph.run({"prompt": "a cat"}, seed=0)["image"]
    b = again.run({"prompt": "a cat"}, seed=0)["image"]
    assert torch.equal(a, b)


def test_checkpoint_keys_are_prefixed_by_node_and_shared_models_stored_once(tmp_path):
    graph = wg.Graph.from_template("image_to_image", preset="tiny", steps=2)
    graph.save(tmp_path / "g")
    with safe_open(str(tmp_path / "g" / "checkpoint.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        aliases = json.loads(fh.metadata()["aliases"])
    assert {k.split(".")[0] for k in keys} == {"te", "unet", "vae_enc"}
    assert aliases == {"te_neg": "te", "vae": "vae_enc"}  # shared block, and same model reference
    unet_params = sum(1 for _ in graph.block("unet").model.state_dict())
    assert sum(k.startswith("unet.") for k in keys) == unet_params
    # Loaded again, the decoder and the encoder are one model in memory, with the saved weights.
    loaded = wg.Graph.load(tmp_path / "g")
    assert loaded.block("vae").model is loaded.block("vae_enc").model
    for (name, p), (_, q) in zip(
        graph.block("unet").model.state_dict().items(),
        loaded.block("unet").model.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(p, q), name


def test_saved_graph_loads_trained_weights_not_the_source(tmp_path):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
    before = graph.run({"prompt": "a cat"}, seed=0)["image"]
    graph.save(tmp_path / "g")
    # Pretend training changed the saved weights: the loaded graph must use them, not the preset's.
    loaded = wg.Graph.load(tmp_path / "g")
    with torch.no_grad():
        for p in loaded.block("unet").model.parameters():
            p.add_(0.05)
    loaded.save(tmp_path / "g2")
    changed = wg.Graph.load(tmp_path / "g2").run({"prompt": "a cat"}, seed=0)["image"]
    assert not torch.allclose(before, changed)


def test_unknown_block_type_names_yaml_path_and_suggests(tmp_path):
    data = toy_config()
    data["nodes"]["double"]["type"] = "toy/scal"
    path = write_yaml(tmp_path, data)
    with pytest.raises(wg.ConfigError) as err:
        wg.Graph.from_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "at nodes.double.type" in message
    assert "unknown block type 'toy/scal' (did you mean 'toy/scale'?)" in message


def test_misspelt_port_in_edges_names_the_edge(tmp_path):
    data = toy_config()
    data["edges"] = ["double.y -> plus.aa"]
    path = write_yaml(tmp_path, data)
    with pytest.raises(
        wg.ConfigError, match=r"at edges\[0\]: node 'plus' has no input port 'aa' \(did you mean 'a'\?\)"
    ):
        wg.Graph.from_config(path)


def test_kind_mismatch_in_config_names_the_edge(tmp_path):
    data = toy_config()
    data["nodes"]["shout"] = {"type": "toy/text"}
    data["edges"].append("shout.text -> plus.b")
    path = write_yaml(tmp_path, data)
    with pytest.raises(
        wg.ConfigError, match=r"at edges\[1\]: kind mismatch .*output is 'text', input expects 'scalar'"
    ):
        wg.Graph.from_config(path)


def test_bad_block_config_names_the_field(tmp_path):
    data = toy_config()
    data["nodes"]["double"]["config"] = {"factr": 2.0}
    path = write_yaml(tmp_path, data)
    with pytest.raises(
        wg.ConfigError, match=r"at nodes.double.config: config.factr: Extra inputs are not permitted"
    ):
        wg.Graph.from_config(path)
    data["nodes"]["double"]["config"] = {"factor": "big"}
    with pytest.raises(wg.ConfigError, match=r"config.factor: Input should be a valid number.*'big'"):
        wg.Graph.from_config(write_yaml(tmp_path, data))


def test_missing_required_input_is_a_validation_problem(tmp_path):
    data = toy_config()
    del data["inputs"]["x"]
    graph = wg.Graph.from_config(write_yaml(tmp_path, data))
    (problem,) = graph.validate()
    assert problem.where == "double.x"
    assert "required input has no source" in problem.message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: toy\nnodes:\n  double: {type: toy/scale\nedges: []\n")
    with pytest.raises(wg.ConfigError) as err:
        wg.Graph.from_config(path)
    assert str(path) in str(err.value)
    assert "malformed YAML" in str(err.value)
    assert "line 4" in str(err.value)


def test_schema_version_and_kind_are_checked(tmp_path):
    data = toy_config() | {"schema_version": 99}
    with pytest.raises(wg.ConfigError, match="schema_version 99 is newer"):
        wg.Graph.from_config(write_yaml(tmp_path, data))
    data = toy_config() | {"kind": "world"}
    with pytest.raises(wg.ConfigError, match="at kind: expected a graph config, found kind 'world'"):
        wg.Graph.from_config(write_yaml(tmp_path, data))
    data = toy_config() | {"edgez": []}
    with pytest.raises(wg.ConfigError, match=r"at edgez: unknown key"):
        wg.Graph.from_config(write_yaml(tmp_path, data))


def test_ref_includes_and_env_substitution(tmp_path, monkeypatch):
    write_yaml(tmp_path, {"type": "toy/scale", "config": {"factor": 5.0}}, name="scale.yaml")
    data = toy_config()
    data["nodes"]["double"] = {"ref": "scale.yaml"}
    graph = wg.Graph.from_config(write_yaml(tmp_path, data))
    assert graph.run({"x": 1.0}) == {"y": 6.0}
    data["nodes"]["double"] = {"ref": "missing.yaml"}
    with pytest.raises(wg.ConfigError, match="at nodes.double: ref: file 'missing.yaml' does not exist"):
        load_config_file(write_yaml(tmp_path, data))
    monkeypatch.setenv("WG_TEST_KEY", "s3cret")
    assert resolve_env({"api": {"key": "${env:WG_TEST_KEY}"}}) == {"api": {"key": "s3cret"}}
    with pytest.raises(wg.ConfigError, match=r"at api.key: environment variable WG_MISSING_KEY is not set"):
        resolve_env({"api": {"key": "${env:WG_MISSING_KEY}"}})


def test_unknown_template_and_parameter():
    with pytest.raises(
        wg.ConfigError, match=r"unknown template 'text_to_imag' \(did you mean 'text_to_image'\?\)"
    ):
        wg.Graph.from_template("text_to_imag", preset="tiny")
    with pytest.raises(wg.ConfigError, match=r"no parameter 'stepz' \(did you mean 'steps'\?\)"):
        wg.Graph.from_template("text_to_image", preset="tiny", stepz=3)
    with pytest.raises(wg.ConfigError, match=r"unknown solver 'eulr' \(did you mean 'euler'\?\)"):
        wg.Graph.from_template("text_to_image", preset="tiny", solver="eulr")


def test_bad_model_source_fails_with_a_clear_error(tmp_path):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
    graph.remove_node("unet")
    graph.add_node(
        "backbone/unet2d", id="unet", config={"model": str(tmp_path / "nowhere")}, auto_connect=False
    )
    with pytest.raises(wg.ModelLoadError, match="nowhere"):
        _ = graph.block("unet").model


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_graph_configs_are_valid(path):
    graph = wg.Graph.from_config(path)
    assert graph.validate() == []
    assert not any(getattr(b, "model_loaded", False) for _, b in graph.blocks())


@pytest.mark.parametrize("path", sorted((CONFIGS.parent / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_configs_are_valid(path):
    pipeline = wg.Pipeline.from_config(path)
    assert pipeline.validate() == []
    assert not any(getattr(b, "model_loaded", False) for _, b in pipeline.named_blocks())
