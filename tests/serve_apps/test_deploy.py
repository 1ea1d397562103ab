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
    args = {**app_config.args, "root": str(tmp_path), "num_replicas": 2, "max_ongoing_requests": 7}
    app = build_application(app_config.import_path, args)
    assert isinstance(app, Application)
    # what Serve will run: one deployment, the gateway, with the config's options and args (Ray has no public
    # accessor for an application's bound deployment)
    deployment = app._bound_deployment
    assert deployment.name == "WorldGateway"
    assert (deployment.num_replicas, deployment.max_ongoing_requests) == (2, 7)
    settings, digest = deployment.init_args
    assert deployment.init_kwargs == {}
    assert settings == _settings(args, GatewaySettings().model_dump())  # every arg of the file, nothing lost
    assert settings["limits"]["max_worlds"] == 32 and settings["limits"]["stage_seconds"] == 900
    assert settings["trust"] == {"roots": [], "project_configs": False, "env": [], "urls": [], "models": []}
    # the token is read where the app is built, and only its digest travels to the replicas
    assert digest == hashlib.sha256(b"s3cret-token").hexdigest() and "s3cret" not in json.dumps(settings)


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
