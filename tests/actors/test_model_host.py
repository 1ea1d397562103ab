"""Model hosts (actors/model_host.py): one host actor per model identity, private hosts, checkpoints, a killed
host and its restart, unloading, and placement on what the cluster's nodes have."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import worldgen as wg
from actors.model_host import host_name, list_hosts, unload_hosts
from tests.conftest import PROMPT
from worldgen.models.pool import default_pool

TOL = 1e-5  # CPU thread counts differ between processes
STEPS = 3


def wait_until(condition, what: str, seconds: float = 60) -> None:
    """Poll `condition` until it holds; fail naming `what` after `seconds` (no fixed sleeps: timing-free)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.01)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOL


def test_two_pipelines_running_concurrently_share_hosts(clean_hosts):
    pipelines = [wg.Pipeline.from_template("generate_and_refine", preset="tiny", steps=2) for _ in range(2)]
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = pipelines[i].run({"prompt": PROMPT}, seed=2, executor="ray")["image"]
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(results[0], results[1])
    hosts = list_hosts()
    assert len(hosts) == 3 and all(h["loads"] == 1 for h in hosts)  # text encoder, UNet, VAE


def test_reuse_off_gives_a_private_host(clean_hosts):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
    shared = graph.block("unet")
    private = wg.create_block(
        "backbone/unet2d", {"model": {"source": "preset:tiny", "subfolder": "unet", "reuse": False}}
    )
    assert host_name(shared) != host_name(private)
    assert host_name(private) == host_name(private)  # stable for one block
    graph.remove_node("unet")
    graph.add_node(private, id="unet", auto_connect=False)
    for source, target in [
        ("te.embedding", "unet.condition"),
        ("te_neg.embedding", "unet.condition_uncond"),
        ("schedule.model_input", "unet.sample"),
        ("schedule.timestep", "unet.timestep"),
        ("unet.pred", "cfg.pred_cond"),
        ("unet.pred_uncond", "cfg.pred_uncond"),
        ("solver.model_input", "unet.sample"),
        ("solver.timestep", "unet.timestep"),
    ]:
        graph.add_edge(source, target)
    graph.run({"prompt": PROMPT}, seed=0, executor="ray")
    assert any(h["name"] == host_name(private) for h in list_hosts())


def test_saved_graph_on_ray_uses_its_checkpoint(clean_hosts, tmp_path):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=2)
    with torch.no_grad():
        for p in graph.block("unet").model.parameters():
            p.mul_(0.9)  # "trained": no longer the preset's weights
    graph.save(tmp_path / "trained")
    local = graph.run({"prompt": PROMPT}, seed=0)["image"]
    default_pool().clear()  # the preset's pooled UNet was modified in place above; drop it
    loaded = wg.Graph.load(tmp_path / "trained")
    remote = loaded.run({"prompt": PROMPT}, seed=0, executor="ray")["image"]
    assert close(local, remote)
    fresh = wg.Graph.from_template("text_to_image", preset="tiny", steps=2).run({"prompt": PROMPT}, seed=0)[
        "image"
    ]
    assert not close(fresh, remote)


