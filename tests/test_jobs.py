"""A world run submitted as a Ray job (`ray job submit --working-dir …`) to a `ray start --head` cluster.

The cluster is private to this module, like the one in worldgen/test_cli_models.py (whose helpers it reuses): its own
temp dir, free ports, and its own process group, stopped by signalling `ray start --block` (never `ray stop`,
which would stop every Ray on the machine). Token authentication is on, set up the way Ray documents it for
`ray start` clusters: `ray get-auth-token --generate` writes a token file (here under a throwaway HOME, so the
user's ~/.ray/auth_token is neither read nor overwritten), the head starts with RAY_AUTH_MODE=token and the
file (RAY_AUTH_TOKEN_PATH), and the submitting client passes the same token as RAY_AUTH_TOKEN with
RAY_AUTH_MODE=token. Nothing disables authentication.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.worldgen.test_cli_models import _client_env, _free_port, _ray_executable, _stop, start_head

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 300
CLI_TIMEOUT_S = 60


def _get(url: str, token: str | None = None) -> int:
    """HTTP status of a GET to the dashboard (with a bearer token when given); 0 when nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening (yet)
        return 0


@pytest.fixture(scope="module")
def head():
    """A private `ray start --head` with token auth; yields its dashboard URL, token and temp dir."""
    ray = _ray_executable()
    temp_dir = Path(tempfile.mkdtemp(prefix="wgjob-", dir="/tmp"))  # short: Ray's unix sockets live under it
    proc = None
    try:
        generated = subprocess.run(
            [ray, "get-auth-token", "--generate"],
            env=_client_env(HOME=str(temp_dir)),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        token_file = temp_dir / ".ray" / "auth_token"
        assert generated.returncode == 0 and token_file.is_file(), generated.stderr
        token = token_file.read_text().strip()
        assert token and generated.stdout.strip() == token

        dashboard_port = _free_port()
        env = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        proc, log_path = start_head(temp_dir, env, dashboard_port)
        url = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while _get(f"{url}/api/version", token) != 200:  # up once the dashboard answers an authorised request
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "token": token, "temp_dir": temp_dir}
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_cli(
    *args: str, token: str, cwd: Path, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """A `ray` command run as a user would: token auth on, the token in RAY_AUTH_TOKEN, no RAY_ADDRESS."""
    return subprocess.run(
        [_ray_executable(), *args],
        env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_job_server_requires_the_token(head):
    assert _get(f"{head['url']}/api/jobs/") == 401
    assert _get(f"{head['url']}/api/jobs/", token="not-the-token") == 403
    assert _get(f"{head['url']}/api/jobs/", token=head["token"]) == 200


def test_world_run_submitted_as_a_job_writes_its_world(head, tmp_path):
    out = tmp_path / "world"
    job_id = f"wg-test-{secrets.token_hex(4)}"
    started = time.monotonic()
    submitted = _ray_cli(
        "job",
        "submit",
        "--address",
        head["url"],
        "--working-dir",
        str(ROOT),
        "--submission-id",
        job_id,
        "--",
        sys.executable,
        "-m",
        "worldgen",  # worldgen/__main__.py: the `worldgen` command
        "run",
        "configs/worlds/default.yaml",  # relative: resolved in the uploaded working dir, the job's cwd
        "--steps",
        "2",  # step 1 fills blocks 1-3, step 2 completes and saves the first episode
        "--out",
        str(out),
        token=head["token"],
        cwd=tmp_path,  # not the repository: the job must not depend on where it was submitted from
        timeout=JOB_TIMEOUT_S,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert f"Job '{job_id}' succeeded" in output, output[-4000:]
    assert "saved episode 1" in output  # the job's own log, streamed back by `ray job submit`
    print(f"job {job_id} submitted and finished in {time.monotonic() - started:.1f}s")

    request = urllib.request.Request(
        f"{head['url']}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head['token']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        info = json.load(response)
    assert info["status"] == "SUCCEEDED", info
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_"), info["runtime_env"]  # uploaded

    # The world directory the job wrote.
    assert (out / "world.yaml").is_file()
    episode = out / "episodes" / "000001"
    state = json.loads((episode / "state.json").read_text())
    assert isinstance(state, dict) and state
    pngs = sorted(episode.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert not (out / "episodes" / "000002").exists()

    # What was uploaded: the package unpacked on the node holds the code and configs, not envs or git history.
    (unpacked,) = [
        p
        for p in (head["temp_dir"] / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
        if p.is_dir()
    ]
    assert (unpacked / "worldgen" / "cli.py").is_file()
    assert (unpacked / "configs" / "worlds" / "default.yaml").is_file()
    for left_out in (".venv", ".git", "worlds", "outputs"):
        assert not (unpacked / left_out).exists(), left_out


def test_working_dir_upload_leaves_out_envs_worlds_and_outputs():
    """The exclusions `ray job submit --working-dir .` applies to this repository, checked for paths that may not
    exist here yet (a world directory, outputs): Ray's defaults (.git, .venv, __pycache__) plus .gitignore."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    excludes = [_get_excludes(ROOT, ray_constants.get_runtime_env_default_excludes())]
    excludes += get_excludes_from_ignore_files(ROOT, include_gitignore=True)

    def uploaded(relative: str) -> bool:
        path = ROOT
        for part in Path(relative).parts:  # as Ray walks the tree: an excluded directory stops the walk
            path = path / part
            if any(exclude(path) for exclude in excludes):
                return False
        return True

    for kept in (
        "worldgen/cli.py",
        "configs/worlds/default.yaml",
        "pyproject.toml",
        "actors/world_driver.py",
    ):
        assert uploaded(kept), kept
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "worlds/harbor/episodes/000001/000.png",
        "outputs/text_to_image_seed0.png",
        "worldgen/__pycache__/cli.cpython-311.pyc",
        "worldgen.egg-info/PKG-INFO",
    ):
        assert not uploaded(left_out), left_out
