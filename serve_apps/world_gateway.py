"""The world gateway: worlds over HTTP, a Ray Serve application with a FastAPI ingress.

    serve run serve_apps.world_gateway:app_builder root=worlds        # or: worldgen serve configs/serve/worlds.yaml

Every world lives in `<root>/<world id>/` and is owned by its world driver actor (actors/world_driver.py); the
gateway only talks to drivers, so steps on one world are serialised by its driver while different worlds step
in parallel, and any gateway replica reaches the same driver by name: a replica holds no per-world state, so
the gateway runs several (`num_replicas`, or `autoscaling`) and each answer names its replica (`X-Replica-Id`).

While a world's driver is down (crashed, restarting, not running, or silent past `driver_timeout_s`), the GET
routes answer from the world's storage (serve_apps/world_reads.py; `info()["driver"]` says "unavailable") and a
step answers 503 with `Retry-After` (`retry_after_s`). Reads never start a driver; a step does.

    POST   /v1/worlds                          create: {"id"?, "config": {...}} or {"id"?, "template", "params"};
                                               201, or 200 when the id holds the same world, 409 another
    GET    /v1/worlds                          the worlds under the root
    GET    /v1/worlds/{id}                     info (answered during a step)
    GET    /v1/worlds/{id}/state               the state in flight (five blocks)
    POST   /v1/worlds/{id}/step                {"action"?, "state"?}; `?stream=true` (or Accept: text/event-stream) streams
                                               the stages as server-sent events, then the report
    GET    /v1/worlds/{id}/episodes            ?offset=0&limit=20, oldest first, artifacts with URLs
    GET    /v1/worlds/{id}/episodes/{n}        one episode
    GET    /v1/worlds/{id}/artifacts/{path}    a file of an episode (or of the state in flight): an image, a video
                                               (MP4, WebM, its animated WebP preview) or a sound (WAV, FLAC, OGG),
                                               with its MIME type; a `Range: bytes=...` request gets 206 and only
                                               that slice (a player seeks), one past the end 416; HEAD too
    DELETE /v1/worlds/{id}                     stop the driver and delete the world directory
    GET    /docs, /openapi.json                OpenAPI docs

Optional bearer-token auth: when the environment variable named by `token_env` (WORLDGEN_API_TOKEN) is set
where the application is built, every request, on every path (`/docs` and `/openapi.json` included), needs
`Authorization: Bearer <token>`; only the token's SHA-256 travels to the replicas. Request bodies larger than
`max_body_bytes` get 413.

`trust` (worldgen.trust.TrustPolicy) says what a posted config may use (files under roots, environment names
in secret fields, URLs, model sources); anything else is refused with 400 before a world is built.
`limits` (worldgen.limits.Limits) go to every world driver the gateway starts: generation settings over them
are refused before any model runs (400 at create), a stage past `stage_seconds` answers 504 (nothing of it is
kept; the next step resumes), and a create beyond `max_worlds` answers 409.
"""

# No `from __future__ import annotations`: FastAPI must see the request models on the methods Serve wraps.
import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.exceptions import RayServeException

from actors.cluster import get_named
from actors.world_driver import (
    ArtifactNotFound,
    artifact_size,
    driver_name,
    get_or_create_driver,
    name_slug,
    read_artifact,
    stop_world,
)
from serve_apps.auth import token_digest
from serve_apps.guard import DEFAULT_MAX_BODY_BYTES, BearerAuth, BodyLimit
from serve_apps.scaling import Scaling
from serve_apps.world_reads import open_root, saved_episodes, saved_info, saved_state
from worldgen.errors import ConfigError, StepInFlightError, WorldgenError, format_validation_error
from worldgen.limits import DeadlineExceeded, Limits
from worldgen.media import MEDIA_TYPES, media_type
from worldgen.storage import WorldDamagedError, WorldExistsError, WorldStorage
from worldgen.stores import is_uri
from worldgen.trust import TrustPolicy, admit_config

