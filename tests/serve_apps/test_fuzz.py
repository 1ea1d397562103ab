"""Fuzzing the three Serve applications through their own OpenAPI documents (issue 10, deliverable 4).

Each app runs on real Ray Serve over HTTP on 127.0.0.1 (as in test_world_gateway.py, worldgen/nodes/test_endpoint.py and
test_llm_server.py). Schemathesis turns every operation of the app's `/openapi.json` into Hypothesis strategies;
`fuzz()` sends a fixed number of schema-conforming (positive) and schema-violating (negative) requests per
operation, derandomized (the same requests on every run), and checks every answer:

- not_a_server_error: no 5xx, whatever the request;
- status_code_conformance, content_type_conformance, response_schema_conformance: the answer is one the
  document promises (status code, media type, body schema);
- negative_data_rejection: a request that violates the schema gets a 4xx.

Every failure is collected (no shrinking: a failing request is reported as sent, with a curl line), so one run
lists all it found; the test fails with that list. A request with no answer within REQUEST_SECONDS is a failure
too (unbounded work). The requests sent per app are printed in the terminal summary.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve_apps.test_llm_server import llm_server
from tests.serve_apps.test_world_gateway import SMALL
from tests.worldgen.nodes.test_endpoint import T2I
from tests.worldgen.nodes.test_llm import CHAT_TEMPLATE, _tiny_causal_lm

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
REJECTED_BY_SIZE = [check for check in CHECKS if check is not negative_data_rejection]
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
REQUEST_SECONDS = 60  # no answer by then: unbounded work (a tiny model answers in well under a second)
TOKEN = "fuzz-token-5c1d"
APP_SECONDS = 240  # the most one app's fuzzing may take (the three take about a minute each when they pass)
REPLICA_MEMORY = 4 << 30  # private memory a graph replica may take: a runaway allocation fails fast
# The graph app's budgets (issue 10: sizes, steps and iterations bounded before a run);
# small, so that the fuzz checks refusals rather than the CPU's throughput.
GRAPH_LIMITS = {"max_image_side": 64, "max_steps": 4, "max_iterations": 4, "max_count": 2}

Prepare = Callable[[schemathesis.Case], None]


@dataclass
class FuzzRun:
    """What one app's fuzzing sent and found."""

    deadline: float  # time.monotonic() after which no more requests are sent
    seconds: float = 0.0
    requests: int = 0
    unsent: int = 0
    failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        return f"{len(self.failures)} failing of {self.requests} requests:\n" + "\n".join(self.failures)


RUNS: dict[str, FuzzRun] = {}  # app -> its run, for the terminal summary


def fuzz(
    app: str,
    base_url: str,
    *,
    examples: int,
    pinned: dict[str, dict[str, str]] | None = None,
    prepare: Prepare | None = None,
    seconds: float = APP_SECONDS,
) -> FuzzRun:
    """Send `examples` positive and `examples` negative requests to each operation of the app at `base_url`
    (its `/openapi.json`, read with the token). `pinned`: operation label -> path parameters for a second
    round on that operation (e.g. an existing world, to reach past the 404). `prepare` may steer a positive
    case towards real work before it is sent (e.g. a model the server has). Requests stop after `seconds`:
    an app that answers too slowly fails rather than holding CI."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers, timeout=30)
    started = time.monotonic()
    run = FuzzRun(deadline=started + seconds)
    rounds: list[tuple[Any, dict[str, str] | None]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        rounds.append((operation, None))
        if pinned and operation.label in pinned:
            rounds.append((operation, pinned[operation.label]))
    for operation, path_parameters in rounds:
        for mode in MODES:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
            steer = prepare if mode is schemathesis.GenerationMode.POSITIVE else None
            _send_all(run, strategy, f"{operation.label} [{mode.value}]", base_url, headers, examples, steer)
    if run.unsent:
        run.failures.append(f"- {run.unsent} requests not sent: the app's {seconds:.0f} s were spent")
    run.seconds = time.monotonic() - started
    RUNS[app] = run
    return run


def _send_all(
    run: FuzzRun,
    strategy: Any,
    label: str,
    base_url: str,
    headers: dict[str, str],
    examples: int,
    prepare: Prepare | None,
) -> None:
    """Send `examples` cases of `strategy` and check each answer, adding what fails to `run.failures`."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case: schemathesis.Case) -> None:
        if time.monotonic() > run.deadline:
            run.unsent += 1
            return
        if prepare is not None:
            prepare(case)
        run.requests += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=REQUEST_SECONDS)
        except requests.Timeout:
            run.failures.append(f"- {label}: no answer in {REQUEST_SECONDS} s\n    {_curl(case)}")
            return
        # 413 (the body is over max_body_bytes, answered before it is parsed) is a rejection too, which
        # schemathesis's negative-data check does not count as one
        checks = CHECKS if response.status_code != 413 else REJECTED_BY_SIZE
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            titles = "; ".join(sorted({f.title for f in group.exceptions}))
            said = response.text[:300].replace("\n", " ")
            run.failures.append(
                f"- {label}: {response.status_code} {titles}\n    {_curl(case)}\n    -> {said}"
            )

    with suppress(Unsatisfiable):  # nothing to violate (no parameters, no body): no negative case exists
        send()


