"""Graph engine: wiring, validation, loops and feedback edges, execution semantics, callbacks, plan caching."""

from __future__ import annotations

import copy

import pytest
import torch

import tests.toy_blocks  # noqa: F401 - registers the toy blocks
import worldgen as wg
from worldgen.execution import RunCallback


def line_graph() -> wg.Graph:
    g = wg.Graph("line")
    g.add_node("toy/scale", id="double", config={"factor": 2})
    g.add_node("toy/add", id="plus", auto_connect=False)
    g.add_edge("double.y", "plus.a")
    g.expose_input("x", "double.x")
    g.expose_input("offset", "plus.b", default=1.0)
    g.expose_output("y", "plus.y")
    return g


def loop_graph(steps: int = 3) -> wg.Graph:
    """x -> [ctl -> half -> ctl] : halves x once per iteration; ctl.x is fed from outside at iteration 0."""
    g = wg.Graph("loop")
    g.add_node("toy/countdown", id="ctl", config={"steps": steps})
    g.add_node("toy/scale", id="half", config={"factor": 0.5})
    g.add_edge("ctl.x", "half.x")
    g.add_edge("half.y", "ctl.x")  # closes the loop: a feedback edge, since ctl.x also has an outside source
    g.expose_input("x", "ctl.x")
    g.expose_output("y", "half.y")
    return g


def test_run_line_graph_with_defaults_and_overrides():
    g = line_graph()
    assert g.validate() == []
    assert g.run({"x": 3.0}) == {"y": 7.0}
    assert g.run({"x": 3.0, "offset": 10.0}) == {"y": 16.0}
    assert g.input_spec() == {
        "x": {"kind": "scalar"},
        "offset": {"kind": "scalar", "optional": True, "default": 1.0},
    }
    assert g.output_spec() == {"y": {"kind": "scalar"}}


def test_loop_runs_n_iterations_with_feedback():
    g = loop_graph(steps=3)
    (loop,) = g.loops()
    assert loop.order == ["ctl", "half"]
    assert [str(e) for e in loop.feedback] == ["half.y -> ctl.x"]
    assert g.run({"x": 8.0}) == {"y": 1.0}  # 8 / 2 / 2 / 2
    assert g.run({"x": 8.0}, iterations=1) == {"y": 4.0}


def test_loop_without_iteration_count_is_an_error():
    g = wg.Graph("loop")
    g.add_node("toy/add", id="acc")
    g.add_edge("acc.y", "acc.b")  # self-loop: a feedback edge
    g.expose_input("a", "acc.a")
    g.expose_output("y", "acc.y")
    assert g.run({"a": 1.0}, iterations=4) == {"y": 4.0}  # b: default 0 at iteration 0, then fed back
    with pytest.raises(wg.GraphError, match="needs an iteration count"):
        g.run({"a": 1.0})


def test_cycle_without_feedback_edge_is_reported():
    g = wg.Graph("bad")
    g.add_node("toy/scale", id="a")
    g.add_node("toy/scale", id="b")
    g.add_edge("a.y", "b.x")
    g.add_edge("b.y", "a.x")
    problems = g.validate()
    assert any("loop a, b" in str(p) and "no feedback edge" in str(p) for p in problems)
    with pytest.raises(wg.GraphError, match="no feedback edge"):
        g.validate(strict=True)
    # Declaring the closing edge as feedback (with an initial value from outside) makes it runnable.
    g.remove_edge("b.y", "a.x")
    g.add_edge("b.y", "a.x", feedback=True)
    g.add_node("toy/scale", id="src", config={"factor": 1}, auto_connect=False)
    g.add_edge("src.y", "a.x")
    g.expose_input("x", "src.x")
    g.expose_output("y", "b.y")
    assert g.validate() == []
    assert g.run({"x": 1.0}, iterations=2) == {"y": 16.0}


def test_misspelt_port_and_unknown_node_say_what_and_suggest():
    g = line_graph()
    with pytest.raises(wg.GraphError, match=r"node 'plus' has no input port 'bb' \(did you mean 'b'\?\)"):
        g.add_edge("double.y", "plus.bb")
    with pytest.raises(wg.GraphError, match=r"no node 'dubble' \(did you mean 'double'\?\)"):
        g.add_edge("dubble.y", "plus.b")
    with pytest.raises(wg.GraphError, match="expected '<node>.<port>'"):
        g.add_edge("double", "plus.b")


