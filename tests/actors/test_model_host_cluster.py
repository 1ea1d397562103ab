"""Model hosts on a multi-node cluster (tests/sim_cluster.py: a head with `CPU: 0`, workers with a fake GPU): they
land on GPU nodes with their GPU share, never on the head, and there is one host per model cluster-wide, whoever
uses the model (two worlds on the store, a graph run from here)."""

from __future__ import annotations

import pytest

import worldgen as wg
from actors.model_host import list_hosts, unload_hosts
from tests.conftest import PROMPT
from tests.sim_cluster import world_config
from worldgen.stores import child_uri

TINY_GPU_SHARE = 0.05  # placement auto: a tiny model's bytes ask for the smallest share of a GPU


@pytest.fixture
def no_hosts(sim_cluster):
    unload_hosts()
    yield sim_cluster
    unload_hosts()


def required(actor_id: str) -> dict[str, float]:
    """The resources an actor asked Ray for (the state API's record of it)."""
    from ray.util.state import get_actor

    from actors.cluster import cluster_address

    return dict(get_actor(actor_id, address=cluster_address()).required_resources or {})


def test_hosts_land_on_gpu_nodes_with_a_share_one_per_model(no_hosts, s3_root):
    from actors.world_driver import RemoteWorld

    cluster = no_hosts
    cluster.keep_gpu_nodes(2)
    gpu_nodes = cluster.gpu_node_ids()
    worlds = []
    try:
        for name in ("north", "south"):  # two worlds on the store, the same tiny checkpoint
            worlds.append(RemoteWorld(child_uri(s3_root, name), world_config(), timeout=300))
        for world in worlds:
            assert world.step()["ran"] == [
                "development",
                "architect",
                "creator",
            ]  # the Creator used the hosts
        hosts = list_hosts()
        # text encoder, UNet, VAE: one host each for both worlds, each loaded once and called by both
        assert len(hosts) == 3, [h["name"] for h in hosts]
        assert all(h["loads"] == 1 for h in hosts), hosts
        for host in hosts:
            assert host["node_id"] in gpu_nodes, (host["name"], host["node_id"], gpu_nodes)
            assert host["node_id"] != cluster.head.node_id
            # what Ray reserved for it, and what the host says it asked for (sized on the L4s, runs on the CPU)
            assert required(host["actor_id"]).get("GPU") == pytest.approx(TINY_GPU_SHARE), host["name"]
            assert host["placement"]["num_gpus"] == TINY_GPU_SHARE and host["device"] == "cpu", host
        calls = {h["name"]: h["calls"] for h in hosts}

        # a graph run from this process (on the head, which runs nothing) finds the same hosts by name
        graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
        graph.run({"prompt": PROMPT}, seed=0, executor="ray")
        after = list_hosts()
        assert [h["name"] for h in after] == sorted(calls)
        assert all(h["loads"] == 1 and h["calls"] > calls[h["name"]] for h in after), after

        for world in worlds:  # the drivers, too, run on the GPU workers (the head has no CPU to give)
            assert world.info()["step"] == 1
        from tests.sim_cluster import node_of

        assert {node_of(world.name) for world in worlds} <= gpu_nodes
    finally:
        for world in worlds:
            world.shutdown()