def _curl(case: schemathesis.Case, most: int = 400) -> str:
    """The request as a curl line (without the token), cut to `most` characters."""
    line = case.as_curl_command()
    return line if len(line) <= most else line[:most] + "…"


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary(pytestconfig) -> Iterator[None]:
    """Print the requests sent per app once the module is done, whatever pytest's capture setting."""
    yield
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None and RUNS:
        runs = ", ".join(f"{app}: {r.requests} in {r.seconds:.0f} s" for app, r in RUNS.items())
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\nfuzz requests per app: {runs}")


# ---- the apps --------------------------------------------------------------------------------------------
@contextmanager
def deployed(app: Any, name: str, serve_url: str) -> Iterator[str]:
    """`app` on the session's Serve under /`name` while the `with` lasts; its base URL."""
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_url}/{name}"
    finally:
        serve.delete(name)


def built_with_token(builder: Callable[[dict[str, Any]], Any], args: dict[str, Any], env: str) -> Any:
    """The application built while `env` holds TOKEN (builders keep only its digest), as in production."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(env, TOKEN)
        return builder(args)


def cap_replica_memory(app: str, deployment: str) -> None:
    """Limit the private memory of the app's replica processes: an allocation the fuzz provokes (a huge image,
    say) then fails inside the replica instead of taking the shared test machine down."""
    from ray.util.state import list_actors

    from actors.cluster import cluster_address

    if not hasattr(resource, "prlimit"):  # Linux only; elsewhere the fuzz runs uncapped
        return
    name = f"ServeReplica:{app}:{deployment}"
    replicas = list_actors(
        address=cluster_address(), filters=[("class_name", "=", name), ("state", "=", "ALIVE")]
    )
    assert replicas, f"no replica of {name}"
    for replica in replicas:
        resource.prlimit(replica.pid, resource.RLIMIT_DATA, (REPLICA_MEMORY, REPLICA_MEMORY))


@pytest.fixture(scope="module")
def gateway_url(serve_url, tmp_path_factory) -> Iterator[str]:
    """The world gateway behind a token, holding one world ("harbor") with an episode and its image."""
    from serve_apps.world_gateway import app_builder

    root = tmp_path_factory.mktemp("fuzz-worlds")
    app = built_with_token(app_builder, {"root": str(root), "token_env": "WG_FUZZ_TOKEN"}, "WG_FUZZ_TOKEN")
    with deployed(app, "gateway-fuzz", serve_url) as url, requests.Session() as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        assert client.post(f"{url}/v1/worlds", json={"id": "harbor", **SMALL}, timeout=300).status_code == 201
        for _ in range(2):  # the second step saves episode 1 with an image
            assert client.post(f"{url}/v1/worlds/harbor/step", timeout=300).status_code == 200
        try:
            yield url
        finally:  # stop every driver the fuzz may have started
            for world in client.get(f"{url}/v1/worlds", timeout=60).json()["worlds"]:
                client.delete(f"{url}/v1/worlds/{world['id']}", timeout=60)


@pytest.fixture(scope="module")
def graph_url(serve_url) -> Iterator[str]:
    """The tiny text-to-image graph behind a token, its replica's memory capped."""
    from serve_apps.graph_app import app_builder

    args: dict[str, Any] = {
        "graph": str(T2I),
        "token_env": "WG_FUZZ_GRAPH_TOKEN",
        "ray_actor_options": {"num_cpus": 0},
        "limits": GRAPH_LIMITS,
    }
    app = built_with_token(app_builder, args, "WG_FUZZ_GRAPH_TOKEN")
    with deployed(app, "graph-fuzz", serve_url) as url:
        cap_replica_memory("graph-fuzz", "GraphEndpoint")
        yield url


@pytest.fixture(scope="module")
def llm_url(serve_url, tmp_path_factory) -> Iterator[str]:
    """The LLM server with one tiny random-initialised model ("tiny"), behind a key, with small budgets."""
    model = _tiny_causal_lm(tmp_path_factory.mktemp("fuzz-llm") / "tiny", CHAT_TEMPLATE)
    limits = {"max_new_tokens": 16, "max_prompt_chars": 2000}
    with llm_server(
        serve_url, {"tiny": model}, key=TOKEN, key_env="WG_FUZZ_LLM_KEY", name="llm-fuzz", limits=limits
    ) as url:
        yield url.removesuffix("/v1")


# ---- the fuzz --------------------------------------------------------------------------------------------
def test_fuzz_world_gateway(gateway_url):
    world = {"world_id": "harbor"}
    pinned = {
        f"GET /v1/worlds/{{world_id}}{path}": world
        for path in ("", "/state", "/episodes", "/episodes/{number}", "/artifacts/{path}")
    }
    run = fuzz("world gateway", gateway_url, examples=30, pinned=pinned)
    assert not run.failures, run.report()


def test_fuzz_graph_endpoint(graph_url):
    run = fuzz("graph endpoint", graph_url, examples=100)
    assert not run.failures, run.report()


def _the_served_model(case: schemathesis.Case) -> None:
    """Send the schema-conforming chat requests to the served model, so that they reach generation (a random
    model name only ever gets 404; test_llm_server.py checks that answer)."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"


def test_fuzz_llm_server(llm_url):
    pinned = {"GET /v1/models/{name}": {"name": "tiny"}}
    run = fuzz("LLM server", llm_url, examples=60, pinned=pinned, prepare=_the_served_model)
    assert not run.failures, run.report()