WORLD_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_WORLD_ID = re.compile(WORLD_ID)
_POLL_SECONDS = 0.1  # how often a streamed step asks its driver for progress


# ---- requests and responses ----------------------------------------------------------------------------
class CreateWorld(BaseModel):
    """A new world from a world config or from a world template and its parameters."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(
        None, pattern=WORLD_ID, description="the world's id (default: its name + a suffix)"
    )
    config: dict[str, Any] | None = Field(None, description="a world config, as in configs/worlds/*.yaml")
    template: str | None = Field(None, description="a world template name, e.g. offline_world")
    params: dict[str, Any] = Field(default_factory=dict, description="the template's parameters")

    @model_validator(mode="after")
    def _one_source(self) -> "CreateWorld":
        if (self.config is None) == (self.template is None):
            raise ValueError("give exactly one of `config` or `template`")
        if self.params and self.template is None:
            raise ValueError("`params` go with `template`")
        return self


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str | None = Field(None, max_length=4000, description="what the user does (goes to Development)")
    state: dict[str, Any] | None = Field(
        None,
        description="blocks the user gives, {block number: content} (DESIGN.md §2.3): 1, 4 and 5 text, 2 a "
        "generation config (its `reference` may name an earlier episode's image of this world); validated by the "
        "world (400 naming the field). Block 3 (files) is not taken over HTTP",
    )


class GatewaySettings(Scaling):
    """`args` of the application (a Serve config's `args:` or `serve run ... key=value`)."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field(
        "worlds",
        description="folder holding one directory per world, or a store URI every node reaches (s3://bucket/worlds)",
    )
    token_env: str = Field("WORLDGEN_API_TOKEN", description="env var with the bearer token (unset: no auth)")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="larger request bodies get 413")
    page_limit: int = Field(100, gt=0, description="the most episodes one page may ask for")
    driver_timeout_s: float = Field(
        2.0,
        gt=0,
        description="a driver that does not answer a read or a readiness probe in this time counts as down: "
        "reads are answered from the world's storage, steps get 503 + Retry-After",
    )
    retry_after_s: int = Field(5, ge=1, description="the Retry-After of a 503 while a world's driver is down")
    max_ongoing_requests: int = Field(200, ge=1, description="per replica (a streamed step holds one)")
    driver_num_cpus: float | None = Field(None, ge=0, description="CPUs reserved by each world driver")
    trust: TrustPolicy = Field(
        default_factory=TrustPolicy,
        description="what posted configs may use: files under roots, env names, URLs, model sources",
    )
    limits: Limits = Field(
        default_factory=Limits,
        description="budgets of every world (generation, stage time) and the world count",
    )


# ---- the application -----------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong")


# Documented on every route (the OpenAPI document promises what a client may get; schemathesis holds us to it).
# 422 (FastAPI's validation errors) is documented by FastAPI on the routes that take parameters.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "a body that is not JSON, a world that cannot be built, or over a limit",
    },
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token (when the gateway has one)"},
    404: {"model": ErrorResponse, "description": "no such world, episode or artifact"},
    409: {
        "model": ErrorResponse,
        "description": "the id holds another world or a damaged one, or the server holds `max_worlds` worlds",
    },
    413: {"model": ErrorResponse, "description": "request body over `max_body_bytes`"},
    500: {"model": ErrorResponse, "description": "the world failed (the message says where)"},
    503: {
        "model": ErrorResponse,
        "description": "the world's driver is down or restarting: retry after `Retry-After` seconds (reads are "
        "answered from the world's storage meanwhile)",
    },
    504: {"model": ErrorResponse, "description": "a stage ran past `stage_seconds`; stepping again resumes"},
}

api = FastAPI(
    title="worldgen world gateway",
    version="1",
    description="Create worlds, step them, read their state and episodes, fetch their images.",
    responses=_ERRORS,
)
api.state.max_body_bytes = GatewaySettings.model_fields["max_body_bytes"].default
api.state.token_sha256 = None
api.add_middleware(BodyLimit)
api.add_middleware(BearerAuth)  # the last added runs first: no token, no body read


