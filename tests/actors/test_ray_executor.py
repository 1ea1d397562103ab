"""The Ray executor (actors/ray_executor.py): same results as the local executor, loop fusion, failures
naming the node, deadlines, and proof that Ray (not this process) ran the nodes."""

from __future__ import annotations

import time

import pytest
import torch

import worldgen as wg
from actors.model_host import host_name, list_hosts
from tests.conftest import PROMPT
from worldgen.models.pool import default_pool

TOL = 1e-5  # CPU thread counts differ between processes
STEPS = 3


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_graphs_on_ray_equal_local(clean_hosts, init_image, fuse):
    t2i = wg.Graph.from_template("text_to_image", preset="tiny", solver="euler_ancestral", steps=STEPS)
    i2i = wg.Graph.from_template(
        "image_to_image", preset="tiny", solver="dpmpp_2m", steps=STEPS, strength=0.6
    )
    for graph, inputs in [(t2i, {"prompt": PROMPT}), (i2i, {"prompt": PROMPT, "image": init_image})]:
        local = graph.run(inputs, seed=5)["image"]
        remote = graph.run(inputs, seed=5, executor="ray", fuse_loops=fuse)["image"]
        assert close(local, remote)
    # Both graphs share one UNet host: fused, one call per denoising loop; unfused, one call per step.
    unet = next(h for h in list_hosts() if h["name"] == host_name(t2i.block("unet")))
    assert unet["calls"] == 2 if fuse else unet["calls"] > 2


def test_pipeline_on_ray_equals_local_and_hosts_each_model_once(clean_hosts):
    pipeline = wg.Pipeline.from_template("generate_and_refine", preset="tiny", steps=STEPS, strength=0.6)
    local = pipeline.run({"prompt": PROMPT}, seed=1)
    loads_before = default_pool().loads
    remote = pipeline.run({"prompt": PROMPT}, seed=1, executor="ray")
    assert close(local["draft"], remote["draft"]) and close(local["image"], remote["image"])
    assert (
        default_pool().loads == loads_before
    )  # models live on their hosts (tokenizers, inline, were loaded)

    hosts = list_hosts()
    # text encoder, UNet, VAE: one host each, although two graphs (and two VAE modes) use them; the tokenizer
    # runs where the run is driven (inline: cheaper than an actor round trip)
    assert sorted(h["class"].split(":")[1] for h in hosts) == [
        "AutoencoderKL",
        "CLIPTextModel",
        "UNet2DConditionModel",
    ]
    assert all(h["loads"] == 1 for h in hosts)
    unet = next(h for h in hosts if h["class"].endswith("UNet2DConditionModel"))
    assert unet["calls"] == 2  # fused: one call per denoising loop, not one per step


def test_node_failure_on_ray_names_the_node(clean_hosts):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
    with pytest.raises(wg.WorldgenError, match="multiples of 2"):
        graph.run({"prompt": PROMPT, "height": 33}, seed=0, executor="ray")


def test_light_graph_with_aggregation_and_config_executor(clean_hosts):
    import os

    import tests.toy_blocks  # noqa: F401 - registers the toy blocks

    config = {
        "name": "agg",
        "executor": "ray",
        "nodes": {
            "a": {"type": "toy/scale", "config": {"factor": 1}},
            "b": {"type": "toy/scale", "config": {"factor": 10}},
            "sum": {"type": "toy/sum_where"},
        },
        "edges": ["a.y -> sum.values", "b.y -> sum.values"],
        "inputs": {"a": "a.x", "b": "b.x"},
        "outputs": {"y": "sum.y", "pid": "sum.pid"},
    }
    graph = wg.Graph.from_config(config)
    on_ray = graph.run({"a": 1.0, "b": 2.0})  # on Ray: the config says so
    assert on_ray["y"] == 21.0 and on_ray["pid"] != os.getpid()  # the sum ran as a task in a Ray worker
    assert graph.run({"a": 1.0, "b": 2.0}, executor="local") == {"y": 21.0, "pid": os.getpid()}


