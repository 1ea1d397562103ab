"""Cluster plumbing, in one place: the project's namespace, connecting to (or starting) Ray, resolving and
probing cluster addresses, listing and stopping named actors, and torch threads for long-lived actors.

The model host, the world driver, the Ray executor, the gateway and the CLI use these; what is specific to
one kind of actor (a host's info, a driver's name) stays in that actor's module.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from typing import Any

import ray

from worldgen.errors import WorldgenError

NAMESPACE = os.environ.get("WORLDGEN_NAMESPACE", "worldgen")

PROBE_TIMEOUT_S = 5.0
NO_CLUSTER_HINT = "start one with `ray start --head` or pass --address"


class ClusterUnavailable(WorldgenError):
    """No Ray cluster answers where one was asked for (or it refused the connection)."""


# ---- connecting ----------------------------------------------------------------------------------------
def connect(address: str | None = None, *, new_local: bool = False, logging_level: str = "warning") -> str:
    """Connect this process to Ray once and return the cluster's GCS address.

    `address` (else RAY_ADDRESS) names the cluster. With neither: `new_local` starts a new local instance
    (never joining one that `ray start` left running here), otherwise Ray's default applies (a cluster
    running on this machine, else a new local instance)."""
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or ("local" if new_local else None)
        ray.init(address=target, logging_level=logging_level)
    return ray.get_runtime_context().gcs_address


def connect_existing(address: str | None) -> str:
    """Connect to a running cluster (never start one); returns its GCS address. Fails fast, with what to do,
    where Ray would retry for minutes (nothing listening, a stale record of a stopped local cluster)."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target == "local":
        raise ClusterUnavailable(f"'local' would start a new, empty Ray instance; {NO_CLUSTER_HINT}")
    where = target
    if target == "auto":
        resolved = resolve_local_address()
        if resolved:
            where = resolved
            require_cluster(resolved)
    else:
        require_cluster(target)
    try:
        ray.init(address=address or "auto", logging_level="error", log_to_driver=False)
    except Exception as err:
        if any(isinstance(e, ray.exceptions.AuthenticationError) for e in _chain(err)):
            raise ClusterUnavailable(
                f"the Ray cluster at {where} rejected the connection: it uses token authentication; make its "
                "token available as RAY_AUTH_TOKEN (or in ~/.ray/auth_token, or in a file named by "
                "RAY_AUTH_TOKEN_PATH) and set RAY_AUTH_MODE=token"
            ) from None
        if isinstance(err, (ConnectionError, RuntimeError, TimeoutError)):
            raise ClusterUnavailable(
                f"cannot connect to a Ray cluster at {where} ({first_line(err)}); {NO_CLUSTER_HINT}"
            ) from None
        raise
    return ray.get_runtime_context().gcs_address


def cluster_address() -> str | None:
    """The connected cluster's bootstrap address (so the state API never guesses between clusters)."""
    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


# ---- addresses -----------------------------------------------------------------------------------------
def host_port(address: str) -> tuple[str, int] | None:
    """'HOST:PORT' -> (host, port); None when `address` is not of that form."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def require_cluster(address: str) -> None:
    """Fail fast (instead of Ray's minutes of retries) when nothing listens at a HOST:PORT address."""
    if "://" in address:  # ray://… client and http://… addresses: left to Ray
        return
    target = host_port(address)
    if target is None:
        raise ClusterUnavailable(
            f"--address expects HOST:PORT (a Ray cluster's GCS address), got {address!r}"
        )
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterUnavailable(
            f"no Ray cluster is running at {address} ({err.strerror or err}); {NO_CLUSTER_HINT}"
        ) from None


def resolve_local_address() -> str | None:
    """Where `ray.init("auto")` would go (the cluster this machine runs), or None when Ray cannot say; raises
    ClusterUnavailable when no cluster runs here. A stale record of a stopped cluster would hang `ray.init`."""
    try:
        # Ray has no public resolver for "auto"; this private helper is what ray.init itself uses.
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without this helper: ray.init finds the cluster itself
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise ClusterUnavailable(f"no Ray cluster is running on this machine; {NO_CLUSTER_HINT}") from None
    except Exception:
        return None


# ---- named actors --------------------------------------------------------------------------------------
def named_actors(prefix: str, *, address: str | None = None, alive_only: bool = False) -> list[Any]:
    """The actors in the project's namespace whose names start with `prefix` (Ray state API records; dead
    ones left out, and with `alive_only` those not alive yet or restarting too). Needs the dashboard."""
    from ray.util.state import list_actors

    filters = [("ray_namespace", "=", NAMESPACE)]
    if alive_only:
        filters.append(("state", "=", "ALIVE"))
    actors = list_actors(address=address or cluster_address(), filters=filters, limit=10_000)
    return [a for a in actors if (a.name or "").startswith(prefix) and a.state != "DEAD"]


def get_named(name: str) -> Any:
    """The handle of the named actor in the project's namespace; ValueError when there is none."""
    return ray.get_actor(name, namespace=NAMESPACE)


def ask_named(name: str, method: str = "info", timeout: float = 30.0) -> Any:
    """Call a method without arguments on a named actor and wait for its answer (at most `timeout` s)."""
    return ray.get(getattr(get_named(name), method).remote(), timeout=timeout)


def kill_named(names: Iterable[str]) -> list[str]:
    """Stop the named actors for good (no restart); returns the names of those that were running.
    `ray.kill` is asynchronous: an actor may still be listed for a moment after."""
    killed = []
    for name in names:
        try:
            ray.kill(get_named(name), no_restart=True)
        except ValueError:  # already gone
            continue
        killed.append(name)
    return killed


def actor_placed(handle: Any) -> bool | None:
    """Whether an actor has been placed on a node (its worker process started; it may still be in its
    `__init__`); None when the state API cannot tell (no dashboard)."""
    from ray.util.state import get_actor

    try:
        actor = get_actor(handle._actor_id.hex(), address=cluster_address())  # Ray has no public id getter
    except Exception:
        return None
    return actor is not None and (actor.state == "ALIVE" or bool(actor.pid))  # placed: pid of its worker


# ---- nodes ---------------------------------------------------------------------------------------------
def may_add_nodes() -> bool:
    """Whether an autoscaler may add nodes. Ray has no public answer, so: autoscaler v2 (KubeRay) publishes
    its node groups; the v1 autoscaler (`ray up`) reports each node's type by name, while a cluster without
    an autoscaling config (a laptop, `ray start` by hand, `ray.cluster_utils.Cluster`) names every node's
    type after the node itself ("node_<id>"). Unreadable: assume it may grow (the wait is bounded)."""
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return True
        status = json.loads(_internal_kv_get("__autoscaling_status") or "{}")
        types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    except Exception:
        return True
    return any(kind != f"node_{node}" for node, kind in types.items())


# ---- threads -------------------------------------------------------------------------------------------
def set_torch_threads(reserved_cpus: float) -> int:
    """Torch intra-op threads for a long-lived actor: WORLDGEN_TORCH_THREADS when set, else its reserved CPUs,
    else (none reserved: a shared server) all the machine's cores. Ray would give such an actor one thread."""
    import torch

    explicit = os.environ.get("WORLDGEN_TORCH_THREADS")
    if explicit:
        threads = int(explicit)
    else:
        threads = max(1, int(reserved_cpus)) if reserved_cpus >= 1 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def reserved_cpus() -> float:
    """The CPUs Ray reserved for the calling actor or replica (0 when it reserved none)."""
    return ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


# ---- errors --------------------------------------------------------------------------------------------
def first_line(err: BaseException) -> str:
    """The first line of an error's message (Ray's carry tracebacks), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