@api.middleware("http")
async def _replica_header(request: Request, call_next: Any) -> Response:
    """Every answer names the replica that gave it (`X-Replica-Id`): any replica answers any world, and an
    operator (or a test) can see which did."""
    response = await call_next(request)
    with contextlib.suppress(RayServeException):  # outside a replica (a test's TestClient): no header
        response.headers["X-Replica-Id"] = serve.get_replica_context().replica_id.unique_id
    return response


class DriverUnavailable(HTTPException):
    """The world's driver cannot answer now (dead, restarting, not running, too slow): 503 with Retry-After.
    Read routes catch it and answer from the world's storage instead (`WorldGateway.read`)."""

    def __init__(self, why: str, retry_after_s: int):
        super().__init__(
            503,
            f"the world's driver is unavailable ({why}); retry",
            headers={"Retry-After": str(retry_after_s)},
        )


# One event of a streamed step (OpenAPI 3.1: a text/event-stream schema describes each event).
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["stage", "report", "error"]},
        "data": {"type": "string", "description": "JSON: a stage's progress, the step's report, or an error"},
    },
}


# A world's error -> the answer's status, by type (the first that matches): the client's mistakes are 4xx.
# Every error the gateway answers with goes through here (`_status`), whether a driver call or starting a
# driver raised it.
_STATUS_BY_ERROR: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    (ArtifactNotFound, 404),
    # the id holds another world, or a damaged one; or the world's step in flight must finish first
    ((WorldDamagedError, WorldExistsError, StepInFlightError), 409),
    (
        DeadlineExceeded,
        504,
    ),  # a stage ran past `stage_seconds`: nothing of it is kept, stepping again resumes
    # the world's (posted) config asks for what it may not: over a limit (the message names it), a prompt
    # template the sandbox stops, a placement no node fits
    (ConfigError, 400),
    (WorldgenError, 500),
)


def _status(error: BaseException) -> int | None:
    """The status `_STATUS_BY_ERROR` gives this error (None: not a world's error)."""
    for kind, status in _STATUS_BY_ERROR:
        if isinstance(error, kind):
            return status
    return None


def _http_error(error: BaseException, detail: str | None = None) -> HTTPException:
    """The answer to a world's error: the status its type has in `_STATUS_BY_ERROR` (500 for any other error)
    and its message (or `detail`)."""
    status = _status(error)
    if status is None:
        return HTTPException(500, detail or f"{type(error).__name__}: {error}")
    return HTTPException(status, detail or str(error))


# Every media type the world writes, for the artifact route's document.
_MEDIA_CONTENT: dict[str, Any] = {media: {} for media in sorted(set(MEDIA_TYPES.values()))}
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str | None) -> tuple[int | None, int | None] | None:
    """A Range header's one byte range as (first, last): `bytes=a-b` -> (a, b), `bytes=a-` -> (a, None), the
    suffix `bytes=-n` -> (None, n). None when there is no header, or one to ignore (malformed, a-b with b < a,
    several ranges): HTTP lets a server answer those with the whole file."""
    match = _RANGE.match(header or "")
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first = int(match.group(1)) if match.group(1) else None
    last = int(match.group(2)) if match.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