def test_kind_mismatch_is_an_error():
    g = wg.Graph("kinds")
    g.add_node("toy/text", id="t")
    g.add_node("toy/scale", id="s", auto_connect=False)
    with pytest.raises(
        wg.GraphError, match="kind mismatch on edge t.text -> s.x: output is 'text', input expects 'scalar'"
    ):
        g.add_edge("t.text", "s.x")


def test_missing_required_input_and_ambiguous_fan_in_are_reported():
    g = wg.Graph("g")
    g.add_node("toy/scale", id="a")
    g.add_node("toy/scale", id="b", auto_connect=False)
    g.add_node("toy/add", id="plus", auto_connect=False)
    g.add_edge("a.y", "plus.a")
    g.add_edge("b.y", "plus.a")
    problems = {p.where: p.message for p in g.validate()}
    assert "required input has no source" in problems["a.x"]
    assert "required input has no source" in problems["b.x"]
    assert "2 sources feed this input but it has no aggregation policy" in problems["plus.a"]


def test_aggregating_input_takes_several_edges():
    g = wg.Graph("agg")
    for name, factor in [("a", 1), ("b", 10)]:
        g.add_node("toy/scale", id=name, config={"factor": factor})
        g.expose_input(name, f"{name}.x")
    g.add_node("toy/sum", id="sum")
    g.add_edge("a.y", "sum.values")
    g.add_edge("b.y", "sum.values")
    g.expose_output("y", "sum.y")
    assert g.validate() == []
    assert g.run({"a": 1.0, "b": 2.0}) == {"y": 21.0}


def test_run_input_errors_name_the_input():
    g = line_graph()
    with pytest.raises(wg.GraphError, match=r"no input 'xx' \(did you mean 'x'\?\)"):
        g.run({"xx": 1.0})
    with pytest.raises(wg.GraphError, match=r"needs input 'x' \(scalar\)"):
        g.run({})


def test_node_failure_names_the_node():
    g = line_graph()
    with pytest.raises(wg.ExecutionError, match="node 'double'.*TypeError"):
        g.run({"x": "not a number"})


def test_role_rules_auto_connect_and_refuse_to_guess():
    g = wg.Graph("t2i")
    ref = {"model": "preset:tiny"}
    g.add_node("tokenizer/clip", id="tok", config=ref)
    g.add_node("conditioner/clip_text", id="te", config=ref)
    g.add_node("backbone/unet2d", id="unet", config=ref)
    g.add_node("guidance/cfg", id="cfg")
    g.add_node("solver/ddim", id="solver")
    assert {str(e) for e in g.edges} == {
        "tok.token_ids -> te.token_ids",
        "te.embedding -> unet.condition",
        "unet.pred -> cfg.pred_cond",
        "unet.pred_uncond -> cfg.pred_uncond",
        "cfg.pred -> solver.pred",
        "solver.model_input -> unet.sample",
        "solver.timestep -> unet.timestep",
    }
    g.add_node("conditioner/clip_text", id="te2", config=ref, auto_connect=False)
    with pytest.raises(wg.GraphError, match=r"ambiguous for unet2.condition: nodes \['te', 'te2'\]"):
        g.add_node("backbone/unet2d", id="unet2", config=ref)
    assert "unet2" not in g.node_ids  # a refused node is not half-added


def test_plan_is_cached_and_invalidated_by_edits():
    g = line_graph()
    plan = g.plan()
    assert g.plan() is plan
    g.add_node("toy/scale", id="extra", auto_connect=False)
    assert g.plan() is not plan


class Recorder(RunCallback):
    def __init__(self):
        self.nodes, self.iterations = [], []

    def on_node_end(self, node_id, iteration, outputs):
        self.nodes.append((node_id, iteration))

    def on_loop_iteration(self, loop, iteration, iterations):
        self.iterations.append((iteration, iterations))


def test_callbacks_see_every_node_call_and_iteration():
    rec = Recorder()
    loop_graph(steps=2).run({"x": 4.0}, callbacks=[rec])
    assert rec.nodes == [("ctl", 0), ("half", 0), ("ctl", 1), ("half", 1)]
    assert rec.iterations == [(0, 2), (1, 2)]


