"""A simulated multi-node Ray cluster for the tests (`ray.cluster_utils.Cluster`: several raylets on this machine).

Shaped like cluster.yaml: a head with `CPU: 0` (nothing of the project's may land there) that runs the dashboard
(the state API and job submission need it), worker nodes with a fake GPU (`GPU: 1`, `accelerator_type:L4`), and a
small CPU-less node for the gateway's Serve replicas (custom resource `gateway`), so killing a GPU node never takes
the gateway with it. Each node has its own WORLDGEN_CACHE_DIR, as real nodes have their own disks: a world driver
restarted on another node really reads its world from the store.

One process can be connected to one cluster only, and the session's `ray_session` (tests/conftest.py) starts its
own local Ray: tests/conftest.py runs the tests that use `sim_cluster` first and stops this cluster after the last
of them (`ray.shutdown()` + `Cluster.shutdown()`), so `ray_session` starts clean afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:L4": 1}}
GATEWAY_RESOURCE = "gateway"  # the gateway node's custom resource: Serve replicas ask for a share of it
NODE_START_S = 120  # a raylet joining on a busy 2-core machine


class SimCluster:
    """The cluster of one test session: `start()` once, then nodes come and go (`add_gpu_node`, `remove`)."""

    def __init__(self) -> None:
        self.cluster: Any = None
        self.head: Any = None
        self.gateway_node: Any = None
        self.gpu_nodes: list[Any] = []  # alive GPU workers, oldest first
        self.temp = Path(tempfile.mkdtemp(prefix="wg-sim-cluster-"))
        self.cache_dirs: dict[str, Path] = {}  # node id -> that node's WORLDGEN_CACHE_DIR
        self._count = 0

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.cluster.webui_url}"

    def start(self) -> SimCluster:
        import ray
        from ray.cluster_utils import Cluster

        if ray.is_initialized():  # a test of `ray_session` ran first: this process is on another cluster
            raise RuntimeError(
                "the simulated cluster must start before any other Ray in this process: tests/conftest.py "
                "orders the `sim_cluster` tests first (was the ordering hook bypassed?)"
            )
        started = time.monotonic()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": None},
        )
        self.head = self.cluster.head_node
        # CPU-less, so no world driver, model host or task lands here; only what asks for `gateway` does
        self.gateway_node = self._add({"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 100}}, "gateway")
        self.add_gpu_node()
        ray.init(address=self.address, logging_level="warning")
        print(f"\nsimulated cluster up in {time.monotonic() - started:.1f}s at {self.address}")
        return self

    def _add(self, args: dict[str, Any], label: str) -> Any:
        self._count += 1
        cache = self.temp / f"cache-{label}-{self._count}"
        cache.mkdir()
        node = self.cluster.add_node(
            wait=False,
            **args,
            env_vars={"WORLDGEN_CACHE_DIR": str(cache)},
            node_name=f"{label}-{self._count}",
        )
        self.cluster._wait_for_node(node, timeout=NODE_START_S)  # Ray's own wait (30 s) is short for 2 cores
        self.cache_dirs[node.node_id] = cache
        return node

    def add_gpu_node(self) -> Any:
        """A worker with one fake GPU (2 CPUs): model hosts and world drivers land on these."""
        node = self._add(dict(GPU_NODE), "gpu")
        self.gpu_nodes.append(node)
        return node

    def remove(self, node: Any) -> None:
        """Kill every process of the node, as a node failure (spot reclaim) would."""
        self.cluster.remove_node(node)
        self.gpu_nodes.remove(node)

    def keep_gpu_nodes(self, count: int) -> list[Any]:
        """Exactly `count` GPU workers: the newest removed, or new ones added; returns them."""
        while len(self.gpu_nodes) > count:
            self.remove(self.gpu_nodes[-1])
        while len(self.gpu_nodes) < count:
            self.add_gpu_node()
        return list(self.gpu_nodes)

    def gpu_node_ids(self) -> set[str]:
        return {node.node_id for node in self.gpu_nodes}

    def cache_of(self, node: Any) -> Path:
        return self.cache_dirs[node.node_id]

    def stop(self) -> list[str]:
        """Shut everything down (Serve, named actors, Ray, the nodes); returns the names of the project's named
        actors that were still alive (a test should have stopped them)."""
        import ray

        leftover: list[str] = []
        if self.cluster is None:
            return leftover
        try:
            if ray.is_initialized():
                leftover = _stop_project_actors()
        finally:
            ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None
            shutil.rmtree(self.temp, ignore_errors=True)
        return leftover


def _stop_project_actors() -> list[str]:
    """Shut Serve down and kill the project's named actors that are still alive; their names."""
    from ray import serve

    from actors.cluster import kill_named, named_actors

    serve.shutdown()  # a no-op where Serve never started
    names = [a.name for a in named_actors("", alive_only=True)]  # the project's namespace only
    kill_named(names)
    return names


def node_of(actor_name: str, *, wait_s: float = 120) -> str:
    """The id of the node an alive named actor of the project runs on (waits while it is restarting)."""
    from actors.cluster import named_actors

    deadline = time.monotonic() + wait_s
    while True:
        found = [a for a in named_actors(actor_name, alive_only=True) if a.name == actor_name]
        if found and found[0].node_id:
            return found[0].node_id
        assert time.monotonic() < deadline, f"actor {actor_name} is not alive on any node"
        time.sleep(0.2)


def wait_until(predicate: Any, what: str, seconds: float = 120, every: float = 0.05) -> Any:
    """Poll `predicate()` until it returns something truthy (returned); fails naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {seconds:g}s waiting for {what}"
        time.sleep(every)
    return value


def env_for_jobs() -> dict[str, str]:
    """The AWS test variables a job's runtime env needs to reach the test S3 server."""
    return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}


def world_config(steps: int = 2) -> dict[str, Any]:
    """The offline default world on the tiny preset at 32x32, its models on Ray (model hosts): `steps` denoising
    steps (more: a slower Creator, so a node can be killed while it runs)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs/worlds/default.yaml").read_text())
    config["executor"] = "ray"
    config["generation_defaults"] = {"width": 32, "height": 32, "steps": steps, "guidance": 7.5}
    config["stages"]["creator"] = {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}}
    return config