def test_killed_host_fails_the_run_clearly_and_the_next_run_recovers(clean_hosts):
    import ray

    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=40)
    expected = graph.run({"prompt": PROMPT}, seed=0, iterations=None)["image"]
    graph.run({"prompt": PROMPT}, seed=0, executor="ray", fuse_loops=False)  # hosts up and warm
    unet_host = ray.get_actor(host_name(graph.block("unet")), namespace="worldgen")
    warm = ray.get(unet_host.info.remote())

    def host_info() -> dict | None:
        try:
            return ray.get(unet_host.info.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - dead or restarting: not answering yet
            return None

    failure = []

    def run():
        try:
            graph.run({"prompt": PROMPT}, seed=0, executor="ray", fuse_loops=False)
        except wg.ExecutionError as err:
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    # the 40-step loop is under way once the host has been called again (one call per step: 39 more to go)
    wait_until(lambda: (host_info() or warm)["calls"] > warm["calls"], "the run to call the UNet host")
    assert thread.is_alive()
    ray.kill(unet_host, no_restart=False)  # Ray restarts it (max_restarts) and it reloads its model
    thread.join(timeout=120)
    assert not thread.is_alive() and failure, "the run that lost its host must fail"
    assert "model host actor died" in str(failure[0]) and "running again is safe" in str(failure[0])
    # the host comes back in a new process (the old one is gone), before the next run needs it
    wait_until(lambda: (host_info() or warm)["pid"] != warm["pid"], "the UNet host to restart")

    again = graph.run({"prompt": PROMPT}, seed=0, executor="ray")["image"]
    assert close(expected, again)
    unet = next(h for h in list_hosts() if h["name"] == host_name(graph.block("unet")))
    assert unet["loads"] == 1 and unet["calls"] >= 1  # a new process that loaded the model again


def test_unload_hosts(clean_hosts):
    wg.Graph.from_template("text_to_image", preset="tiny", steps=2).run(
        {"prompt": PROMPT}, seed=0, executor="ray"
    )
    hosts = list_hosts()
    assert len(hosts) == 3  # text encoder, UNet, VAE (the tokenizer runs inline)
    for host in hosts:  # placement auto on this GPU-less session: CPU hosts, saying why
        assert host["placement"]["num_gpus"] == 0 and host["device"] == "cpu", host
        assert host["placement"]["reason"] == "placement mode 'auto' on a cluster without GPUs", host
        assert not host["inference_mode"]  # CPU calls stay as the local executor makes them (exact parity)
    assert len(unload_hosts()) == 3
    assert list_hosts() == []


def gpu_graph(placement: dict, reuse: bool = True) -> wg.Graph:
    """The tiny text-to-image graph whose UNet host asks for `placement`."""
    config = wg.Graph.from_template("text_to_image", preset="tiny", steps=2).to_config()
    model = config["nodes"]["unet"]["config"]["model"]
    config["nodes"]["unet"]["config"]["model"] = (
        {"source": model} if isinstance(model, str) else dict(model)
    ) | {"placement": placement, "reuse": reuse}
    return wg.Graph.from_config(config)


def test_a_placement_no_node_can_satisfy_fails_within_seconds_and_leaves_no_host(clean_hosts):
    from actors.model_host import InfeasiblePlacement

    graph = gpu_graph({"num_gpus": 1})
    started = time.perf_counter()
    with pytest.raises(InfeasiblePlacement) as err:
        graph.run({"prompt": PROMPT}, seed=0, executor="ray")
    elapsed = time.perf_counter() - started
    message = str(err.value)
    assert "backbone/unet2d" in message and "asks for {GPU: 1}" in message, message
    assert "no node of this cluster has that" in message and "CPU: 2" in message, message
    assert elapsed < 10, elapsed
    assert not [h for h in list_hosts() if "UNet" in h["name"]]  # the UNet host was never created


def test_a_host_waiting_for_a_node_the_cluster_never_adds_is_removed(clean_hosts, monkeypatch):
    import ray
    from ray.util.state import list_actors

    from actors import model_host
    from actors.cluster import cluster_address
    from actors.model_host import InfeasiblePlacement
    from worldgen.limits import Limits, applying

    monkeypatch.setattr(model_host, "may_add_nodes", lambda: True)  # as on an autoscaling cluster
    graph = gpu_graph({"resources": {"accelerator_that_never_comes": 1}})
    started = time.perf_counter()
    expected = r"within 2 s \(limit 'placement_seconds'\)"
    with pytest.raises(InfeasiblePlacement, match=expected), applying(Limits(placement_seconds=2)):
        graph.run({"prompt": PROMPT}, seed=0, executor="ray")
    assert 2 <= time.perf_counter() - started < 10
    name = host_name(graph.block("unet"))
    pending = list_actors(address=cluster_address(), filters=[("name", "=", name)])
    assert all(a.state == "DEAD" for a in pending), pending  # killed, not left pending
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace="worldgen")


CLUSTER_SCRIPT = """
import time, ray
from ray.cluster_utils import Cluster
from actors import model_host
from actors.cluster import may_add_nodes
from tests.actors.test_model_host import gpu_graph, PROMPT

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
# fake GPUs: Ray places by them, torch still runs on the CPU; the accelerator type sizes the auto shares
cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:L4": 1})
ray.init(address=cluster.address, logging_level="warning")
try:
    assert not may_add_nodes()  # several raylets, no autoscaler: nothing will join
    graph = gpu_graph({"num_gpus": 1})
    image = graph.run({"prompt": PROMPT, "height": 32, "width": 32}, seed=0, executor="ray")
    assert tuple(image["image"].shape[-2:]) == (32, 32)
    # the other models ask for no placement (mode auto): tiny, each a 0.05 share of the L4s
    for node, share in (("unet", 1.0), ("te", 0.05), ("vae", 0.05)):
        info = ray.get(model_host.host_for(graph.block(node)).info.remote())
        assert info["placement"]["num_gpus"] == share and info["device"] == "cpu", (node, info)
    started = time.perf_counter()
    try:  # a private host (reuse off): the shared UNet host above would serve the call whatever its placement
        gpu_graph({"num_gpus": 3}, reuse=False).run({"prompt": PROMPT}, seed=0, executor="ray")
        raise SystemExit("three GPUs on one node must not be placed")
    except model_host.InfeasiblePlacement as err:
        assert "asks for {GPU: 3}" in str(err) and "GPU: 2" in str(err), err
    print(f"ok: fits on the GPU node; infeasible in {time.perf_counter() - started:.2f} s")
finally:  # the cluster's hosts go with it (no dashboard here for unload_hosts' state API)
    ray.shutdown()
    cluster.shutdown()
"""


def test_placement_on_a_cluster_whose_one_gpu_node_fits(tmp_path):
    """Several raylets (ray.cluster_utils.Cluster), one with two fake L4s: a host asking for one GPU lands there
    and runs, the graph's other hosts (placement auto) take 0.05 shares; one asking for three fails at once,
    naming what the nodes have. Own process: one Ray per process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "ok: fits on the GPU node" in done.stdout, (
        done.stdout + done.stderr[-3000:]
    )
