"""The world driver: one long-lived, named Ray actor per world, owning the `World` and running its steps.

    world = RemoteWorld("worlds/harbor", config)      # creates the driver, or finds the running one
    world.step(action="a storm rolls in")             # -> the step report as a dict
    world.run(3); world.state(); world.history(); world.info(); world.progress()

The world persists its resume point (`progress.jsonl`) as its stages finish, so the driver itself keeps nothing
that is not on disk. Ray restarts a driver that dies (`max_restarts`), and its `__init__` continues the world from its directory, so a
crash costs at most the stage in flight: no episode is lost and none is saved twice. A call in flight when the
driver dies fails (`max_task_retries=0`, typically `ray.exceptions.ActorUnavailableError`, a `RayActorError`);
the caller steps again, which first finishes the interrupted step.

Steps on one world are serialised: the driver's default concurrency group runs one method at a time. The
read-only `progress()`, `info()`, `state()`, `episodes()` and `artifact()` run in a separate group ("read"), so
they answer while a step runs (they read what is persisted, or the state object, which a step replaces whole).

Drivers are detached and named `wg-world-<directory name>-<hash of the resolved directory>` in the project's
namespace, created with `get_if_exists=True`: any process connected to the cluster reaches the same driver, and
finding it needs the directory alone (nothing is read from it).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import ray

from actors.cluster import (
    NAMESPACE,
    ask_named,
    connect,
    kill_named,
    named_actors,
    reserved_cpus,
    set_torch_threads,
)
from worldgen.errors import ConfigError
from worldgen.limits import Limits
from worldgen.media import MEDIA_TYPES, kind_of
from worldgen.storage import WorldStorage, world_location
from worldgen.stores import is_uri

PREFIX = "wg-world-"
_START_ATTEMPTS = 3  # tries to reach a driver that concurrent creates of one world keep replacing

Config = Mapping[str, Any] | str | Path


# ---- naming and config checks --------------------------------------------------------------------------
def _resolve(directory: str | Path) -> str:
    """The world's location: a store URI as given, a local directory resolved (`world_location`)."""
    return world_location(directory)


def _dir_hash(directory: str | Path) -> str:
    return hashlib.sha1(_resolve(directory).encode()).hexdigest()[:10]


def _load(config: Config) -> dict[str, Any]:
    """The config as the world directory stores it, so that it compares like with like with world.yaml."""
    from worldgen.world import stored_config

    return stored_config(config)


def _check(directory: str | Path, config: Config | None) -> None:
    """Refuses a missing config for a new directory and (WorldExistsError, `WorldStorage.check_same_world`) a
    config that differs from the world already there."""
    storage = WorldStorage(directory)
    if config is None:
        if not storage.exists():
            raise ConfigError(
                f"no world in {directory} (no {storage.config_path.name}) and no config given: pass the "
                "world's config to start a new world there, or the directory of an existing world to continue it",
                file=str(directory),
            )
        return
    storage.check_same_world(_load(config))


def driver_name(directory: str | Path) -> str:
    """The driver's actor name: `wg-world-<directory name>-<short hash of the resolved directory>`, from the
    directory alone (nothing is read: a driver is found before, or without, opening its world). Two worlds
    of one directory name in different places get different drivers; a world on a store URI gets the same
    name on every node."""
    location = _resolve(directory)
    name = urlsplit(location).path if is_uri(location) else location
    return f"{PREFIX}{name_slug(PurePosixPath(name).name)}-{_dir_hash(location)}"


def name_slug(name: object) -> str:
    """A world's name as it appears in actor names and world ids: letters, digits, `_.-`, at most 48."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name or "world")).strip("-.")[:48] or "world"


# ---- artifacts -----------------------------------------------------------------------------------------
class ArtifactNotFound(ConfigError, LookupError):
    """No readable artifact at that path (outside the world, not a media file, or missing)."""


def read_artifact(storage: WorldStorage, path: str, start: int = 0, stop: int | None = None) -> bytes:
    """A media file's bytes (all of them, or [start, stop)): only the world's own artifacts
    (`WorldStorage.read_artifact`), never its config or content, nor a file that leaves the world (`..`,
    absolute, symlinks, hard links from outside)."""
    return _artifact_call(storage.read_artifact, path, start, stop)


def artifact_size(storage: WorldStorage, path: str) -> int:
    """A media file's size in bytes, checked as `read_artifact` checks it."""
    return _artifact_call(storage.artifact_size, path)


def _artifact_call(call: Any, path: str, *args: Any) -> Any:
    if kind_of(path) is None:
        raise ArtifactNotFound(f"artifact {path!r}: expected a media file ({', '.join(MEDIA_TYPES)})")
    try:
        return call(path, *args)
    except ConfigError as err:
        raise ArtifactNotFound(str(err)) from None
    except OSError:
        raise ArtifactNotFound(f"artifact {path!r} does not exist") from None


