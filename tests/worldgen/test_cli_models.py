"""`worldgen models list|unload` and `worldgen run --executor ray` against a real `ray start --head` cluster.

Everything that touches that cluster runs in subprocesses: the pytest process may hold its own in-process Ray
session (the `ray_session` fixture), and one driver cannot be attached to two clusters. The cluster is private
to this module: its own temp dir (so the machine-wide /tmp/ray/ray_current_cluster is neither read nor
overwritten), its own ports and its own auth token. It is stopped by signalling its `ray start --block` process,
never with `ray stop`, which would kill every Ray process on the machine, other test sessions' included.

Auth: Ray 2.60 turns token authentication on for a new `ray.init()` cluster, and `ray start --head` turns it on
when a token is found (~/.ray/auth_token). Rather than depend on (or write) that file, the cluster and every
client here get a fresh token through the environment: RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN. Clients are
pointed at the cluster through RAY_ADDRESS, which is what `ray.init(address="auto")` (the CLI's default)
honours first; with several clusters on one machine, plain auto-detection would pick any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from worldgen.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {  # the models with a host (the tokenizer runs inline, where a run is driven)
    "text_encoder": "CLIPTextModel",
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
}
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 400

# Creates the model hosts (detached actors: they outlive this script) by running the tiny template on Ray.
CREATE_HOSTS = """
import ray
import worldgen as wg