def resolve_range(wanted: tuple[int | None, int | None], size: int) -> tuple[int, int] | None:
    """(start, stop) of a parsed range in a file of `size` bytes, or None when it cannot be satisfied (it
    starts at or past the end; a suffix of 0 bytes)."""
    first, last = wanted
    if first is None:  # the last `last` bytes
        if last == 0 or size == 0:
            return None
        return max(0, size - last), size
    if first >= size:
        return None
    return first, size if last is None else min(last + 1, size)


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@serve.deployment
@serve.ingress(api)
class WorldGateway:
    def __init__(self, settings: dict[str, Any], token_sha256: str | None):
        # No per-world state lives in a replica (no cached handles, locks or counters): a driver is found by its
        # name, which the world's directory gives, and a world's facts are its driver's or its storage's, so any
        # replica answers any world and a replica that goes away loses nothing.
        self.settings = GatewaySettings.model_validate(settings)
        self.root = open_root(self.settings.root)
        api.state.token_sha256 = token_sha256
        api.state.max_body_bytes = self.settings.max_body_bytes

    # ---- helpers ---------------------------------------------------------------------------------------
    def directory(self, world_id: str) -> Path | str:
        """Where the world `world_id` lives under the root: a directory, or a URI on a store."""
        if not _WORLD_ID.match(world_id):
            raise HTTPException(404, f"no world {world_id!r} (ids match {WORLD_ID})")
        return WorldStorage.join(self.root, world_id)

    def world(self, world_id: str) -> Path | str:
        """The directory of an existing world (404 when there is none)."""
        directory = self.directory(world_id)
        if not WorldStorage.is_world(directory):
            raise HTTPException(404, f"no world {world_id!r}")
        return directory

    async def driver(self, world_id: str) -> Any:
        """The world's driver, up and answering, for a step: the running one (503 + Retry-After when it does
        not answer a readiness probe within `driver_timeout_s`: restarting), or one started to continue the
        world from its directory."""
        directory = self.world(world_id)
        try:
            handle = get_named(driver_name(directory))
        except ValueError:
            try:
                return await asyncio.to_thread(self._start, directory, None)
            except WorldgenError as err:  # a damaged world (409), one that cannot be opened (4xx/5xx)
                raise _http_error(err) from None
        await self.call(handle.ready.remote(), timeout=self.settings.driver_timeout_s)
        return handle

    async def read(
        self, world_id: str, ask: Callable[[Any], Any], saved: Callable[[WorldStorage], Any]
    ) -> Any:
        """A read of a world: `ask(driver)` (a driver call) when its driver is running and answers within
        `driver_timeout_s`, else `saved(storage)` from the world's storage. Reads never start a driver, so a
        world whose driver is down (crashed, restarting, on a lost node) keeps answering what it saved."""
        directory = self.world(world_id)
        try:
            handle = get_named(driver_name(directory))
        except ValueError:
            handle = None  # not running
        if handle is not None:
            try:
                return await self.call(ask(handle), timeout=self.settings.driver_timeout_s)
            except DriverUnavailable:
                pass
        try:
            return await asyncio.to_thread(saved, WorldStorage(directory))
        except WorldgenError as err:  # damage (409), a missing episode or artifact (404)
            raise _http_error(err) from None
        except OSError as err:  # the storage itself cannot be read now: the same answer as a driver down
            raise DriverUnavailable(
                f"and its storage cannot be read: {err}", self.settings.retry_after_s
            ) from None

    def _start(self, directory: Path, config: dict[str, Any] | None, claim: str | None = None) -> Any:
        return get_or_create_driver(
            directory,
            config,
            num_cpus=self.settings.driver_num_cpus,
            limits=self.settings.limits,
            claim=claim,
        )

    def world_dirs(self) -> list[Path] | list[str]:
        """The directories of the worlds under the root, sorted."""
        return WorldStorage.world_dirs(self.root)

    async def call(self, ref: Any, timeout: float | None = None) -> Any:
        """Await a driver call; world errors become 4xx/5xx with their message (a damaged world, or another
        world where one was expected: 409), a dead driver (or one silent past `timeout`) DriverUnavailable."""
        try:
            return await (ref if timeout is None else asyncio.wait_for(ref, timeout))
        except ray.exceptions.RayTaskError as err:
            raise _http_error(err.cause) from None
        except ray.exceptions.RayActorError as err:
            raise DriverUnavailable(
                f"restarting: {type(err).__name__}", self.settings.retry_after_s
            ) from None
        except TimeoutError:
            raise DriverUnavailable(
                f"no answer within {timeout} s (setting 'driver_timeout_s')", self.settings.retry_after_s
            ) from None

    def with_urls(self, request: Request, world_id: str, episode: dict[str, Any]) -> dict[str, Any]:
        """Each artifact's URL (and a video's preview's, `preview_url`)."""
        base = f"{request.scope.get('root_path', '')}/v1/worlds/{world_id}/artifacts/"
        for ref in episode.get("state", {}).get("artifacts") or []:
            ref["url"] = base + ref["path"]
            if ref.get("preview"):
                ref["preview_url"] = base + ref["preview"]
        return episode

    # ---- worlds ----------------------------------------------------------------------------------------
    @api.post(
        "/v1/worlds",
        status_code=201,
        responses={
            200: {"description": "the id holds this same world already: the world"},
            409: {"description": "the id holds another world, or a damaged one"},
        },
    )
    async def create(self, body: CreateWorld, response: Response) -> dict[str, Any]:
        """201 and the new world; 200 and the world when the id holds this same world already; 409 when it
        holds another. Of concurrent creates of one id exactly one gets 201: the world directory's atomic claim
        (`WorldStorage.create`) decides, whichever gateway replica each request reaches."""
        if body.template is not None:
            from worldgen.templates import build_world_template

            try:  # a graph or pipeline template is a 400 that lists the world templates
                config = build_world_template(body.template, **body.params)
            except (WorldgenError, TypeError, ValueError) as err:
                message = str(err)  # the registry's own errors name the template; a builder's may not
                if repr(body.template) not in message and f"'{body.template}'" not in message:
                    message = f"template {body.template!r}: {message}"
                raise HTTPException(400, message) from None
        else:
            config = body.config
        try:  # a posted config (and a template's params) is held to the server's trust policy
            config = admit_config(config, self.settings.trust)
        except ConfigError as err:
            raise HTTPException(400, f"cannot create the world: {err}") from None
        name = config.get("name") if isinstance(config, dict) else None
        world_id = body.id or f"{name_slug(name)}-{uuid.uuid4().hex[:8]}"
        directory = self.directory(world_id)
        claim = uuid.uuid4().hex  # tells this request's create from a concurrent one's (`created_for`)
        # 409, not 429: the refusal is about the server's state (the worlds it holds), waiting does not lift it
        # (a DELETE does), and clients retry a 429 on their own.
        limit = self.settings.limits.max_worlds
        if not WorldStorage.is_world(directory) and len(self.world_dirs()) >= limit:
            raise HTTPException(
                409, f"this server holds {limit} worlds, its most (limit 'max_worlds'); delete one first"
            )
        try:
            handle = await asyncio.to_thread(self._start, directory, config, claim)
        except WorldExistsError as err:
            raise _http_error(err, f"world {world_id!r} exists already, with another config") from None
        except (WorldgenError, ValidationError, TypeError, ValueError, KeyError) as err:
            if _status(err) == 409:  # a damaged world there: kept as it is
                raise _http_error(err) from None
            # a world that never opened leaves no folder; one that is not empty belongs to another request
            if isinstance(directory, Path):  # nothing is written on a store before the claim
                with contextlib.suppress(OSError):
                    directory.rmdir()
            message = format_validation_error(err) if isinstance(err, ValidationError) else str(err)
            raise HTTPException(400, f"cannot create the world: {message}") from None
        if not await self.call(handle.created_for.remote(claim)):
            response.status_code = 200  # this same world was there already, or another request just made it
        return {"id": world_id, **await self.call(handle.info.remote())}

    @api.get("/v1/worlds")
    async def all_worlds(self) -> dict[str, Any]:
        worlds = []
        for directory in self.world_dirs():
            entry: dict[str, Any] = {"id": WorldStorage.name_of(directory)}
            try:
                handle = get_named(driver_name(directory))
                entry |= {
                    "running": True,
                    **await self.call(handle.info.remote(), timeout=self.settings.driver_timeout_s),
                }
            except (ValueError, HTTPException, WorldgenError):
                entry |= {"running": False, "episodes": len(WorldStorage(directory).episodes())}
            worlds.append(entry)
        return {"worlds": worlds}

    @api.get("/v1/worlds/{world_id}")
    async def info(self, world_id: str) -> dict[str, Any]:
        """The world's info; `driver`: "running" (its driver answered) or "unavailable" (from its storage)."""
        directory = str(self.world(world_id))

        def saved(storage: WorldStorage) -> dict[str, Any]:
            return {**saved_info(storage, directory), "driver": "unavailable"}

        async def ask(handle: Any) -> dict[str, Any]:
            return {**await handle.info.remote(), "driver": "running"}

        return {"id": world_id, **await self.read(world_id, ask, saved)}

    @api.get("/v1/worlds/{world_id}/state")
    async def state(self, world_id: str) -> dict[str, Any]:
        return await self.read(world_id, lambda handle: handle.state.remote(), saved_state)

    @api.post(
        "/v1/worlds/{world_id}/step",
        responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}},
    )
    async def step(
        self,
        world_id: str,
        request: Request,
        body: StepRequest | None = None,
        stream: bool = Query(False, description="stream the stages as server-sent events"),
    ) -> Any:
        handle = await self.driver(world_id)
        action, state = (body.action, body.state) if body else (None, None)
        if state and any(str(key).strip() == "3" for key in state):
            # block 3 names files the world would read and copy in: the server reads no file a request names
            raise HTTPException(400, "state.3: block 3 (artifact files) cannot be sent over HTTP")
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(self._stream(handle, action, state), media_type="text/event-stream")
        return await self.call(handle.step.remote(action, state))

    async def _stream(
        self, handle: Any, action: str | None, state: dict[str, Any] | None = None
    ) -> AsyncIterator[str]:
        """`stage` events as the driver reports finished stages, then one `report` (or `error`) event."""
        done = asyncio.ensure_future(self.call(handle.step.remote(action, state)))
        seen = None
        while True:
            finished = await asyncio.wait({done}, timeout=_POLL_SECONDS)
            try:
                progress = await self.call(handle.progress.remote())
            except HTTPException:
                progress = None
            key = progress and (progress["step"], progress["stage_index"], progress["last_stage"])
            if progress and progress["last_stage"] and key != seen:
                seen = key
                yield _event("stage", progress)
            if finished[0]:
                break
        try:
            yield _event("report", done.result())
        except HTTPException as err:
            yield _event("error", {"status": err.status_code, "detail": err.detail})

    # ---- episodes and artifacts ------------------------------------------------------------------------
    @api.get("/v1/worlds/{world_id}/episodes")
    async def episodes(
        self,
        world_id: str,
        request: Request,
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1),
    ) -> dict[str, Any]:
        if limit > self.settings.page_limit:
            # in FastAPI's validation-error shape, as the document promises for 422
            message = f"at most {self.settings.page_limit} episodes per page (setting 'page_limit')"
            raise HTTPException(422, [{"loc": ["query", "limit"], "msg": message, "type": "value_error"}])
        page = await self.read(
            world_id,
            lambda handle: handle.episodes.remote(offset, limit),
            lambda storage: saved_episodes(storage, offset, limit),
        )
        page["items"] = [self.with_urls(request, world_id, e) for e in page["items"]]
        return page

    @api.get("/v1/worlds/{world_id}/episodes/{number}")
    async def episode(self, world_id: str, number: int, request: Request) -> dict[str, Any]:
        start = max(number - 1, 0)
        page = await self.read(
            world_id,
            lambda handle: handle.episodes.remote(start, 1),
            lambda storage: saved_episodes(storage, start, 1),
        )
        if number < 1 or not page["items"] or page["items"][0]["episode"] != number:
            raise HTTPException(404, f"world {world_id!r} has no episode {number} ({page['total']} saved)")
        return self.with_urls(request, world_id, page["items"][0])

    @api.get(
        "/v1/worlds/{world_id}/artifacts/{path:path}",
        response_class=Response,
        responses={
            200: {"content": _MEDIA_CONTENT, "description": "the whole file"},
            206: {
                "content": _MEDIA_CONTENT,
                "description": "the slice a `Range: bytes=...` header asked for",
            },
            416: {"model": ErrorResponse, "description": "the range starts past the file's end"},
        },
    )
    async def artifact(self, world_id: str, path: str, request: Request) -> Response:
        """A media file with its MIME type. One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`) is answered
        206 with that slice alone, read from the file as such (seeking in a long clip never sends it whole); a
        Range header this does not understand (or several ranges) is ignored, as HTTP allows: 200, the file."""
        headers = {"Accept-Ranges": "bytes"}
        wanted = parse_range(request.headers.get("range"))
        if wanted is None:
            data = await self.artifact_bytes(world_id, path)
            return Response(data, media_type=media_type(path), headers=headers)
        size = await self.artifact_length(world_id, path)
        span = resolve_range(wanted, size)
        if span is not None:
            data = await self.artifact_bytes(world_id, path, *span)
            if data:  # empty only when the file shrank since its size was read: past the end after all
                headers["Content-Range"] = f"bytes {span[0]}-{span[0] + len(data) - 1}/{size}"
                return Response(data, status_code=206, media_type=media_type(path), headers=headers)
        raise HTTPException(
            416,
            f"range {request.headers['range']!r} is past the end of {path} ({size} bytes)",
            headers=headers | {"Content-Range": f"bytes */{size}"},
        )

    async def artifact_bytes(
        self, world_id: str, path: str, start: int = 0, stop: int | None = None
    ) -> bytes:
        """An artifact's bytes (or [start, stop)), from the driver or, when it is down, the storage (the same
        checks: `actors.world_driver.read_artifact`)."""
        return await self.read(
            world_id,
            lambda handle: handle.artifact.remote(path, start, stop),
            lambda storage: read_artifact(storage, path, start, stop),
        )

    async def artifact_length(self, world_id: str, path: str) -> int:
        return await self.read(
            world_id,
            lambda handle: handle.artifact_size.remote(path),
            lambda storage: artifact_size(storage, path),
        )

    @api.head("/v1/worlds/{world_id}/artifacts/{path:path}", include_in_schema=False)
    async def artifact_head(self, world_id: str, path: str) -> Response:
        """What GET would answer, without the body: a player asks for the size before it asks for ranges."""
        size = await self.artifact_length(world_id, path)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(size)}
        return Response(media_type=media_type(path), headers=headers)

    @api.delete("/v1/worlds/{world_id}", status_code=204)
    async def delete(self, world_id: str) -> Response:
        directory = self.directory(world_id)
        if not WorldStorage(directory).exists():
            raise HTTPException(404, f"no world {world_id!r}")
        stop_world(directory)  # none running: nothing to stop. A step in flight fails (503).
        await asyncio.to_thread(WorldStorage(directory).remove)
        return Response(status_code=204)


def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """The gateway application from its `args` (GatewaySettings); reads the token from the environment here."""
    try:
        settings = GatewaySettings.model_validate(dict(args or {}))
    except ValidationError as err:
        raise ValueError(f"world gateway args: {format_validation_error(err)}") from None
    if is_uri(settings.root):  # a store that cannot be used is refused here, naming the setting
        open_root(settings.root)
    else:  # replicas may start in another working directory
        settings.root = str(Path(settings.root).expanduser().resolve())
    digest = token_digest(settings.token_env)
    deployment = WorldGateway.options(
        **settings.deployment_options(), max_ongoing_requests=settings.max_ongoing_requests
    )
    # a replica needs its settings, not how many of it run (re-validated there, both would read as given)
    replica_settings = settings.model_dump(exclude={"num_replicas", "autoscaling", "ray_actor_options"})
    return deployment.bind(replica_settings, digest)
