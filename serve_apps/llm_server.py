"""An OpenAI-compatible chat server for local transformers models and their LoRA adapters (Ray Serve).

    serve run configs/serve/llm.yaml          # or: serve run serve_apps.llm_server:app_builder models=...
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/llm/v1", api_key=os.environ["WORLDGEN_LLM_API_KEY"])

    GET  /v1/models                 the configured models and adapters (an adapter names its base as `parent`)
    GET  /v1/models/{id}            one of them
    POST /v1/chat/completions       OpenAI's request and response; `stream: true` answers server-sent events
                                    of chat.completion.chunk objects, ending with `data: [DONE]`

Two deployments: the FastAPI ingress (`LLMServer`: checks the key and the request, answers in OpenAI's shapes,
errors included) and the model deployment (`LLMModels`), which Serve multiplexes by model id: a request goes,
through a handle with `multiplexed_model_id`, to a replica that already holds its model when there is one.
A model id is a configured base model (a local transformers directory) or a LoRA adapter (a peft directory
on a named base); a replica loads each base once, however many of its adapters it serves, and attaches the
adapters to it (serve_apps/llm_runtime.py). Generation shares `llm/transformers`' code (chat template, greedy
at temperature 0, seeded sampling), so a model answers alike through the block and through this server.

`response_format: {"type": "json_object"}` is accepted and not enforced (no constrained decoding): callers
validate the JSON, as `llm/openai` does with its retries.

Optional bearer-token auth: when the environment variable named by `api_key_env` (WORLDGEN_LLM_API_KEY) is set
where the application is built (`serve run`: your shell; `serve deploy`: the cluster's environment), every
request, on every path (`/docs` and `/openapi.json` included), needs `Authorization: Bearer <key>`. Only the key's
SHA-256 reaches the deployments: the key is in no config, no deployment argument and no log.

Bounded work: a body over `max_body_bytes` gets 413 before anything reads it; `limits` (worldgen.limits.Limits)
caps `max_tokens` (`max_new_tokens`) and the characters of a chat (`max_prompt_chars`), and a prompt longer than the
model's context is refused after tokenizing, all with a 400 naming the limit before any generation starts.
"""

# No `from __future__ import annotations`: FastAPI resolves the handlers' annotations (`Request`) at runtime,
# and Serve's ingress wraps the methods, out of reach of this module's namespace.
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.auth import token_digest
from serve_apps.guard import DEFAULT_MAX_BODY_BYTES, BearerAuth, BodyLimit
from serve_apps.llm_runtime import DType, GenerationRequest, ModelRuntime, RequestError, ServedModel
from serve_apps.scaling import Scaling
from worldgen.errors import format_validation_error
from worldgen.limits import LimitExceeded, Limits

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


# ---- the application's arguments -----------------------------------------------------------------------
class AdapterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field(description="the name of the base model (a key of `models`) the adapter was trained on")
    path: str = Field(description="the peft adapter directory (adapter_config.json + weights)")


