"""Pipelines: graphs of graphs wired by exposed ports, DAG-only, config and checkpoint aggregated."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tests.toy_blocks  # noqa: F401 - registers the toy blocks
import worldgen as wg
from tests.conftest import PROMPT
from worldgen.config import dump_config


def scale_graph(name: str, factor: float) -> wg.Graph:
    g = wg.Graph(name)
    g.add_node("toy/scale", id="s", config={"factor": factor})
    g.expose_input("x", "s.x")
    g.expose_output("y", "s.y")
    return g


def text_graph() -> wg.Graph:
    g = wg.Graph("shout")
    g.add_node("toy/text", id="t")
    g.expose_input("text", "t.text")
    g.expose_output("text", "t.text")
    return g


def chain() -> wg.Pipeline:
    p = wg.Pipeline("chain")
    p.add_graph(scale_graph("double", 2), id="a")
    p.add_graph(scale_graph("triple", 3), id="b")
    p.connect("a.y", "b.x")
    p.expose_input("x", "a.x")
    p.expose_output("y", "b.y")
    return p


def test_pipeline_runs_graphs_in_order():
    p = chain()
    assert p.validate() == []
    assert p.run({"x": 1.0}) == {"y": 6.0}
    assert p.input_spec() == {"x": {"kind": "scalar"}}


def test_cycle_is_an_error_that_names_it():
    q = wg.Pipeline("loop")
    q.add_graph(scale_graph("one", 1), id="a")
    q.add_graph(scale_graph("two", 2), id="b")
    q.connect("a.y", "b.x")
    q.connect("b.y", "a.x")
    problems = q.validate()
    assert any("cycle a -> b -> a" in str(pr) and "must be acyclic" in str(pr) for pr in problems)
    with pytest.raises(wg.GraphError, match="must be acyclic"):
        q.run({})


def test_connect_checks_both_specs():
    p = wg.Pipeline("p")
    p.add_graph(scale_graph("num", 2), id="num")
    p.add_graph(text_graph(), id="txt")
    with pytest.raises(
        wg.GraphError,
        match="kind mismatch on edge num.y -> txt.text: output is 'scalar', input expects 'text'",
    ):
        p.connect("num.y", "txt.text")
    with pytest.raises(wg.GraphError, match=r"node 'txt' has no input port 'txet' \(did you mean 'text'\?\)"):
        p.connect("txt.text", "txt.txet")


def test_add_graph_from_config_path_and_saved_dir(tmp_path):
    path = dump_config(scale_graph("double", 2).to_config(), tmp_path / "double.yaml")
    scale_graph("triple", 3).save(tmp_path / "triple")
    p = wg.Pipeline("p")
    p.add_graph(str(path), id="a")
    p.add_graph(f"ref:{tmp_path / 'triple'}", id="b")
    p.add_graph(scale_graph("half", 0.5).to_config(), id="c")
    p.connect("a.y", "b.x")
    p.connect("b.y", "c.x")
    p.expose_input("x", "a.x")
    p.expose_output("y", "c.y")
    assert p.run({"x": 2.0}) == {"y": 6.0}


def test_pipeline_config_round_trip_with_ref_includes(tmp_path):
    dump_config(scale_graph("double", 2).to_config(), tmp_path / "double.yaml")
    config = chain().to_config()
    config["graphs"]["a"] = {"ref": "double.yaml"}
    path = dump_config(config, tmp_path / "pipeline.yaml")
    p = wg.Pipeline.from_config(path)
    assert p.run({"x": 1.0}) == {"y": 6.0}
    assert wg.Pipeline.from_config(p.to_config()).to_config() == p.to_config()


def test_bad_graph_inside_pipeline_config_names_the_path(tmp_path):
    config = chain().to_config()
    config["graphs"]["b"]["nodes"]["s"]["type"] = "toy/scael"
    path = dump_config(config, tmp_path / "pipeline.yaml")
    with pytest.raises(wg.ConfigError, match=r"at graphs.b.nodes.s.type: unknown block type 'toy/scael'"):
        wg.Pipeline.from_config(path)


def test_generate_and_refine_equals_its_graphs_run_in_turn():
    p = wg.Pipeline.from_template("generate_and_refine", preset="tiny", steps=2, strength=0.6)
    out = p.run({"prompt": PROMPT}, seed=3)
    draft = wg.Graph.from_template("text_to_image", preset="tiny", steps=2).run({"prompt": PROMPT}, seed=3)[
        "image"
    ]
    refine = wg.Graph.from_template("image_to_image", preset="tiny", steps=2, strength=0.6)
    assert torch.equal(out["draft"], draft)
    assert torch.equal(out["image"], refine.run({"prompt": PROMPT, "image": draft}, seed=3)["image"])
    # one checkpoint: the graphs share one text encoder, UNet and VAE in memory
    for node in ["te", "unet", "vae"]:
        assert p.graph("generate").block(node).model is p.graph("refine").block(node).model


def test_pipeline_checkpoint_stores_a_shared_model_once(tmp_path):
    p = wg.Pipeline.from_template("generate_and_refine", preset="tiny", steps=2)
    expected = p.run({"prompt": PROMPT}, seed=0)["image"]
    p.save(tmp_path / "p")
    with safe_open(str(tmp_path / "p" / "checkpoint.safetensors"), framework="pt") as fh:
        owners = {".".join(k.split(".")[:2]) for k in fh.keys()}  # noqa: SIM118
        aliases = json.loads(fh.metadata()["aliases"])
    assert owners == {"generate.te", "generate.unet", "generate.vae"}
    assert aliases["refine.unet"] == "generate.unet" and aliases["refine.vae_enc"] == "generate.vae"
    loaded = wg.Pipeline.load(tmp_path / "p")
    assert loaded.graph("refine").block("unet").model is loaded.graph("generate").block("unet").model
    assert torch.equal(loaded.run({"prompt": PROMPT}, seed=0)["image"], expected)


def test_executor_is_chosen_per_config(ray_session):
    import os

    where = wg.Graph("where")
    where.add_node("toy/where_task", id="w")  # reports the process it ran in
    where.expose_input("x", "w.x")
    where.expose_output("pid", "w.pid")
    p = chain()
    p.add_graph(where, id="where")
    p.connect("b.y", "where.x")
    p.expose_output("pid", "where.pid")
    config = p.to_config()
    on_ray = wg.Pipeline.from_config(config | {"executor": "ray"})
    assert on_ray.executor == "ray"
    out = on_ray.run({"x": 1.0})  # no executor argument: the config's is used
    assert out["y"] == 6.0 and out["pid"] != os.getpid()  # a Ray worker ran the node
    assert wg.Pipeline.from_config(config).run({"x": 1.0}) == {"y": 6.0, "pid": os.getpid()}
    with pytest.raises(wg.ConfigError, match=r"at executor: unknown executor 'rey' \(did you mean 'ray'\?\)"):
        wg.Pipeline.from_config(chain().to_config() | {"executor": "rey"})