ray.init(address="auto", logging_level="error")
out = wg.Graph.from_template("text_to_image", preset="tiny", steps=2).run({"prompt": "x"}, seed=0, executor="ray")
assert "image" in out, sorted(out)
"""


def _ray_executable() -> str:
    ray = Path(sys.executable).parent / "ray"
    found = str(ray) if ray.exists() else shutil.which("ray")
    if found is None:
        pytest.skip("the `ray` command is not installed next to this Python")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "RAY_ADDRESS",
            "RAY_API_SERVER_ADDRESS",
            "RAY_AUTH_MODE",
            "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH",
            "WORLDGEN_NAMESPACE",
        }
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` drains the node and stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # what is left of its process group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_head(temp_dir: Path, env: dict[str, str], dashboard_port: int = 0) -> tuple[subprocess.Popen, Path]:
    """`ray start --head --block` with its own temp dir, free ports and process group (stop it with `_stop`);
    returns the process and its log file."""
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                _ray_executable(),
                "start",
                "--head",
                "--block",
                "--port=0",
                "--num-cpus=1",
                "--disable-usage-stats",
                "--include-dashboard=true",  # the state API and the job server go through it
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--temp-dir={temp_dir}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that teardown can reach all of it
        )
    return proc, log_path


@pytest.fixture(scope="module")
def cluster():
    """A private `ray start --head` cluster; yields the environment its clients need."""
    # Short path: Ray's unix sockets live under it and must stay within ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="wgray-", dir="/tmp"))
    env = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    proc, log_path = start_head(temp_dir, env)
    try:
        record = temp_dir / "ray_current_cluster"  # written once the head node is up
        deadline = time.monotonic() + START_TIMEOUT_S
        while not record.exists() or not record.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env | {"RAY_ADDRESS": record.read_text().strip()}
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worldgen.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _listed(env: dict[str, str]) -> list[dict]:
    result = _cli(env, "models", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _component(host: dict) -> str:
    (component,) = [c for c in COMPONENTS if host["identity"].split("|")[2] == c]
    return component


@pytest.fixture(scope="module")
def hosts(cluster) -> list[dict]:
    """The model hosts that one `executor="ray"` run of the tiny text_to_image template left on the cluster."""
    result = subprocess.run(
        [sys.executable, "-c", CREATE_HOSTS],
        env=cluster,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return _listed(cluster)


def _assert_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("worldgen: error: ") and "\n" not in line, result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


# ---- list ------------------------------------------------------------------------------------------------------
def test_list_shows_one_host_per_model_each_loaded_once(cluster, hosts):
    assert sorted(_component(h) for h in hosts) == sorted(COMPONENTS)
    for host in hosts:
        component = _component(host)
        assert host["name"].startswith("wg-model-") and COMPONENTS[component] in host["name"]
        assert host["class"].endswith(f":{COMPONENTS[component]}")
        assert host["loads"] == 1
        assert host["calls"] >= 1
        assert isinstance(host["pid"], int) and host["pid"] > 0
        assert "error" not in host
        assert host["parameters"] > 0

    table = _cli(cluster, "models", "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["NAME", "CLASS", "IDENTITY", "PARAMETERS", "LOADS", "CALLS", "PID"]
    assert sorted(row.split()[0] for row in rows) == sorted(h["name"] for h in hosts)


def test_explicit_address_reaches_the_same_cluster(cluster, hosts):
    env = dict(cluster)
    address = env.pop("RAY_ADDRESS")
    result = _cli(env, "models", "list", "--json", "--address", address)
    assert result.returncode == 0, result.stderr
    assert sorted(h["name"] for h in json.loads(result.stdout)) == sorted(h["name"] for h in hosts)


def test_run_with_ray_executor_reuses_the_hosts(cluster, hosts, tmp_path):
    result = _cli(
        cluster,
        "generate",
        "template:text_to_image",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--prompt",
        "x",
        "--executor",
        "ray",
        "--out",
        str(tmp_path),
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "executor ray" in result.stderr
    assert (tmp_path / "text_to_image_seed0.png").is_file()
    after = {h["name"]: h for h in _listed(cluster)}
    assert set(after) == {h["name"] for h in hosts}  # same hosts: the models were not loaded again
    for host in hosts:
        assert after[host["name"]]["loads"] == 1
        assert after[host["name"]]["pid"] == host["pid"]
        assert after[host["name"]]["calls"] > host["calls"]


# ---- unload ----------------------------------------------------------------------------------------------------
def test_unload_unknown_name_lists_the_hosts_and_unloads_nothing(cluster, hosts):
    unet = next(h["name"] for h in hosts if _component(h) == "unet")
    typo = unet[:-3]
    line = _assert_error(
        _cli(cluster, "models", "unload", typo), f"no model host named '{typo}'", f"did you mean '{unet}'?"
    )
    for host in hosts:
        assert host["name"] in line
    assert len(_listed(cluster)) == len(hosts)


def test_unload_by_name_then_all(cluster, hosts):
    vae = next(h["name"] for h in hosts if _component(h) == "vae")
    result = _cli(cluster, "models", "unload", vae)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"unloaded {vae}"
    remaining = sorted(h["name"] for h in _listed(cluster))
    assert remaining == sorted(h["name"] for h in hosts if h["name"] != vae)

    result = _cli(cluster, "models", "unload", "--all")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(["unloaded"] * len(remaining) + remaining)
    assert _listed(cluster) == []
    table = _cli(cluster, "models", "list")
    assert table.returncode == 0 and table.stdout.startswith("no model hosts are running"), table

    again = _cli(cluster, "models", "unload", "--all")
    assert again.returncode == 0 and "nothing to unload" in again.stdout, again


# ---- without a cluster -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_list_without_a_cluster_fails_fast_with_a_clear_message(how):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    args = ["models", "list", "--address", address] if how == "--address" else ["models", "list"]
    env = _client_env(**({"RAY_ADDRESS": address} if how == "RAY_ADDRESS" else {}))
    started = time.monotonic()
    result = _cli(env, *args, timeout=60)
    _assert_error(result, f"no Ray cluster is running at {address}", "ray start --head", "--address")
    assert time.monotonic() - started < 30


def test_unload_needs_names_or_all(capsys):
    assert main(["models", "unload"]) == 2
    assert "or pass --all" in capsys.readouterr().err
    assert main(["models", "unload", "wg-model-x", "--all"]) == 2
    assert "not both" in capsys.readouterr().err


def test_run_address_needs_the_ray_executor(capsys):
    argv = [
        "generate",
        "template:text_to_image",
        "--preset",
        "tiny",
        "--executor",
        "local",
        "--address",
        "127.0.0.1:1",
    ]
    assert main(argv) == 2
    assert "--address applies only with --executor ray" in capsys.readouterr().err