class LLMServerArgs(Scaling):
    """`args` of the application (in a Serve config file, or `serve run ... key=value`)."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(
        min_length=1, description="model name -> local transformers causal-LM directory"
    )
    adapters: dict[str, AdapterArgs] = Field(
        default_factory=dict, description="adapter name -> {base: model name, path: peft adapter directory}"
    )
    max_models_per_replica: int = Field(
        4, ge=1, description="model ids (bases and adapters) a replica keeps open; the least recent goes"
    )
    api_key_env: str = Field(
        "WORLDGEN_LLM_API_KEY",
        pattern=ENV_NAME,
        description="environment variable holding the API key (unset: no auth); never the key itself",
    )
    dtype: DType = Field("auto", description="weights' dtype; auto: the checkpoint's on GPU, float32 on CPU")
    default_max_tokens: int = Field(512, ge=1, description="tokens generated when a request sets no limit")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="larger request bodies get 413")
    limits: Limits = Field(
        default_factory=Limits,
        description="budgets of one request: max_new_tokens (max_tokens), max_prompt_chars (all messages)",
    )

    @field_validator("models")
    @classmethod
    def _named(cls, models: dict[str, str]) -> dict[str, str]:
        for name in models:
            if not name.strip():
                raise ValueError("model names must not be empty")
        return models

    @model_validator(mode="after")
    def _adapters_on_known_bases(self) -> "LLMServerArgs":
        for name, adapter in self.adapters.items():
            if not name.strip():
                raise ValueError("adapter names must not be empty")
            if name in self.models:
                raise ValueError(f"adapters.{name}: the name is taken by a model in `models`")
            if adapter.base not in self.models:
                known = ", ".join(sorted(self.models))
                raise ValueError(f"adapters.{name}.base: '{adapter.base}' is not in `models` ({known})")
        if self.default_max_tokens > self.limits.max_new_tokens:
            if "default_max_tokens" in self.model_fields_set:  # two settings that contradict each other
                raise ValueError(
                    f"default_max_tokens: {self.default_max_tokens} is over limits.max_new_tokens "
                    f"({self.limits.max_new_tokens})"
                )
            self.default_max_tokens = self.limits.max_new_tokens  # the default follows a lower limit
        return self


# ---- the OpenAI request --------------------------------------------------------------------------------
class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None

    def plain(self) -> dict[str, str]:
        """The message as the chat template takes it: text content ('developer' is the newer 'system')."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise RequestError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions request; fields this server does not use (user, logprobs, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    # Numbers and flags are strict, as the schema says: `true` is no token count, `"yes"` or 1 no flag.
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, strict=True, description="a torch generator's seed")
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: _StreamOptions | None = None
    response_format: _ResponseFormat | None = None
    n: int = Field(1, ge=1, le=1, strict=True, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def generation(self, limits: Limits) -> GenerationRequest:
        """What the model is asked; RequestError for content it cannot take, LimitExceeded (with the request
        field in `path`) for a request over the server's budgets."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None and max_tokens > limits.max_new_tokens:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise LimitExceeded(
                "max_new_tokens", f"{field} {max_tokens} is over {limits.max_new_tokens}", path=field
            )
        messages = [m.plain() for m in self.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits.max_prompt_chars:
            raise LimitExceeded(
                "max_prompt_chars",
                f"the messages hold {chars:,} characters, over {limits.max_prompt_chars:,}",
                path="messages",
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationRequest(
            messages=messages,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's defaults
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=[s for s in stop if s],
        )


# ---- answers -------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which its clients turn into typed exceptions."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(description="an adapter's base model; null for a base model")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int
    message: _AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion object (one choice)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[_Choice]
    usage: Usage


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape (ErrorResponse)."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _guard_reply(status: int, message: str) -> JSONResponse:
    """The guards' refusals (serve_apps/guard.py) in OpenAI's shape, with the codes its clients know."""
    if status == 401:
        return error_response(401, "missing or incorrect API key", code="invalid_api_key")
    return error_response(status, message)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route answers (all in OpenAI's shape)."""
    said = {
        400: "the request is malformed or over a limit (the message names the field or the limit)",
        401: "missing or incorrect API key (when the server has one)",
        404: "no such model",
        413: "request body over `max_body_bytes`",
        500: "the model failed",
    }
    return {status: {"model": ErrorResponse, "description": said[status]} for status in statuses}


# One server-sent event of a streamed completion (OpenAPI 3.1: a text/event-stream schema describes each event).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a chat.completion.chunk object as JSON ({error} if the model fails midway); "
            "the last event is [DONE]",
        }
    },
}


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _sse(
        {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    )


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(done: dict[str, Any]) -> dict[str, int]:
    prompt, completion = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- the ingress ---------------------------------------------------------------------------------------
api = FastAPI(
    title="worldgen LLM server",
    description="OpenAI-compatible chat completions for local transformers models and LoRA adapters.",
)
api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
api.state.token_sha256 = None
api.add_middleware(BodyLimit, reply=_guard_reply)
api.add_middleware(BearerAuth, reply=_guard_reply)  # the last added runs first: no key, no body read


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return error_response(err.status_code, str(err.detail), code=None)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    """OpenAI answers a malformed request with 400 (FastAPI's default is 422), naming the first bad field."""
    errors = err.errors()
    # malformed JSON, or a body FastAPI left as bytes because its Content-Type is not JSON
    if any(e.get("type") == "json_invalid" or isinstance(e.get("input"), bytes) for e in errors):
        return error_response(400, "the request body is not JSON (Content-Type: application/json)")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())]
    return error_response(400, format_validation_error(err), param=".".join(loc[1:]) or None)


