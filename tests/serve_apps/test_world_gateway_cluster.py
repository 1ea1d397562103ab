"""The world gateway on a multi-node cluster (tests/sim_cluster.py), its worlds on the S3 test server:

- while the node holding a world's driver and model hosts is lost mid-step, the gateway (two replicas on a node of
  their own) keeps answering reads from the store and answers steps with 503 + Retry-After, never a 500; once
  Ray has brought the driver back on another node, the step goes through and nothing is lost or duplicated;
- a world run submitted with `ray job submit` (Ray's job API at the head's dashboard) onto the store is then
  served by the gateway.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from actors.model_host import list_hosts, unload_hosts
from actors.world_driver import driver_name, stop_world
from tests.actors.test_world_driver_cluster import check_world, on_store
from tests.conftest import free_port
from tests.sim_cluster import GATEWAY_RESOURCE, env_for_jobs, node_of, wait_until, world_config
from worldgen.stage import CYCLE
from worldgen.stores import child_uri

ROOT = Path(__file__).resolve().parents[2]
APP = "gateway-cluster"
TIMEOUT_S = 600  # one request or job, on a busy 2-core machine
READS = ("", "/state", "/episodes")
TOKEN_ENV = "WORLDGEN_API_TOKEN"
TOKEN = "gateway-cluster-token"


class Client(requests.Session):
    """requests with a base URL and a default timeout."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url

    def request(self, method, url, *args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(method, self.base_url + url, *args, **kwargs)


@pytest.fixture(scope="module")
def gateway(sim_cluster, s3_server):
    """Serve's proxy on the head (127.0.0.1, a free port) and the gateway's two replicas on the gateway node
    (none on a GPU node, so losing one never takes the gateway with it); its root on the S3 test server."""
    from ray import serve

    from serve_apps.world_gateway import app_builder
    from tests.conftest import s3_uri

    root = s3_uri(s3_server, f"gw-{secrets.token_hex(6)}")
    port = free_port()
    # one proxy, on the head: every node of this cluster is on 127.0.0.1, so proxies on each would share a port
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    replica = {"num_cpus": 0, "resources": {GATEWAY_RESOURCE: 1}}
    os.environ[TOKEN_ENV] = TOKEN  # read where the app is built, as in production
    try:
        app = app_builder(
            {"root": root, "num_replicas": 2, "ray_actor_options": replica, "token_env": TOKEN_ENV}
        )
    finally:
        del os.environ[TOKEN_ENV]
    serve.run(app, name=APP, route_prefix="/")
    client = Client(f"http://127.0.0.1:{port}")
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        yield client, root
    finally:
        try:
            for world in client.get("/v1/worlds", timeout=60).json()["worlds"]:
                stop_world(child_uri(root, world["id"]))  # drivers only: the worlds stay on the store
        finally:
            client.close()
            serve.shutdown()
            unload_hosts()


def replica_nodes() -> set[str]:
    from ray.util.state import list_actors

    from actors.cluster import cluster_address

    replicas = list_actors(address=cluster_address(), filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in replicas if "ServeReplica" in (a.class_name or "") and APP in (a.name or "")}


def test_reads_answer_and_steps_get_503_while_the_drivers_node_is_lost(sim_cluster, gateway):
    client, root = gateway
    (first,) = sim_cluster.keep_gpu_nodes(1)
    unload_hosts()
    created = client.post("/v1/worlds", json={"id": "quay", "config": world_config(steps=10)})
    assert created.status_code == 201, created.text
    uri = child_uri(root, "quay")
    assert client.post("/v1/worlds/quay/step", json={}).status_code == 200
    assert client.post("/v1/worlds/quay/step", json={}).json()["episode"] == 1
    name = driver_name(uri)
    assert node_of(name) == first.node_id
    assert {h["node_id"] for h in list_hosts()} == {first.node_id}
    assert replica_nodes() == {sim_cluster.gateway_node.node_id}  # both replicas, on the gateway's node

    second = sim_cluster.add_gpu_node()
    in_flight: list[requests.Response] = []
    stepping = threading.Thread(target=lambda: in_flight.append(client.post("/v1/worlds/quay/step", json={})))
    stepping.start()
    progress = wait_until(
        lambda: (p := on_store(uri)) is not None and (p.step > 2 or p.stage_index == len(CYCLE) - 1) and p,
        "the Creator of step 3 to start",
    )
    assert progress.step == 2, "step 3 ended before the node was killed: slow the Creator down"
    killed = time.monotonic()
    sim_cluster.remove(first)

    statuses: dict[str, list[int]] = {"read": [], "step": []}
    report = None
    while report is None:
        assert time.monotonic() - killed < TIMEOUT_S, f"no step went through within {TIMEOUT_S} s"
        for path in READS:  # answered from the store whether the driver is up or not
            read = client.get(f"/v1/worlds/quay{path}")
            statuses["read"].append(read.status_code)
            assert read.status_code == 200, (path, read.status_code, read.text)
        listed = client.get("/v1/worlds")
        assert listed.status_code == 200 and "quay" in [w["id"] for w in listed.json()["worlds"]]
        step = client.post("/v1/worlds/quay/step", json={})
        statuses["step"].append(step.status_code)
        if step.status_code == 200:
            report = step.json()
        else:
            assert step.status_code == 503, (step.status_code, step.text)  # never a 500
            assert int(step.headers["Retry-After"]) >= 1, step.headers
            time.sleep(0.5)
    failover = time.monotonic() - killed
    stepping.join(TIMEOUT_S)
    print(f"\ngateway failover: node killed -> first step done in {failover:.1f}s; statuses {statuses}")
    (interrupted,) = in_flight  # the step the kill hit: a 503 to retry, not a 500
    assert interrupted.status_code == 503, (interrupted.status_code, interrupted.text)
    assert int(interrupted.headers["Retry-After"]) >= 1, interrupted.headers
    assert report["step"] == 3 and report["episode"] == 2
    assert node_of(name) == second.node_id
    assert {h["node_id"] for h in list_hosts()} == {second.node_id}
    assert replica_nodes() == {sim_cluster.gateway_node.node_id}
    check_world(uri, 3)
    episodes = client.get("/v1/worlds/quay/episodes").json()
    assert [e["episode"] for e in episodes["items"]] == [1, 2]


def test_a_world_run_as_a_job_is_then_served_by_the_gateway(sim_cluster, gateway, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, root = gateway
    config = tmp_path / "world.yaml"  # the job's world: the default one, small and fast
    config.write_text(yaml.safe_dump({**world_config(), "executor": "local"}))
    uri = child_uri(root, "from-job")
    jobs = JobSubmissionClient(sim_cluster.dashboard_url)
    job_id = f"wg-cluster-{secrets.token_hex(4)}"
    started = time.monotonic()
    jobs.submit_job(
        submission_id=job_id,
        # the venv's interpreter (a bare `python` may be the system's); the code: this checkout, uploaded
        entrypoint=f"{sys.executable} -m worldgen run {config} --steps 2 --out '{uri}'",
        entrypoint_num_cpus=1,  # on a worker: the head has no CPU to give (as on cluster.yaml)
        runtime_env={"working_dir": str(ROOT), "env_vars": env_for_jobs()},
    )
    try:
        status = wait_until(
            lambda: (s := jobs.get_job_status(job_id)).is_terminal() and s, "the job", TIMEOUT_S, every=0.5
        )
        logs = jobs.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
    finally:
        if not jobs.get_job_status(job_id).is_terminal():
            jobs.stop_job(job_id)
    print(f"\njob {job_id} finished in {time.monotonic() - started:.1f}s")
    assert "saved episode 1" in logs
    check_world(uri, 2)

    listed = client.get("/v1/worlds")
    assert listed.status_code == 200 and "from-job" in [w["id"] for w in listed.json()["worlds"]]
    episodes = client.get("/v1/worlds/from-job/episodes")
    assert episodes.status_code == 200, episodes.text
    assert [e["episode"] for e in episodes.json()["items"]] == [1]
    (picture,) = episodes.json()["items"][0]["state"]["artifacts"]
    image = client.get(picture["url"])
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
