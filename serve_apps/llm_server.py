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
request needs `Authorization: Bearer <key>`. Only the key's SHA-256 reaches the deployments: the key is in no
config, no deployment argument and no log.
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

from serve_apps.auth import bearer_ok, token_digest
from serve_apps.llm_runtime import DType, GenerationRequest, ModelRuntime, RequestError, ServedModel
from worldgen.errors import format_validation_error

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


# ---- the application's arguments -----------------------------------------------------------------------
class AdapterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field(description="the name of the base model (a key of `models`) the adapter was trained on")
    path: str = Field(description="the peft adapter directory (adapter_config.json + weights)")


class LLMServerArgs(BaseModel):
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
    num_replicas: int = Field(1, ge=1, description="replicas of the model deployment")
    ray_actor_options: dict[str, Any] | None = Field(
        None, description="the model deployment's actor options, e.g. {num_gpus: 1} (default: Serve's)"
    )
    dtype: DType = Field("auto", description="weights' dtype; auto: the checkpoint's on GPU, float32 on CPU")
    default_max_tokens: int = Field(512, ge=1, description="tokens generated when a request sets no limit")

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
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions request; fields this server does not use (user, logprobs, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="a torch generator's seed")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    response_format: _ResponseFormat | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def generation(self) -> GenerationRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationRequest(
            messages=[m.plain() for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's defaults
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=[s for s in stop if s],
        )


# ---- answers -------------------------------------------------------------------------------------------
def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: Any = None,
) -> JSONResponse:
    """An error in OpenAI's shape, which its clients turn into typed exceptions."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return format_validation_error(err), param


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


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return error_response(err.status_code, str(err.detail), code=None)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(400, str(err.errors()))


# The ingress only waits on the model replicas (streams included): no CPU reserved, many requests at once.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class LLMServer:
    """The HTTP side: auth, OpenAI request checking, routing by model id, OpenAI-shaped answers."""

    def __init__(self, models: DeploymentHandle, catalog: dict[str, str | None], key_sha256: str | None):
        self.models = models
        self.catalog = catalog  # model id -> its base (adapters) or None (base models)
        self.key_sha256 = key_sha256
        self.created = int(time.time())

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if bearer_ok(request.headers.get("authorization"), self.key_sha256):
            return None
        return error_response(401, "missing or incorrect API key", code="invalid_api_key")

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

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Any:
        if denied := self._unauthorized(request):
            return denied
        return {"object": "list", "data": [self._model_card(name) for name in self.catalog]}

    @api.get("/v1/models/{name:path}")
    async def get_model(self, name: str, request: Request) -> Any:
        if denied := self._unauthorized(request):
            return denied
        return self._model_card(name) if name in self.catalog else self._unknown(name)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        if denied := self._unauthorized(request):
            return denied
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not JSON")
        try:
            chat = ChatCompletionRequest.model_validate(body)
            generation = chat.generation().model_dump()
        except ValidationError as err:
            message, param = _validation_message(err)
            return error_response(400, message, param=param)
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
    options: dict[str, Any] = {"num_replicas": settings.num_replicas}
    if settings.ray_actor_options is not None:
        options["ray_actor_options"] = settings.ray_actor_options
    model_deployment = LLMModels.options(**options).bind(
        models, adapters, settings.max_models_per_replica, settings.dtype, settings.default_max_tokens
    )
    catalog: dict[str, str | None] = {name: None for name in models} | {
        name: base for name, (base, _) in adapters.items()
    }
    return LLMServer.bind(model_deployment, catalog, key_sha256)