def _openapi_without_422() -> dict[str, Any]:
    """The OpenAPI document without FastAPI's automatic 422 answers: validation errors are 400s here."""
    if api.openapi_schema is None:
        schema = FastAPI.openapi(api)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return api.openapi_schema


api.openapi = _openapi_without_422  # type: ignore[method-assign]


# The ingress only waits on the model replicas (streams included): a sliver of a CPU, many requests at once.
# Not 0: a replica that asks for no CPU may land on a head with CPU: 0 (cluster.yaml), whose work is the cluster's.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class LLMServer:
    """The HTTP side: OpenAI request checking and budgets, routing by model id, OpenAI-shaped answers (the
    key and the body size are checked by the app's guards)."""

    def __init__(
        self,
        models: DeploymentHandle,
        catalog: dict[str, str | None],
        key_sha256: str | None,
        limits: dict[str, Any] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.models = models
        self.catalog = catalog  # model id -> its base (adapters) or None (base models)
        self.limits = Limits.model_validate(limits or {})
        self.created = int(time.time())
        api.state.token_sha256 = key_sha256
        api.state.max_body_bytes = max_body_bytes

    def _model_card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "worldgen",
            "parent": self.catalog[name],
        }

    def _unknown(self, name: str) -> JSONResponse:
        return error_response(
            404,
            f"The model '{name}' does not exist; this server has: {', '.join(sorted(self.catalog))}",
            code="model_not_found",
            param="model",
        )

    @api.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def list_models(self) -> Any:
        return {"object": "list", "data": [self._model_card(name) for name in self.catalog]}

    @api.get("/v1/models/{name:path}", response_model=ModelCard, responses=_errors(401, 404))
    async def get_model(self, name: str) -> Any:
        return self._model_card(name) if name in self.catalog else self._unknown(name)

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "the completion; with `stream: true`, server-sent events of "
                "chat.completion.chunk objects ending with `data: [DONE]`",
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            },
            **_errors(400, 401, 404, 413, 500),
        },
    )
    async def chat_completions(self, chat: ChatCompletionRequest) -> Any:
        try:
            generation = chat.generation(self.limits).model_dump()
        except LimitExceeded as err:
            return error_response(400, err.detail, code="limit_exceeded", param=err.path)
        except RequestError as err:
            return error_response(400, str(err), param="messages")
        if chat.model not in self.catalog:
            return self._unknown(chat.model)
        if chat.stream:
            return await self._stream(chat, generation)
        try:
            done = await self.models.options(multiplexed_model_id=chat.model).complete.remote(generation)
        except Exception as err:  # noqa: BLE001 - answered in OpenAI's shape either way
            return self._failure(err)
        if "error" in done:
            return error_response(400, done["error"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done["text"]},
                    "logprobs": None,
                    "finish_reason": done["finish_reason"],
                }
            ],
            "usage": _usage(done),
        }

    async def _stream(self, chat: ChatCompletionRequest, generation: dict[str, Any]) -> Any:
        handle = self.models.options(multiplexed_model_id=chat.model, stream=True)
        events = handle.stream.remote(generation)
        try:
            first = await events.__anext__()  # "start" once the prompt is accepted: until then, a status code
        except Exception as err:  # noqa: BLE001
            events.cancel()
            return self._failure(err)
        if first["type"] == "error":
            events.cancel()
            return error_response(400, first["message"])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = bool(chat.stream_options and chat.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            try:
                yield _chunk(cid, created, chat.model, {"role": "assistant", "content": ""})
                async for event in events:
                    if event["type"] == "delta":
                        yield _chunk(cid, created, chat.model, {"content": event["text"]})
                    elif event["type"] == "end":
                        yield _chunk(cid, created, chat.model, {}, event["finish_reason"])
                        if usage:
                            yield _sse(
                                {
                                    "id": cid,
                                    "object": "chat.completion.chunk",
                                    "created": created,
                                    "model": chat.model,
                                    "choices": [],
                                    "usage": _usage(event),
                                }
                            )
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the status line is sent: report in the stream
                yield _sse({"error": {"message": _describe(err), "type": "server_error", "code": None}})
            finally:
                events.cancel()  # the client went away (or the stream ended): stop generating

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _failure(err: BaseException) -> JSONResponse:
        return error_response(500, f"the model failed: {_describe(err)}", type_="server_error")


def _describe(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}"


# ---- the models ----------------------------------------------------------------------------------------
@serve.deployment
class LLMModels:
    """Base models and LoRA adapters of one replica, multiplexed by model id (`serve.multiplexed`)."""

    def __init__(
        self,
        models: dict[str, str],
        adapters: dict[str, tuple[str, str]],
        max_models_per_replica: int,
        dtype: DType,
        default_max_tokens: int,
    ):
        self.runtime = ModelRuntime(models, adapters, dtype, default_max_tokens)
        runtime = self.runtime

        async def load_served_model(model_id: str) -> ServedModel:
            return await asyncio.to_thread(runtime.open, model_id)

        # Wrapped here rather than decorated on the class: the cache size is an argument of the application.
        self._model = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_served_model)

    # A request the model cannot serve comes back as {"error": ...} rather than as an exception: it is the
    # client's mistake (HTTP 400), not worth a traceback in the replica's log.
    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """Completion fields (Completion), or {"error": message}."""
        served = await self._model(serve.get_multiplexed_model_id())
        with served.in_use():  # entered before any await: an eviction waits for this request
            try:
                done = await asyncio.to_thread(served.complete, GenerationRequest.model_validate(request))
            except RequestError as err:
                return {"error": str(err)}
        return done.model_dump()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """ServedModel.stream's events, or one {"type": "error", "message"} event."""
        served = await self._model(serve.get_multiplexed_model_id())
        with served.in_use():
            try:
                async for event in served.stream(GenerationRequest.model_validate(request)):
                    yield event
            except RequestError as err:
                yield {"type": "error", "message": str(err)}

    def report(self) -> dict[str, Any]:
        """This replica's id and what it loaded (see ModelRuntime.report)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.runtime.report()}


# ---- the builder ---------------------------------------------------------------------------------------
def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """The application from its `args` (LLMServerArgs); reads the API key from the environment here."""
    try:
        settings = LLMServerArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        raise ValueError(f"llm server args: {format_validation_error(err)}") from None
    models = {name: str(Path(path).expanduser().resolve()) for name, path in settings.models.items()}
    adapters = {
        name: (a.base, str(Path(a.path).expanduser().resolve())) for name, a in settings.adapters.items()
    }
    key_sha256 = token_digest(settings.api_key_env)
    model_deployment = LLMModels.options(**settings.deployment_options()).bind(
        models, adapters, settings.max_models_per_replica, settings.dtype, settings.default_max_tokens
    )
    catalog: dict[str, str | None] = {name: None for name in models} | {
        name: base for name, (base, _) in adapters.items()
    }
    return LLMServer.bind(
        model_deployment, catalog, key_sha256, settings.limits.model_dump(), settings.max_body_bytes
    )
