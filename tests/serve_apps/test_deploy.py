"""Serve config files under configs/serve/ and `worldgen serve`, which runs them on a local Ray instance."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serve_apps.deploy import build_application, load_serve_config
from tests.conftest import free_port
from worldgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((REPO / "configs" / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_follow_serves_schema(path):
    config = load_serve_config(path)
    assert config.applications and all(
        app.import_path.startswith("serve_apps.") for app in config.applications
    )


def _settings(args: dict, default: object) -> dict:
    """`args` as the gateway's settings hold them: nested mappings (trust, limits) over their defaults."""
    return {k: v | args.get(k, {}) if isinstance(v, dict) else args.get(k, v) for k, v in default.items()}


def test_the_world_gateway_config_builds(tmp_path, monkeypatch):
    from ray.serve import Application

    from serve_apps.world_gateway import GatewaySettings

    monkeypatch.setenv("WORLDGEN_API_TOKEN", "s3cret-token")
    (app_config,) = load_serve_config(REPO / "configs" / "serve" / "worlds.yaml").applications
    assert app_config.name == "worlds" and app_config.route_prefix == "/"
    args = {**app_config.args, "root": str(tmp_path), "max_ongoing_requests": 7}
    app = build_application(app_config.import_path, args)
    assert isinstance(app, Application)
    # what Serve will run: one deployment, the gateway, with the config's options and args (Ray has no public
    # accessor for an application's bound deployment, nor for its autoscaling config)
    deployment = app._bound_deployment
    assert deployment.name == "WorldGateway"
    assert deployment.max_ongoing_requests == 7
    scaling = deployment._deployment_config.autoscaling_config
    assert (
        scaling.min_replicas >= 2 and scaling.max_replicas >= scaling.min_replicas
    )  # any replica, any world
    assert deployment.ray_actor_options["num_cpus"] > 0  # off cluster.yaml's head
    settings, digest = deployment.init_args
    assert deployment.init_kwargs == {}
    expected = _settings(args, GatewaySettings().model_dump())
    for key in ("num_replicas", "autoscaling", "ray_actor_options"):  # the deployment's options (above)
        del expected[key]
    assert settings == expected  # every other arg of the file, nothing lost
    assert GatewaySettings.model_validate(settings)  # a replica reads them back
    assert settings["limits"]["max_worlds"] == 32 and settings["limits"]["stage_seconds"] == 900
    assert settings["trust"] == {"roots": [], "project_configs": False, "env": [], "urls": [], "models": []}
    # the token is read where the app is built, and only its digest travels to the replicas
    assert digest == hashlib.sha256(b"s3cret-token").hexdigest() and "s3cret" not in json.dumps(settings)


def _deployments(app: object) -> list:
    """The deployments an application runs: its ingress and those bound into its arguments."""
    from ray.serve import Application

    deployment = app._bound_deployment
    found = [deployment]
    for arg in [*deployment.init_args, *deployment.init_kwargs.values()]:
        if isinstance(arg, Application):
            found += _deployments(arg)
    return found


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_replica_asks_for_cpus_so_none_lands_on_the_head(path, monkeypatch):
    """cluster.yaml's head has CPU: 0: a replica that asks for a CPU (or a share of one) is placed on workers."""
    monkeypatch.chdir(REPO)  # the graph config names its graph relative to the repository
    for application in load_serve_config(path).applications:
        app = build_application(application.import_path, application.args, file=str(path))
        for deployment in _deployments(app):
            assert deployment.ray_actor_options.get("num_cpus", 1) > 0, (path.name, deployment.name)


def test_the_llm_replicas_ask_for_gpus_and_scale():
    (application,) = load_serve_config(REPO / "configs" / "serve" / "llm.yaml").applications
    models = [
        d
        for d in _deployments(build_application(application.import_path, application.args))
        if d.name == "LLMModels"
    ]
    (deployment,) = models
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas > 1


@pytest.mark.parametrize(
    ("import_path", "base"),
    [
        ("serve_apps.world_gateway:app_builder", {}),
        ("serve_apps.graph_app:app_builder", {"graph": str(REPO / "configs/graphs/text_to_image_tiny.yaml")}),
        ("serve_apps.llm_server:app_builder", {"models": {"m": "models/m"}}),
    ],
    ids=["gateway", "graph", "llm"],
)
def test_replicas_are_counted_or_autoscaled_and_bad_scaling_names_the_field(import_path, base):
    fixed = build_application(import_path, {**base, "num_replicas": 3})
    assert _deployments(fixed)[-1].num_replicas == 3  # the replicated deployment (the LLM's models: last)
    scaled = build_application(
        import_path,
        {**base, "autoscaling": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3}},
    )
    config = _deployments(scaled)[-1]._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (2, 5, 3)
    with pytest.raises(ConfigError, match=r"autoscaling\.max_replicas"):
        build_application(import_path, {**base, "autoscaling": {"min_replicas": 1}})
    with pytest.raises(ConfigError, match=r"autoscaling.*min_replicas \(4\) is more than max_replicas \(2\)"):
        build_application(import_path, {**base, "autoscaling": {"min_replicas": 4, "max_replicas": 2}})
    with pytest.raises(ConfigError, match=r"autoscaling\.target_ongoing_requests"):
        build_application(
            import_path, {**base, "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 0}}
        )
    with pytest.raises(ConfigError, match="either `num_replicas` or `autoscaling`, not both"):
        build_application(import_path, {**base, "num_replicas": 2, "autoscaling": {"max_replicas": 2}})


def test_bad_serve_configs_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: worlds\n    import_path: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*applications\.0\.import_path"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match="cannot import 'serve_apps.nowhere:app'"):
        build_application("serve_apps.nowhere:app", {})
    with pytest.raises(ConfigError, match=r"args.*max_body_bytes"):
        build_application("serve_apps.world_gateway:app_builder", {"max_body_bytes": -1})


def _request(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    """(status, JSON body, or the text of a body that is not JSON: the proxy's 404 before the app is up)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_worldgen_serve_runs_the_gateway_until_interrupted(tmp_path, stop):
    port = free_port()
    ignore_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731 - as a script's `serve &`
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worldgen",
            "serve",
            str(REPO / "configs/serve/worlds.yaml"),
            "--port",
            str(port),
        ],
        cwd=tmp_path,  # the config's `root: worlds` is relative to where it is served from
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore_ctrl_c,  # it must stop on Ctrl-C all the same
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if _request(base + "/openapi.json", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(1)
        params = {"preset": "tiny", "size": 32, "steps": 2}
        status, body = _request(
            base + "/v1/worlds", {"id": "cli", "template": "offline_world", "params": params}
        )
        assert status == 201, body
        assert (tmp_path / "worlds" / "cli" / "world.yaml").is_file()
        assert _request(base + "/v1/worlds/cli/step", {})[1]["step"] == 1
    finally:
        process.send_signal(stop)  # Serve shut down, the local Ray instance with it
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(
                f"`worldgen serve` did not stop within 120 s of Ctrl-C; its output ends:\n{output[-4000:]}"
            )
    assert f"worlds: {base}/" in output and "serving until Ctrl-C" in output and "interrupted" in output
    assert process.returncode == 130