# ---- the actor -----------------------------------------------------------------------------------------
@ray.remote(concurrency_groups={"read": 4})
class WorldDriver:
    """Owns one `World`: runs its steps one at a time and answers about it. Restarted by Ray, it resumes.

    `limits` (a `Limits` as a dict; None: no budget) are constructor arguments so that a driver Ray restarts
    runs its world under the same limits."""

    def __init__(
        self,
        directory: str,
        config: Mapping[str, Any] | str | None = None,
        limits: Mapping[str, Any] | None = None,
        claim: str | None = None,
    ):
        self.directory = _resolve(directory)
        self.limits = Limits.model_validate(limits) if limits is not None else None
        self.created = False  # True when this driver created the world's directory
        self._claim = claim  # the token of the create call that started this driver (see `created_for`)
        self.started = time.time()
        self.error: Exception | None = None
        self._lock = threading.Lock()  # guards the snapshot `progress()` reads from another thread
        self._running = False
        self._last: tuple[str, str] | None = None  # (role, "ran" | "skipped") of the last stage finished
        with warnings.catch_warnings():  # Ray 2.60 warns about an API it uses internally here
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        # The world's models run in this process: use the CPUs reserved for it, or the machine's cores when
        # none are (as a model host does; Ray would otherwise leave torch one thread).
        set_torch_threads(reserved_cpus())
        # A world that cannot be opened does not fail the actor's creation (a creation error only says "the
        # actor died", and an actor with concurrency groups aborts noisily on that exit): the error is kept
        # and every call raises it; `get_or_create_driver` raises it and removes the driver.
        try:
            self.world = self._open(config)
        except Exception as err:
            self.error = err
            return
        self._snapshot = self._make_snapshot()
        self.world.callbacks.append(self._on_stage)

    def _open(self, config: Mapping[str, Any] | str | None) -> Any:
        """`World.load` for a directory that holds a world (a restart lands here), else `World.from_config`."""
        from worldgen.world import World

        self.resumed = WorldStorage(self.directory).exists()
        if self.restarted:  # the world was opened before: its world.yaml is the config, nothing else is read
            return World.load(self.directory, limits=self.limits)
        _check(self.directory, config)  # config required for a new world; the same world for an old one
        if self.resumed:
            return World.load(self.directory, limits=self.limits)
        world = World.from_config(config, self.directory, limits=self.limits)
        self.created = world.created
        return world

    def _ok(self) -> None:
        if self.error is not None:
            raise self.error

    @ray.method(concurrency_group="read")
    def ready(self) -> bool:
        """True once the world is open; raises the error that kept it from opening."""
        self._ok()
        return True

    @ray.method(concurrency_group="read")
    def created_for(self, claim: str) -> bool:
        """True when this driver created its world for the create call that passed `claim`: of concurrent
        creates of one world (which share its driver), exactly one is told it created it."""
        self._ok()
        return self.created and claim == self._claim

    # ---- progress (answered from the "read" group while a step runs) -----------------------------------
    def _make_snapshot(self) -> dict[str, Any]:
        p = self.world.progress
        return {
            "step": p.step,  # steps completed
            "stage_index": p.stage_index,  # stages of the step in flight done (0: no step in flight)
            "running": self._running,
            "last_stage": self._last[0] if self._last else None,
            "last_outcome": self._last[1] if self._last else None,
            "ran": list(p.ran),
            "skipped": list(p.skipped),
            "time": time.time(),
        }

    def _on_stage(self, role: str, outcome: str, step: int) -> None:
        self._last = (role, outcome)
        snapshot = self._make_snapshot()
        with self._lock:
            self._snapshot = snapshot

    def _set_running(self, running: bool) -> None:
        self._running = running
        snapshot = self._make_snapshot()
        with self._lock:
            self._snapshot = snapshot

    @ray.method(concurrency_group="read")
    def progress(self) -> dict[str, Any]:
        """Where the world stands: steps completed, stages of the step in flight done, the last stage."""
        self._ok()
        with self._lock:
            return dict(self._snapshot, pid=os.getpid())

    @ray.method(concurrency_group="read")
    def info(self) -> dict[str, Any]:
        """Who and where: world name, directory, step, stage index, process, episodes saved."""
        self._ok()
        snapshot = self.progress()
        episodes = self.world.storage.episodes()
        return {
            "name": self.world.settings.name,
            "title": self.world.content.title,
            "directory": self.directory,
            "actor": ray.get_runtime_context().get_actor_name(),
            "step": snapshot["step"],
            "stage_index": snapshot["stage_index"],
            "running": snapshot["running"],
            "pid": os.getpid(),
            "episodes": len(episodes),
            "last_episode": episodes[-1] if episodes else None,
            "resumed": self.resumed,
            "restarted": self.restarted,
            "started": self.started,
        }

    # ---- the world (default group: one at a time) -------------------------------------------------------
    def step(self, action: str | None = None, state: Any = None) -> dict[str, Any]:
        """One pass around the cycle (or the rest of a pass a crash interrupted); the report as a dict."""
        self._ok()
        self._set_running(True)
        try:
            return self.world.step(action=action, state=state).to_dict()
        finally:
            self._set_running(False)

    def run(self, steps: int, action: str | None = None) -> list[dict[str, Any]]:
        """`steps` passes (`World.run`: the report files are written at the end); `action` goes to the first."""
        self._ok()
        self._set_running(True)
        try:
            return [report.to_dict() for report in self.world.run(int(steps), action=action)]
        finally:
            self._set_running(False)

    def report(self) -> str:
        """Write report.md / report.html of every episode; returns the HTML report's path."""
        self._ok()
        return str(self.world.storage.write_report())

    @ray.method(concurrency_group="read")
    def state(self) -> dict[str, Any]:
        """The state in flight (five blocks + id) as JSON."""
        self._ok()
        return self.world.state.model_dump(mode="json")

    @ray.method(concurrency_group="read")
    def episodes(self, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        """A page of saved episodes, oldest first: {"total", "offset", "limit", "items"} (items as `history`)."""
        self._ok()
        total = len(self.world.storage.episodes())
        return {
            "total": total,
            "offset": offset,
            "limit": limit,
            "items": self.world.history(offset=offset, limit=limit),
        }

    @ray.method(concurrency_group="read")
    def artifact(self, path: str, start: int = 0, stop: int | None = None) -> bytes:
        """The bytes of a media file under `episodes/` or `artifacts/` of the world directory: all of them, or
        [start, stop) (a range request reads only its slice). Anything else, a path that leaves the directory
        (`..`, absolute, symlinks) or a missing file raises ArtifactNotFound."""
        self._ok()
        return read_artifact(self.world.storage, path, start, stop)

    @ray.method(concurrency_group="read")
    def artifact_size(self, path: str) -> int:
        """The size in bytes of what `artifact(path)` reads (a range request is resolved against it)."""
        self._ok()
        return artifact_size(self.world.storage, path)

    @ray.method(concurrency_group="read")
    def history(self) -> list[dict[str, Any]]:
        """Every saved episode: number, five blocks, meta."""
        self._ok()
        return self.world.history()


# ---- creating and finding drivers ----------------------------------------------------------------------
def get_or_create_driver(
    directory: str | Path,
    config: Config | None = None,
    *,
    max_restarts: int = -1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    limits: Limits | None = None,
    wait: bool = True,
    timeout: float | None = None,
    claim: str | None = None,
) -> Any:
    """The driver actor of the world in `directory`: the running one, or a new one (named, detached).

    A new directory needs `config` (a mapping or a config file path); an existing one is continued (a config
    given for it must be the same world). Ray restarts a driver that dies up to `max_restarts` times (-1:
    always); calls in flight when it dies fail and are not retried. With `wait`, returns once the world is
    open, and a world that cannot be opened (a bad config) raises its error here and leaves no driver behind.
    `claim`: a token of the caller's own; `handle.created_for.remote(claim)` then tells whether this call's
    driver created the world (see `WorldDriver.created_for`).
    A new driver runs its world under `limits` (None: no budget); a running one keeps the limits it has.

    Resources: `num_cpus=None` is Ray's actor default, on purpose: 1 CPU to be *placed*, none held while it
    runs. So a driver never lands on a node without CPUs (the head of cluster.yaml has `CPU: 0`), and the
    worlds a gateway keeps open (mostly idle, between steps) do not fence off the CPUs their steps' Ray tasks
    need; a driver's own work (inline blocks, storage writes, the loop) is light, the models run on their
    hosts. A number reserves that many CPUs for the driver's life (`driver_num_cpus` of the gateway).
    """
    connect()
    directory = _resolve(directory)
    if isinstance(config, (str, Path)):
        config = str(Path(config).expanduser().resolve())  # the actor's working directory may differ
    elif config is not None:
        config = _load(config)  # `ref:`s read here, relative to the caller's working directory
    _check(directory, config)  # on the caller's side: a new world needs a config, an old one the same world
    name = driver_name(directory)
    options: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "lifetime": "detached",
        "max_restarts": max_restarts,
        "max_task_retries": 0,
    }
    if num_cpus is not None:  # None: Ray's default, 1 CPU to place and 0 to hold (see above)
        options["num_cpus"] = num_cpus
    if num_gpus is not None:
        options["num_gpus"] = num_gpus
    failures = 0
    limits_data = limits.model_dump() if limits is not None else None
    while True:
        handle = WorldDriver.options(**options).remote(str(directory), config, limits_data, claim)
        if not wait:
            return handle
        try:
            ray.get(handle.ready.remote(), timeout=timeout)
        except ray.exceptions.RayTaskError as err:
            ray.kill(handle, no_restart=True)  # free the name for a corrected config
            cause = err.cause
            raise (cause if isinstance(cause, Exception) else err) from None
        except ray.exceptions.RayActorError:
            # a driver found by name whose world failed to open for a concurrent caller, who removed it:
            # start again (a new driver, or the one a third caller started meanwhile)
            failures += 1
            if failures == _START_ATTEMPTS:
                raise
            continue
        # The name may have led to a driver that a concurrent call started with another config for the same
        # directory (`get_if_exists` ignores ours): the world it opened must be ours. Its driver is left running.
        _check(directory, config)
        return handle


