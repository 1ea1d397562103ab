"""What a model host asks Ray for (actors/placement.py), as a pure function of the placement, the model's bytes
and the nodes as `ray.nodes()` lists them: small models share a GPU, a large one gets a whole one, explicit
settings win, and `mode: gpu` on a cluster without GPUs is a clear error."""

from __future__ import annotations

import logging

import pytest

from actors.placement import (
    GPU_MEMORY_ENV,
    InfeasiblePlacement,
    gpu_memory_from_env,
    host_resources,
)
from worldgen.errors import ConfigError
from worldgen.model_ref import Placement

GiB = 2**30
HEAD = {"Alive": True, "Resources": {"CPU": 0.0, "memory": 8.0 * GiB}}  # cluster.yaml's head: no CPUs


def gpu_node(kind: str | None = "L4", gpus: float = 1.0) -> dict:
    resources = {"CPU": 8.0, "GPU": gpus, "memory": 32.0 * GiB}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    return {"Alive": True, "Resources": resources}


L4_CLUSTER = [HEAD, gpu_node("L4"), gpu_node("L4")]
CPU_CLUSTER = [HEAD, {"Alive": True, "Resources": {"CPU": 8.0}}]


def share(size: int | None, nodes=L4_CLUSTER, **placement) -> float:
    return host_resources(Placement(**placement), size, nodes).placement.num_gpus


def test_small_models_share_a_gpu_and_a_large_one_gets_a_whole_one(caplog):
    assert share(3 * 2**20) == 0.05  # a tiny model: the smallest share, so many share one GPU
    assert share(3 * 2**20) + share(5 * 2**20) == pytest.approx(0.1)
    assert share(4 * GiB) == 0.25  # 4 GiB x 1.5 / 24 GiB = 0.25
    assert share(int(4.1 * GiB)) == 0.3  # rounded up to a multiple of 0.05
    assert share(9 * GiB) == 1.0  # 0.5625 of an L4: two would not fit one GPU together
    with caplog.at_level(logging.WARNING, logger="actors.placement"):
        big = host_resources(Placement(), 20 * GiB, L4_CLUSTER)  # 30 GiB needed on a 24 GiB L4
    assert big.placement.num_gpus == 1.0
    assert "larger than one GPU" in caplog.text and "no model parallelism" in " ".join(big.notes)


def test_the_share_is_sized_against_the_smallest_gpu_any_node_has():
    mixed = [HEAD, gpu_node("A100-80G"), gpu_node("L4")]
    assert share(4 * GiB, mixed) == 0.25  # against the L4's 24 GiB: the host may land there
    assert share(4 * GiB, [HEAD, gpu_node("A100-80G")]) == 0.1  # 6 / 80 = 0.075 -> 0.1
    sized = host_resources(Placement(), 4 * GiB, [HEAD, gpu_node("H100")])
    assert sized.gpu_memory_gb == 80 and "accelerator_type:H100" in sized.notes[0]


def test_an_unknown_gpu_is_assumed_16_gib_unless_overridden():
    unknown = [HEAD, gpu_node("FancyNewGPU")]
    assumed = host_resources(Placement(), 4 * GiB, unknown)
    assert assumed.gpu_memory_gb == 16 and assumed.placement.num_gpus == 0.4  # 6 / 16 = 0.375 -> 0.4
    assert GPU_MEMORY_ENV in assumed.notes[0]  # the note says how to tell
    assert host_resources(Placement(), 4 * GiB, unknown, default_gpu_memory_gb=48).placement.num_gpus == 0.15
    assert share(4 * GiB, unknown, gpu_memory_gb=120) == 0.05  # the placement's own figure wins
    assert share(4 * GiB, [HEAD, gpu_node(None)]) == 0.4  # a fake GPU with no type: 16 GiB too


def test_cpu_mode_explicit_settings_and_a_cluster_without_gpus_ask_for_no_share():
    assert share(4 * GiB, mode="cpu") == 0
    assert share(4 * GiB, num_gpus=0.3) == 0.3  # explicit: as given, not sized
    assert share(4 * GiB, num_gpus=2, mode="cpu") == 2
    assert share(4 * GiB, memory=GiB) == 0  # an explicit memory reservation is the placement as given
    assert share(4 * GiB, CPU_CLUSTER) == 0  # auto on a CPU cluster: today's CPU host
    assert share(0) == 0  # a tokenizer: nothing to put on a GPU
    cpus = host_resources(Placement(num_cpus=2), 4 * GiB, L4_CLUSTER).placement
    assert (cpus.num_cpus, cpus.num_gpus) == (2, 0.25)  # the rest of the placement is kept


def test_an_unknown_size_gets_the_smallest_share_with_a_note():
    unknown = host_resources(Placement(), None, L4_CLUSTER)
    assert unknown.placement.num_gpus == 0.05
    assert any("size unknown" in note for note in unknown.notes)
    assert unknown.info()["num_gpus"] == 0.05 and unknown.info()["model_bytes"] is None


def test_gpu_mode_without_a_gpu_fails_naming_the_model_and_the_setting_unless_the_cluster_grows():
    who = "the model host of backbone/unet2d (model 'preset:tiny')"
    with pytest.raises(InfeasiblePlacement) as err:
        host_resources(Placement(mode="gpu"), GiB, CPU_CLUSTER, who=who)
    assert who in str(err.value) and "`placement.mode: gpu`" in str(err.value)
    waiting = host_resources(Placement(mode="gpu"), GiB, CPU_CLUSTER, may_grow=True)
    assert waiting.placement.num_gpus == 0.1  # 1.5 / 16: sized for the GPU node to come
    assert share(GiB, L4_CLUSTER, mode="gpu") == 0.1


def test_dead_nodes_do_not_count():
    dead = {**gpu_node("L4"), "Alive": False}
    assert share(GiB, [HEAD, dead]) == 0


def test_the_env_override_must_be_a_positive_number(monkeypatch):
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    assert gpu_memory_from_env() is None
    monkeypatch.setenv(GPU_MEMORY_ENV, "24")
    assert gpu_memory_from_env() == 24
    for bad in ("lots", "-3"):
        monkeypatch.setenv(GPU_MEMORY_ENV, bad)
        with pytest.raises(ConfigError, match=f"env var {GPU_MEMORY_ENV} must be a positive number"):
            gpu_memory_from_env()
