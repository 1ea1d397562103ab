"""A denoising loop with two weight-holding models on Ray (actors/ray_executor.py): the controlled graph's loop
runs on the UNet's host, which calls the ControlNet's host each step, so each model loads once cluster-wide (one
ControlNet host for every graph that names it) and the image is the local executor's."""

from __future__ import annotations

import torch

import worldgen as wg
from actors.model_host import host_name, list_hosts
from tests.conftest import PROMPT

TOL, STEPS = 1e-5, 2


def test_controlled_graphs_on_ray_share_one_controlnet_host_and_equal_local(clean_hosts):
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    spec = {"model": "preset:controlnet-tiny"}
    first = wg.Graph.from_template("controlled", preset="tiny", steps=STEPS, controlnet=spec)
    second = wg.Graph.from_template(
        "controlled", preset="tiny", steps=STEPS, controlnet={**spec, "scale": 0.5, "end": 0.5}
    )
    inputs = {"prompt": PROMPT, "control_image": control}
    for graph in (first, second):
        local = graph.run(inputs, seed=3)["image"]
        remote = graph.run(inputs, seed=3, executor="ray")["image"]
        assert (local - remote).abs().max().item() <= TOL
    hosts = {h["name"]: h for h in list_hosts()}
    controlnet = hosts[host_name(first.block("controlnet"))]
    unet = hosts[host_name(first.block("unet"))]
    assert host_name(second.block("controlnet")) == controlnet["name"]
    assert sum(h["class"].endswith("ControlNetModel") for h in hosts.values()) == 1
    assert (
        controlnet["loads"] == 1 and controlnet["calls"] == 2 * STEPS
    )  # called from the fused loop, per step
    assert unet["calls"] == 2  # one fused loop per graph: the loop ran on the UNet's host
    assert all(h["loads"] == 1 for h in hosts.values())