def test_inline_blocks_run_in_the_driving_process(clean_hosts):
    import os

    import tests.toy_blocks  # noqa: F401 - registers the toy blocks

    graph = wg.Graph("where")
    graph.add_node("toy/where_inline", id="here")
    graph.add_node("toy/where_task", id="there")
    graph.add_edge("here.pid", "there.x")  # an inline output feeds a task
    graph.expose_output("here", "here.pid")
    graph.expose_output("there", "there.pid")
    out = graph.run({}, executor="ray")
    assert out["here"] == os.getpid() and out["there"] != os.getpid()


def test_a_port_gathering_an_inline_value_and_a_task_result(clean_hosts):
    """One aggregating port fed by an inline block (a plain value) and a task (an ObjectRef)."""
    import tests.toy_blocks  # noqa: F401 - registers the toy blocks

    graph = wg.Graph("gather")
    graph.add_node("toy/scale_inline", id="here", config={"factor": 2.0})
    graph.add_node("toy/scale", id="there", config={"factor": 3.0})
    graph.add_node("toy/sum", id="sum")
    graph.add_edge("here.y", "sum.values")
    graph.add_edge("there.y", "sum.values")
    graph.expose_input("x", ["here.x", "there.x"])
    graph.expose_output("y", "sum.y")
    assert graph.run({"x": 1.0}, executor="ray")["y"] == 5.0


# ---- limits (issue 10): a deadline every executor honours; a placement no node can satisfy ----------------
def slow_loop(steps: int, seconds: float) -> wg.Graph:
    """x -> [ctl -> slow -> ctl]: `steps` iterations of `seconds` each."""
    import tests.toy_blocks  # noqa: F401 - registers the toy blocks

    g = wg.Graph("slow_loop")
    g.add_node("toy/countdown", id="ctl", config={"steps": steps})
    g.add_node("toy/slow", id="slow", config={"seconds": seconds})
    g.add_edge("ctl.x", "slow.x")
    g.add_edge("slow.x", "ctl.x")
    g.expose_input("x", "ctl.x")
    g.expose_output("y", "slow.x")
    return g


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_run_stops_at_its_deadline_on_either_executor(clean_hosts, executor):
    from worldgen.limits import DeadlineExceeded, time_limit, within

    graph = slow_loop(steps=40, seconds=0.1)  # 4 s of work
    assert graph.run({"x": 1.0}, executor=executor, iterations=2) == {"y": 1.0}
    started = time.perf_counter()
    with (
        pytest.raises(
            DeadlineExceeded, match=r"the run ran past its time limit of 1 s \(limit 'stage_seconds'\)"
        ),
        within(time_limit(1.0, "the run")),
    ):
        graph.run({"x": 1.0}, executor=executor)
    elapsed = time.perf_counter() - started
    assert 1.0 <= elapsed < 3.0, elapsed  # the deadline (and, on Ray, a 1 s grace), not the 4 s of work
    assert graph.run({"x": 2.0}, executor=executor, iterations=2) == {"y": 2.0}  # nothing is left stuck


def test_a_fused_loop_on_its_model_host_stops_at_the_callers_deadline(clean_hosts):
    import ray

    from worldgen.limits import DeadlineExceeded, time_limit, within

    inputs = {"prompt": PROMPT, "height": 128, "width": 128}
    wg.Graph.from_template("text_to_image", preset="tiny", steps=2).run(
        inputs, seed=0, executor="ray"
    )  # warm
    long = wg.Graph.from_template("text_to_image", preset="tiny", steps=900)  # same hosts; minutes of work
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="limit 'stage_seconds'"), within(time_limit(1.0, "the run")):
        long.run(inputs, seed=0, executor="ray")
    assert time.perf_counter() - started < 10
    # A running call on a host cannot be cancelled from outside: the host answering now (its single thread
    # free, 2 calls in all) shows the loop stopped itself at the deadline. (When it stops within the caller's
    # grace, the error names the loop iteration; under load the caller's own timeout may speak first.)
    unet_host = ray.get_actor(host_name(long.block("unet")), namespace="worldgen")
    assert ray.get(unet_host.info.remote(), timeout=10)["calls"] == 2
