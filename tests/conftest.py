"""Shared fixtures: tiny Stable-Diffusion components (seeded, no network) and matching diffusers pipelines."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid

import diffusers
import pytest
import torch

from worldgen.models.tiny import preset_pipeline_components, save_preset_pipeline

PROMPT = "a harbor at dawn"
SERVER_KEY_ENV = "WORLDGEN_TEST_SERVER_KEY"
S3_BUCKET = "worldgen-test"

# Worlds on the S3-compatible test server (`s3_server`) sign with these; set before Ray starts, so its workers
# (world drivers) inherit them as an operator's nodes inherit theirs. No instance-metadata lookups here.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "worldgen-test",
    "AWS_SECRET_ACCESS_KEY": "worldgen-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)
# local working copies of worlds on a store: a folder of this session, not the user's cache
os.environ.setdefault("WORLDGEN_CACHE_DIR", tempfile.mkdtemp(prefix="worldgen-cache-"))

# worldgen solver name -> (diffusers scheduler class, extra config) as a diffusers user would set it up
SOLVER_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def diffusers_pipeline(kind: str, solver: str, components: dict | None = None):
    """The diffusers pipeline a worldgen template must match, on the tiny preset's components."""
    components = dict(components or preset_pipeline_components("tiny"))
    cls_name, extra = SOLVER_SCHEDULERS[solver]
    components["scheduler"] = getattr(diffusers, cls_name).from_config(
        components["scheduler"].config, **extra
    )
    cls = (
        diffusers.StableDiffusionPipeline
        if kind == "text_to_image"
        else diffusers.StableDiffusionImg2ImgPipeline
    )
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A diffusers-format Stable Diffusion directory written by `save_pretrained` (tiny preset)."""
    return save_preset_pipeline("tiny", tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def init_image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def own_model_pool():
    """For a module that puts LoRA adapters on pooled models (custom worlds run here, training in-process): the
    models it loaded leave this process's pool with it, so later modules load clean ones. A pooled model keeps
    the adapters of every world that used it in the process, by design (one model, several worlds)."""
    from worldgen.models import default_pool

    yield
    default_pool().clear()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (~5 s to start); no named actor outlives it."""
    import ray

    from actors.cluster import NAMESPACE, cluster_address
    from actors.model_host import unload_hosts

    # A key only the server's environment holds (as an operator exports one before the cluster starts): the
    # trust tests check that no posted config gets it out of the server (tests/serve_apps/test_world_gateway_trust.py).
    os.environ.setdefault(SERVER_KEY_ENV, "sk-server-" + secrets.token_hex(16))
    ray.init(address="local", num_cpus=2, logging_level="warning", include_dashboard=True)
    try:
        yield ray
    finally:
        unload_hosts()
        from ray.util.state import list_actors

        alive = list_actors(address=cluster_address(), filters=[("state", "=", "ALIVE")])
        leftover = [a.name for a in alive if a.name and a.ray_namespace == NAMESPACE]
        ray.shutdown()
        assert not leftover, f"tests left named actors behind: {leftover}"


@pytest.fixture
def clean_hosts(ray_session):
    """Start a test with no model hosts and leave none behind."""
    from actors.model_host import unload_hosts

    unload_hosts()
    yield ray_session
    unload_hosts()


def crash_actor(handle, seconds: float = 120) -> None:
    """Kill an actor as a crash would and return once Ray has restarted it. `ray.kill` is asynchronous: a
    call sent right after it may still reach the old process, so wait for the restart count to go up."""
    import time

    import ray
    from ray.util.state import get_actor

    from actors.cluster import cluster_address

    actor_id = handle._actor_id.hex()  # Ray has no public id getter

    def record():
        return get_actor(actor_id, address=cluster_address())

    restarts = record().num_restarts
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + seconds
    while (now := record()).num_restarts <= restarts or now.state != "ALIVE":
        assert time.monotonic() < deadline, (
            f"actor {now.name or actor_id} was not restarted (state {now.state})"
        )
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_session):
    """Ray Serve's HTTP proxy on 127.0.0.1 (a free port) for the session; its base URL. Tests add their
    applications with `serve.run(app, name=..., route_prefix=...)` and delete them when done."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on 127.0.0.1 (moto's server mode, a separate process) with the test bucket; its
    endpoint `host:port`. Stopped by its PID."""
    import urllib.request

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{endpoint}/", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, "the moto S3 server exited at start"
                assert time.monotonic() < deadline, "the moto S3 server did not answer in 60 s"
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(
            S3_BUCKET
        )
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def s3_uri(endpoint: str, path: str) -> str:
    """A world root on the test server: `s3://<bucket>/<path>?endpoint_override=...`."""
    return f"s3://{S3_BUCKET}/{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def s3_root(s3_server):
    """A fresh, empty root on the test S3 server (a unique prefix of its bucket)."""
    return s3_uri(s3_server, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "s3"])
def world_dir(request, tmp_path):
    """A world's location, once on local disk and once on the S3-compatible test server: the world tests run
    on both."""
    from worldgen.stores import child_uri

    if request.param == "local":
        return tmp_path / "w"
    return child_uri(request.getfixturevalue("s3_root"), "w")


# ---- the simulated multi-node cluster (tests/sim_cluster.py) ------------------------------------------------
SIM_CLUSTER = "sim_cluster"
_sim: list = []  # the session's SimCluster while it runs


@pytest.hookimpl(trylast=True)  # after any plugin that reorders (pytest-randomly): ours has the last word
def pytest_collection_modifyitems(items):
    """The tests on the simulated cluster run first, together: one process cannot be on two clusters, and
    `ray_session` (a local Ray for every other Ray test) starts only after the simulated cluster is gone."""
    items.sort(key=lambda item: SIM_CLUSTER not in getattr(item, "fixturenames", ()))  # stable


@pytest.fixture(scope="session")
def sim_cluster():
    """A head with `CPU: 0` (dashboard on), one fake-GPU worker and a gateway node, this process connected to it
    (tests/sim_cluster.py). Stopped after the last test that uses it (below), so `ray_session` can start."""
    from tests.sim_cluster import SimCluster

    if not _sim:
        cluster = SimCluster()
        _sim.append(cluster)
        cluster.start()
    yield _sim[0]
    _stop_sim_cluster()


def _stop_sim_cluster() -> None:
    if _sim:
        leftover = _sim.pop().stop()
        assert not leftover, f"the simulated-cluster tests left named actors behind: {leftover}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last simulated-cluster test (its fixtures torn down): the cluster goes, before `ray_session`."""
    result = yield
    uses = SIM_CLUSTER in getattr(item, "fixturenames", ())
    if uses and (nextitem is None or SIM_CLUSTER not in getattr(nextitem, "fixturenames", ())):
        _stop_sim_cluster()
    return result