def list_worlds(address: str | None = None) -> list[dict[str, Any]]:
    """Running world drivers in the project's namespace, each with its `info()` (answered even mid-step)."""
    worlds = []
    for actor in named_actors(PREFIX, address=address):
        entry = {"actor": actor.name, "actor_id": actor.actor_id, "state": actor.state, "pid": actor.pid}
        try:
            entry |= ask_named(actor.name, "info")
        except Exception as err:  # restarting, or failed to start: still listed
            entry["error"] = f"{type(err).__name__}: {err}"
        worlds.append(entry)
    return sorted(worlds, key=lambda w: w["actor"])


def stop_world(directory: str | Path) -> list[str]:
    """Stop the driver of the world in `directory` for good (the world stays on disk); returns its name, or
    nothing when none was running. Its name comes from the directory alone, so no listing is needed."""
    return kill_named([driver_name(directory)])


# ---- the blocking Python API ---------------------------------------------------------------------------
class RemoteWorld:
    """A world run by its driver actor, with blocking calls (`timeout` in seconds, None: wait)."""

    def __init__(
        self,
        directory: str | Path,
        config: Config | None = None,
        *,
        max_restarts: int = -1,
        timeout: float | None = None,
        **options: Any,
    ):
        self.directory = _resolve(directory)
        self.name = driver_name(self.directory)
        self.timeout = timeout
        self.handle = get_or_create_driver(
            self.directory, config, max_restarts=max_restarts, timeout=timeout, **options
        )

    def _get(self, ref: Any) -> Any:
        return ray.get(ref, timeout=self.timeout)

    def _read(self, method: str, attempts: int = 5) -> Any:
        """A read-only call, tried again when it reached a driver that was restarting (safe: it changes nothing)."""
        for attempt in range(attempts):
            try:
                return self._get(getattr(self.handle, method).remote())
            except ray.exceptions.ActorUnavailableError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def step(self, action: str | None = None, state: Any = None) -> dict[str, Any]:
        """One step. Not retried: when the driver dies mid-step this raises (a `ray.exceptions.RayActorError`)
        and the next `step()` first finishes the interrupted one from its last persisted stage."""
        return self._get(self.handle.step.remote(action, state))

    def run(self, steps: int, action: str | None = None) -> list[dict[str, Any]]:
        return self._get(self.handle.run.remote(steps, action))

    def run_until(self, step: int, attempts: int = 5) -> int:
        """Step until `step` steps are complete, stepping again when the driver dies mid-step (each retry
        finishes the interrupted step from its last persisted stage, so nothing runs twice); returns the
        number of steps completed."""
        failures = 0
        while (done := self.info()["step"]) < step:
            try:
                self.step()
            except ray.exceptions.RayActorError:
                failures += 1
                if failures >= attempts:
                    raise
        return done

    def report(self) -> str:
        return self._get(self.handle.report.remote())

    def state(self) -> dict[str, Any]:
        return self._read("state")

    def history(self) -> list[dict[str, Any]]:
        return self._read("history")

    def info(self) -> dict[str, Any]:
        return self._read("info")

    def progress(self) -> dict[str, Any]:
        return self._read("progress")

    def kill(self) -> None:
        """Crash the driver (as a failure would): Ray restarts it and it resumes from the world directory."""
        ray.kill(self.handle, no_restart=False)

    def shutdown(self) -> None:
        """Stop the driver for good; the world stays on disk (a new RemoteWorld(directory) continues it)."""
        ray.kill(self.handle, no_restart=True)

    def __repr__(self) -> str:
        return f"RemoteWorld({self.name!r}, directory='{self.directory}')"