def test_progress_bar_is_off_in_library_calls(capsys):
    loop_graph().run({"x": 1.0})
    assert capsys.readouterr().err == ""
    loop_graph().run({"x": 1.0}, progress=True)
    assert "loop" in capsys.readouterr().err


def test_shared_block_in_two_nodes():
    g = wg.Graph("shared")
    block = wg.create_block("toy/scale", {"factor": 3})
    g.add_node(block, id="a")
    g.add_node(block, id="b", auto_connect=False)
    g.add_edge("a.y", "b.x")
    g.expose_input("x", "a.x")
    g.expose_output("y", "b.y")
    assert g.run({"x": 1.0}) == {"y": 9.0}
    assert g.to_config()["nodes"]["b"] == {"block": "a"}
    again = wg.Graph.from_config(g.to_config())
    assert again.block("a") is again.block("b")


def test_diffusion_graph_does_not_mutate_inputs_and_is_seeded():
    g = wg.Graph.from_template("image_to_image", preset="tiny", steps=2)
    image = torch.rand(1, 3, 32, 32)
    inputs = {"prompt": "a red house", "image": image}
    snapshot = copy.deepcopy(inputs)
    first = g.run(inputs, seed=1)["image"]
    assert inputs.keys() == snapshot.keys() and torch.equal(inputs["image"], snapshot["image"])
    assert torch.equal(first, g.run(inputs, seed=1)["image"])
    assert not torch.equal(first, g.run(inputs, seed=2)["image"])


def test_building_and_validating_a_template_loads_no_weights():
    from worldgen.models.pool import default_pool

    loads_before = default_pool().loads
    g = wg.Graph.from_template("text_to_image", preset="tiny")
    assert g.validate() == []
    assert not any(getattr(b, "model_loaded", False) for _, b in g.blocks())
    assert default_pool().loads == loads_before


def test_replace_block_keeps_the_wiring_and_refuses_other_ports():
    g = line_graph()
    plan = g.plan()
    g.replace_block("double", wg.create_block("toy/scale", {"factor": 3}))
    assert g.plan() is plan  # same ports, same wiring: nothing to plan again
    assert g.run({"x": 3.0}) == {"y": 10.0}  # 3 * 3 + 1: the new block ran
    with pytest.raises(
        wg.GraphError, match=r"node 'plus': toy/scale cannot replace toy/add, its input ports"
    ):
        g.replace_block("plus", wg.create_block("toy/scale"))
    with pytest.raises(wg.GraphError, match="has no node 'doubel'"):
        g.replace_block("doubel", wg.create_block("toy/scale"))


def test_make_plan_infers_feedback_edges_apart_from_any_engine():
    from worldgen.plan import Edge, make_plan

    edges = [Edge("ctl", "x", "half", "x"), Edge("half", "y", "ctl", "x")]
    plan, problems = make_plan(["src", "ctl", "half"], edges, {"x": [("ctl", "x")]})
    assert problems == []
    (loop,) = plan.loops
    assert loop.order == ["ctl", "half"] and loop.feedback == {edges[1]}  # ctl.x is also fed from outside
    _, problems = make_plan(["ctl", "half"], edges, {}, allow_cycles=False, level="pipeline")
    assert [p.where for p in problems] == ["cycle ctl -> half -> ctl"]
    _, problems = make_plan(["ctl", "half"], edges, {})  # nothing enters the loop: no feedback edge
    assert "no feedback edge" in problems[0].message


def test_an_exposed_input_can_feed_a_node_added_later():
    # As a template attachment does: a node added to a built graph takes a value the graph already exposes.
    g = line_graph()
    g.add_node("toy/scale", id="triple", config={"factor": 3}, auto_connect=False)
    g.feed_from_input("x", "triple.x")
    g.expose_output("z", "triple.y")
    assert g.run({"x": 2.0}) == {"y": 5.0, "z": 6.0}
    assert g.exposed_inputs["x"].targets == [("double", "x"), ("triple", "x")]
    with pytest.raises(wg.GraphError, match=r"exposes no input 'xx' \(did you mean 'x'\?\)"):
        g.feed_from_input("xx", "triple.x")
    with pytest.raises(wg.GraphError, match="has no input port 'w'"):
        g.feed_from_input("x", "triple.w")
