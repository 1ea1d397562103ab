"""Graph endpoints: any graph or pipeline served over HTTP by a Ray Serve deployment with a FastAPI ingress.

    serve run configs/serve/graph.yaml
    serve run serve_apps.graph_app:app_builder graph=configs/graphs/text_to_image_tiny.yaml

    GET  /  (or /spec)  {name, level, inputs, outputs, options}: each exposed port with kind, optional/default, doc
    POST /run           {"inputs": {...}, "seed": 0, "iterations": null, "encoding": "png" | "tensor",
                         "fps": 16 (video outputs), "sample_rate": null (audio outputs)}
                        -> {"outputs": {...}, "encoding": "png", "seed": 0}
    GET  /docs          OpenAPI docs: the request and response schemas are built from the graph's ports

Values travel in the wire format of worldgen/nodes/endpoint.py: text/int/scalar/json as JSON values; tensors
(latents, embeddings…) as `{dtype, shape, data_base64}` (raw little-endian bytes: lossless); images as
`{"png_base64": [one PNG per batch item]}` by default, or as tensors with `"encoding": "tensor"` (what endpoint
nodes use, so a remote run reproduces a local one exactly). An image input is accepted either way. By default
too, a video output is `{"mp4_base64": [one MP4 (H.264) per clip], "fps": ...}` at the request's `fps` (default 16)
and an audio output `{"wav_base64": [one WAV per sound], "sample_rate": ...}` at the graph's `sample_rate` output
(else the request's `sample_rate`); `"encoding": "tensor"` sends them as tensors too. An optional
input given as null is the same as leaving it out (the graph's default applies).

Every request is checked before anything runs: the schema (strict types, the seed's range), then the graph's own
constraints (each block's `check_inputs`: the scheduler's steps, sizes that are positive multiples of the VAE's
scale factor, prompt lists that agree with the batch) and the server's budgets (`limits`: worldgen/limits.py).

Status codes: 401 without the bearer token (every path, /docs and /openapi.json included, when a token is set);
413 for a body over `max_body_bytes`; 422 for a request that does not fit the schema (the body's `detail` names
the field); 400 for inputs the graph refuses or a budget they exceed (`{detail: {error, message, limit?}}`, the
message naming the input and the limit); 500 only when the run itself fails (the message says where).

Args (`app_builder`, validated by `GraphAppArgs`): `graph` (file, saved directory or template:NAME), `params`
(template parameters), `executor`, `num_replicas` or `autoscaling` (serve_apps/scaling.py), `ray_actor_options`, `limits`, `max_body_bytes`, and
`token_env`: the environment variable holding a bearer token every request must carry (default
WORLDGEN_API_TOKEN, as the world gateway; read where the app is built, only its SHA-256 reaches replicas). With no
token the endpoint is open to whoever reaches Serve's HTTP port, and says so loudly in the logs.

The graph is loaded once per replica; its models load lazily on the first run, in the replica's pool (executor
`local`, the default) or on the cluster's model host actors (executor `ray`).
"""

import base64
import io
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.auth import token_digest
from serve_apps.guard import DEFAULT_MAX_BODY_BYTES, BearerAuth, BodyLimit
from serve_apps.scaling import Scaling
from worldgen.config import load_config_file
from worldgen.engine import Engine
from worldgen.errors import ConfigError, GraphError, WorldgenError, format_validation_error
from worldgen.graph import Graph
from worldgen.limits import DEFAULT_LIMITS, LimitExceeded, Limits
from worldgen.media import MAX_FPS, encode_audio, encode_video
from worldgen.nodes.endpoint import (
    ENCODINGS,
    TENSOR_KINDS,
    UNSERVED_KINDS,
    decode_png,
    decode_tensor,
    decode_value,
    encode_value,
)
from worldgen.pipeline import Pipeline
from worldgen.ports import Port, PortKind
from worldgen.preflight import preflight
from worldgen.registry import check_executor
from worldgen.rng import MAX_SEED

log = logging.getLogger("ray.serve")
K = PortKind
TEMPLATE_PREFIX = "template:"
# Integer bounds are written as exclusive powers of two: FastAPI's OpenAPI document holds them as floats, and
# 2**63 and 2**64 are the bounds a float states exactly (2**64 - 1 would read as 2**64).
INT64 = 2**63  # an int port's values travel as 64-bit integers (what a torch tensor holds)
SEEDS = MAX_SEED + 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
DEFAULT_FPS = 16.0  # a video output's frame rate when the request names none (Wan's clips play at 16)
SAMPLE_RATES = (1000, 384_000)  # what worldgen.media writes
_MEDIA_KINDS = frozenset({K.VIDEO, K.AUDIO})  # sent as files by default (MP4, WAV), as tensors on request
WIRE_DOC = (
    "`POST /run` takes `{inputs, seed, iterations, encoding}`. Text, int, scalar and json ports are JSON values; "
    "tensors are `{dtype, shape, data_base64}` (raw little-endian bytes, lossless); images are "
    "`{png_base64: [one PNG per batch item]}`, videos `{mp4_base64: [one MP4 per clip], fps}`, sounds "
    "`{wav_base64: [one WAV per sound], sample_rate}`, or all as tensors with `encoding: tensor`. An optional "
    "input given as "
    "null takes the graph's default. 401: no or a wrong bearer token; 413: the body is too large; 422: the "
    "request does not fit the schema; 400: the graph refused the inputs, or they ask for more than a limit "
    "allows (named in the message); 500: the run failed."
)


# ---- loading -------------------------------------------------------------------------------------------
def load_graph(spec: str, params: Mapping[str, Any] | None = None, *, weights: bool = True) -> Engine:
    """A graph or pipeline: a YAML/JSON config, a saved directory (with its weights), or `template:NAME`.

    The same constructors `worldgen generate` uses (`from_config`, `load`, the template registry), but a
    template's parameters are checked strictly: a server config with a misspelt parameter must fail loudly.
    """
    params = dict(params or {})
    if spec.startswith(TEMPLATE_PREFIX):
        from worldgen.templates import build_template

        engine = build_template(spec[len(TEMPLATE_PREFIX) :], **params)
    else:
        if params:
            raise ConfigError("`params` apply only to a template (graph: template:NAME)", path="params")
        path = Path(spec)
        if path.is_dir():
            engine = _load_directory(path, weights)
        elif path.is_file():
            kind = str(load_config_file(path).get("kind", "graph"))
            classes: dict[str, type[Engine]] = {"graph": Graph, "pipeline": Pipeline}
            if kind not in classes:
                raise ConfigError(
                    f"a graph endpoint serves a graph or a pipeline, not a '{kind}'", file=spec, path="kind"
                )
            engine = classes[kind].from_config(path)
        else:
            raise ConfigError(f"{spec}: no such file or directory", path="graph")
    if not isinstance(engine, (Graph, Pipeline)):
        raise ConfigError(f"{spec} does not build a graph or a pipeline", path="graph")
    return engine


def _load_directory(path: Path, weights: bool) -> Engine:
    for cls in (Graph, Pipeline):
        if (path / cls.config_file()).is_file():
            return cls.load(path) if weights else cls.from_config(path / cls.config_file())
    raise ConfigError(
        f"{path}: a directory but not a saved graph or pipeline (no graph.yaml or pipeline.yaml)"
    )


# ---- the spec ------------------------------------------------------------------------------------------
def _doc(engine: Engine, name: str, direction: str) -> str:
    """A port's doc: the doc of the block port it leads to (through nested graphs)."""
    targets = engine.exposed_inputs[name].targets if direction == "input" else [engine.exposed_outputs[name]]
    for node, port in targets:
        item = engine.item(node)
        if isinstance(item, Engine):
            doc = _doc(item, port, direction)
        else:
            ports = item.input_ports() if direction == "input" else item.output_ports()
            doc = ports[port].doc
        if doc:
            return doc
    return ""


def served_ports(engine: Engine, direction: str) -> dict[str, Port]:
    """The exposed ports that travel over HTTP (rng and solver-state values are process-local)."""
    ports = engine.input_ports() if direction == "input" else engine.output_ports()
    served = {}
    for name, port in ports.items():
        if port.kind in UNSERVED_KINDS:
            if direction == "input" and not port.optional:
                raise GraphError(
                    f"{engine.level} '{engine.name}' cannot be served: its required input '{name}' is of kind "
                    f"'{port.kind.value}', which does not travel over HTTP"
                )
            continue
        served[name] = Port(
            name, port.kind, optional=port.optional, default=port.default, doc=_doc(engine, name, direction)
        )
    return served


def describe(engine: Engine) -> dict[str, Any]:
    """`GET /`: what the graph takes and gives (the spec endpoint nodes build their ports from)."""
    return {
        "name": engine.name,
        "level": engine.level,
        "inputs": {name: port.spec() for name, port in served_ports(engine, "input").items()},
        "outputs": {name: port.spec() for name, port in served_ports(engine, "output").items()},
        "options": {
            "seed": f"integer 0 to {MAX_SEED}: same seed, same result (default: unseeded)",
            "iterations": "integer >= 1: overrides the loops' iteration counts",
            "encoding": list(ENCODINGS),
        },
    }


# ---- request and response models ------------------------------------------------------------------------
class TensorPayload(BaseModel):
    """A tensor, losslessly: torch dtype name, shape, and its raw little-endian bytes in base64."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = Field(examples=["float32"], description="torch dtype name")
    shape: list[int] = Field(examples=[[1, 4, 8, 8]])
    data_base64: str = Field(description="raw little-endian bytes, base64 (standard alphabet)")
    _value: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _decode(self) -> "TensorPayload":
        try:
            self._value = decode_tensor(self.model_dump())  # a ValueError naming the field -> 422
        except (TypeError, RuntimeError) as err:  # torch refuses the shape (e.g. a dimension over int64)
            raise ValueError(f"shape: not a tensor shape torch can make ({type(err).__name__})") from None
        return self


class PngPayload(BaseModel):
    """Images as PNG files in base64, one per batch item (all of one size)."""

    model_config = ConfigDict(extra="forbid")

    png_base64: list[str] = Field(min_length=1, description="one base64 PNG per batch item")
    _value: Any = PrivateAttr(None)
    # A PNG of a few KB can hold a 100k x 100k image: sides are read from its header before it is decoded.
    # Set per app from its limits (`_png_payload`).
    max_side: ClassVar[int] = DEFAULT_LIMITS.max_image_side

    @model_validator(mode="after")
    def _decode(self) -> "PngPayload":
        from PIL import Image

        for i, text in enumerate(self.png_base64):
            try:
                width, height = Image.open(io.BytesIO(base64.b64decode(text, validate=True))).size
            except Exception:
                continue  # not a readable PNG: decode_png says what is wrong with it
            if max(width, height) > self.max_side:
                raise ValueError(
                    f"png_base64[{i}]: {width}x{height} is over {self.max_side} pixels (limit 'max_image_side')"
                )
        try:
            self._value = decode_png(self.model_dump())
        except ValueError:
            raise
        except Exception as err:  # e.g. PIL's DecompressionBombError under a very high max_image_side
            raise ValueError(f"png_base64: not a decodable image ({type(err).__name__}: {err})") from None
        return self


class VideoPayload(BaseModel):
    """Clips as MP4 files (H.264, playable in every browser) in base64, one per batch item."""

    mp4_base64: list[str] = Field(description="one base64 MP4 per clip")
    fps: float = Field(description="frames per second the clips play at")


class AudioPayload(BaseModel):
    """Sounds as WAV files (16-bit PCM) in base64, one per batch item."""

    wav_base64: list[str] = Field(description="one base64 WAV per sound")
    sample_rate: int = Field(description="samples per second")


def encode_media(value: Any, kind: PortKind, *, fps: float, sample_rate: int | None) -> dict[str, Any]:
    """A VIDEO output ((B, F, C, H, W) in [0, 1]) as a VideoPayload's fields, an AUDIO one ((B, channels,
    samples) in [-1, 1]) as an AudioPayload's. A value of another shape is a ValueError naming the one expected."""
    ndim, name, shape = (
        (5, "video", "(B, F, C, H, W)") if kind is K.VIDEO else (3, "audio", "(B, channels, samples)")
    )
    if getattr(value, "ndim", None) != ndim:
        raise ValueError(
            f"a {name} output must be a {shape} tensor; got {getattr(value, 'shape', type(value))}"
        )
    if kind is K.VIDEO:
        clips = [base64.b64encode(encode_video(clip, fps=fps)).decode("ascii") for clip in value]
        return {"mp4_base64": clips, "fps": fps}
    if sample_rate is None:
        raise ValueError("an audio output needs a sample rate: the graph has no `sample_rate` output")
    sounds = [
        base64.b64encode(encode_audio(sound, sample_rate=sample_rate)).decode("ascii") for sound in value
    ]
    return {"wav_base64": sounds, "sample_rate": sample_rate}


def _png_payload(max_side: int) -> type[PngPayload]:
    """PngPayload for an app whose limits allow images up to `max_side` pixels."""
    if max_side == PngPayload.max_side:
        return PngPayload
    return type("PngPayload", (PngPayload,), {"max_side": max_side, "__module__": __name__})


def _image_tag(value: Any) -> str:
    return "png" if isinstance(value, Mapping) and "png_base64" in value else "tensor"


def _image_payload(png: type[PngPayload]) -> Any:
    """An image input: PNG or tensor, told apart by its keys (so an error names one shape, not both)."""
    return Annotated[
        Annotated[png, Tag("png")] | Annotated[TensorPayload, Tag("tensor")], Discriminator(_image_tag)
    ]


_WIRE_HINT = {
    kind: "a tensor payload {dtype, shape, data_base64}" for kind in TENSOR_KINDS | _MEDIA_KINDS
} | {K.IMAGE: "{png_base64: [...]} or a tensor payload {dtype, shape, data_base64}"}


def _value_type(kind: PortKind, direction: str, limits: Limits, png: type[PngPayload]) -> Any:
    # Strict types: `true` is no int and "2" no number (lax pydantic would take both, and a run then fails).
    if kind is K.TEXT:
        # The bound is the total over all text inputs (`max_prompt_chars`, checked with the limit's name: 400);
        # one string's maxLength tells a client (or a fuzzer) the same.
        text = Annotated[StrictStr, Field(json_schema_extra={"maxLength": limits.max_prompt_chars})]
        return text | Annotated[list[text], Field(min_length=1)]  # a list is a batch: never empty
    if kind is K.INT:
        return Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]
    if kind is K.SCALAR:
        return Annotated[float, Field(strict=True, allow_inf_nan=False)]  # Python's JSON reads NaN
    if kind is K.IMAGE:
        return _image_payload(png) if direction == "input" else png | TensorPayload
    if kind is K.VIDEO and direction == "output":
        return VideoPayload | TensorPayload
    if kind is K.AUDIO and direction == "output":
        return AudioPayload | TensorPayload
    if (
        kind in TENSOR_KINDS | _MEDIA_KINDS
    ):  # a video or sound input: a tensor (exact, as endpoint nodes send)
        return TensorPayload
    if kind is K.TIMESTEP:
        return int | float | TensorPayload
    return Any  # json, any


def _jsonable(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _ports_model(
    title: str, ports: dict[str, Port], direction: str, limits: Limits, png: type[PngPayload]
) -> type[BaseModel]:
    # Field names are positional and the port names aliases: a port may be called `json` or `model_config`.
    fields: dict[str, Any] = {}
    for i, (name, port) in enumerate(ports.items()):
        typ = _value_type(port.kind, direction, limits, png)
        doc = " — ".join(d for d in (port.doc, _WIRE_HINT.get(port.kind, "")) if d) or None
        if direction == "input" and port.optional:
            default = port.default if _jsonable(port.default) else None
            fields[f"p{i}"] = (typ | None, Field(default, alias=name, description=doc))
        else:
            fields[f"p{i}"] = (typ, Field(..., alias=name, description=doc))
    return create_model(title, __config__=ConfigDict(extra="forbid", populate_by_name=False), **fields)


def _title(engine: Engine) -> str:
    words = "".join(c if c.isalnum() else " " for c in engine.name).title().replace(" ", "")
    return words or "Graph"


def run_models(
    engine: Engine,
    input_ports: dict[str, Port],
    output_ports: dict[str, Port],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[type[BaseModel], type[BaseModel]]:
    """(request model, response model) from the graph's served ports (`served_ports`) and the app's limits."""
    title = _title(engine)
    png = _png_payload(limits.max_image_side)
    inputs = _ports_model(f"{title}Inputs", input_ports, "input", limits, png)
    outputs = _ports_model(f"{title}Outputs", output_ports, "output", limits, png)
    all_optional = all(p.optional for p in input_ports.values())
    media: dict[str, Any] = {}  # the options of the graph's video and audio outputs, when it has any
    kinds = {port.kind for port in output_ports.values()}
    if K.VIDEO in kinds:
        media["fps"] = (
            Annotated[float, Field(gt=0, le=MAX_FPS, strict=True, allow_inf_nan=False)],
            Field(
                DEFAULT_FPS, description=f"frames per second of the MP4s (more than 0, at most {MAX_FPS:g})"
            ),
        )
    if K.AUDIO in kinds:
        media["sample_rate"] = (
            Annotated[StrictInt, Field(ge=SAMPLE_RATES[0], le=SAMPLE_RATES[1])] | None,
            Field(
                None, description="samples per second of the WAVs when the graph gives none (`sample_rate`)"
            ),
        )
    request = create_model(
        f"{title}RunRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=(inputs, Field(default_factory=inputs) if all_optional else Field(...)),
        seed=(
            Annotated[StrictInt, Field(ge=0, lt=SEEDS)] | None,
            Field(None, description="same seed, same result (default: unseeded)"),
        ),
        iterations=(
            # the maximum is checked with the limit's name (400) rather than by the schema (422), but stated
            Annotated[StrictInt, Field(ge=1, json_schema_extra={"maximum": limits.max_iterations})] | None,
            Field(
                None,
                description=f"overrides the loops' iteration counts (at most {limits.max_iterations}: "
                "limit 'max_iterations')",
            ),
        ),
        encoding=(
            Literal["png", "tensor"],
            Field(
                "png",
                description="images as PNG, videos as MP4, sounds as WAV (default) or every tensor losslessly",
            ),
        ),
        **media,
    )
    response = create_model(
        f"{title}RunResponse",
        outputs=(outputs, ...),
        encoding=(Literal["png", "tensor"], ...),
        seed=(int | None, None),
    )
    return request, response


def _input_values(model: BaseModel, ports: dict[str, Port]) -> dict[str, Any]:
    """The run's inputs from a validated request: payloads decoded; unset or null optionals left out."""
    values = {}
    for field_name, field in type(model).model_fields.items():
        name = field.alias or field_name
        if field_name not in model.model_fields_set:
            continue  # the graph applies its own default
        value = getattr(model, field_name)
        if value is None and ports[name].optional:
            continue
        if isinstance(value, (TensorPayload, PngPayload)):
            value = value._value
        elif ports[name].kind is K.ANY:
            try:
                value = decode_value(value)
            except ValueError as err:
                raise HTTPException(
                    422, [{"loc": ["body", "inputs", name], "msg": str(err), "type": "value_error"}]
                ) from None
        values[name] = value
    return values


class ErrorDetail(BaseModel):
    error: str = Field(
        description="the error's type: ConfigError, GraphError, LimitExceeded, ExecutionError…"
    )
    message: str = Field(description="what is wrong and where (the input, the node, the limit)")
    limit: str | None = Field(
        None, description="LimitExceeded: the limit's name (a field of worldgen Limits)"
    )


class RunError(BaseModel):
    """400 and 500 answers of POST /run."""

    detail: ErrorDetail


class Refusal(BaseModel):
    """401 and 413 answers (of any path)."""

    detail: str


# ---- the app -------------------------------------------------------------------------------------------
Runner = Callable[[dict[str, Any], int | None, int | None], dict[str, Any]]


def build_app(
    engine: Engine,
    runner: Runner,
    *,
    token_sha256: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `engine`; `runner(inputs, seed, iterations)` runs it once `preflight` has
    checked the inputs against the graph's constraints and `limits`."""
    spec = describe(engine)
    input_ports = served_ports(engine, "input")
    output_ports = served_ports(engine, "output")
    RunRequest, RunResponse = run_models(engine, input_ports, output_ports, limits)

    refusals: dict[int | str, dict[str, Any]] = {  # answered by the middlewares, on every path
        401: {"model": Refusal, "description": "no or a wrong bearer token (when the server has one)"},
        413: {"model": Refusal, "description": f"the body is over {max_body_bytes} bytes"},
    }
    app = FastAPI(title=f"worldgen {engine.level} '{engine.name}'", description=WIRE_DOC, responses=refusals)
    app.state.token_sha256 = token_sha256
    app.state.max_body_bytes = max_body_bytes
    # Outermost first: a caller without the token gets 401 before its body is read at all.
    app.add_middleware(BodyLimit)
    app.add_middleware(BearerAuth)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, except that a NaN the request held (Python's JSON reads it) is quoted as a string:
        # echoed as a number it would make the 422 itself unrenderable (a 500).
        return JSONResponse({"detail": _json_safe(jsonable_encoder(err.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Any:
        if err.status_code == 400 and isinstance(err.detail, str):
            # FastAPI's "There was an error parsing the body" (e.g. bytes that are not UTF-8): a body that is
            # not JSON, answered like malformed JSON (422), not as a 400 outside the documented shape
            problem = {"loc": ["body"], "msg": f"the body is not JSON: {err.detail}", "type": "json_invalid"}
            return JSONResponse({"detail": [problem]}, status_code=422)
        return await http_exception_handler(request, err)

    @app.get("/", summary="the graph's name, level and input/output spec")
    def get_spec() -> dict[str, Any]:
        return spec

    app.add_api_route("/spec", get_spec, methods=["GET"], summary="same as GET /")

    def execute(body: Any) -> JSONResponse:
        inputs = _input_values(body.inputs, input_ports)
        sound = any(port.kind is K.AUDIO for port in output_ports.values()) and body.encoding != "tensor"
        if sound and "sample_rate" not in output_ports and body.sample_rate is None:
            message = "sample_rate: the graph gives no sample rate for its audio; name one (1000 to 384000)"
            raise HTTPException(400, {"error": "ConfigError", "message": message})
        try:
            preflight(engine, inputs, iterations=body.iterations, limits=limits)  # before any model runs
            outputs = runner(inputs, body.seed, body.iterations)
        except (ConfigError, GraphError) as err:  # the graph refused these inputs, or a limit did
            detail = {"error": type(err).__name__, "message": str(err)}
            if isinstance(err, LimitExceeded):
                detail["limit"] = err.limit
            raise HTTPException(400, detail) from None
        except Exception as err:  # the run itself failed
            log.exception("run of %s '%s' failed", engine.level, engine.name)
            message = str(err) if isinstance(err, WorldgenError) else f"{type(err).__name__}: {err}"
            raise HTTPException(500, {"error": type(err).__name__, "message": message}) from None
        try:
            encoded = {
                name: _encode(outputs[name], port.kind, body, outputs) for name, port in output_ports.items()
            }
            # rendered here (NaN/inf are not JSON) so such an output is a reported 500, not a bare one
            return JSONResponse({"outputs": encoded, "encoding": body.encoding, "seed": body.seed})
        except (TypeError, ValueError) as err:
            raise HTTPException(500, {"error": "EncodingError", "message": str(err)}) from None

    def _encode(value: Any, kind: PortKind, body: Any, outputs: dict[str, Any]) -> Any:
        if kind in _MEDIA_KINDS and body.encoding != "tensor":
            rate = outputs.get("sample_rate", getattr(body, "sample_rate", None))
            fps = getattr(body, "fps", DEFAULT_FPS)
            return encode_media(value, kind, fps=fps, sample_rate=None if rate is None else int(rate))
        return encode_value(value, kind, body.encoding)

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": RunError, "description": "the graph refused the inputs, or they exceed a limit"},
        500: {"model": RunError, "description": "the run failed (the message says where)"},
    }  # and 422, FastAPI's own: {detail: [{loc, msg, type, input}]}

    async def run(body: RunRequest) -> JSONResponse:  # type: ignore[valid-type]
        # The run blocks for seconds: off the event loop, so the replica keeps answering health checks.
        return await run_in_threadpool(execute, body)

    app.add_api_route(
        "/run",
        run,
        methods=["POST"],
        response_model=RunResponse,
        responses=errors,
        summary=f"run the {engine.level} on the inputs",
    )
    return app


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---- the deployment -------------------------------------------------------------------------------------
@serve.deployment(name="GraphEndpoint")
@serve.ingress()
class GraphEndpoint:
    """One replica: the graph loaded once, run per request (models load lazily on the first run)."""

    def __init__(
        self,
        graph: str,
        params: dict[str, Any] | None = None,
        executor: str | None = None,
        token_sha256: str | None = None,
        limits: dict[str, Any] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        from actors.cluster import reserved_cpus, set_torch_threads

        # Ray gives an actor one torch thread; like a model host, use the CPUs the replica reserved (all cores
        # when it reserved none). Same thread count as a local run also keeps float reductions in the same order.
        set_torch_threads(reserved_cpus())
        self.engine = load_graph(graph, params)
        self.executor = executor or self.engine.executor
        self.token_sha256 = token_sha256
        self.limits = Limits.model_validate(limits or {})
        self.max_body_bytes = max_body_bytes

    def run(self, inputs: dict[str, Any], seed: int | None, iterations: int | None) -> dict[str, Any]:
        return self.engine.run(inputs, seed=seed, iterations=iterations, executor=self.executor)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(
            self.engine,
            self.run,
            token_sha256=self.token_sha256,
            limits=self.limits,
            max_body_bytes=self.max_body_bytes,
        )


class GraphAppArgs(Scaling):
    """`args` of the application (a Serve config's `args:`, or `serve run ... key=value`)."""

    model_config = ConfigDict(extra="forbid")

    graph: str = Field(description="graph/pipeline YAML or JSON, saved directory, or template:NAME")
    params: dict[str, Any] = Field(
        default_factory=dict, description="template parameters (template:NAME only)"
    )
    executor: str | None = Field(
        None,
        description="a registered executor: 'local' runs in the replica, 'ray' on the cluster's model host "
        "actors; default: the graph's own (local)",
    )
    token_env: str | None = Field(
        "WORLDGEN_API_TOKEN",
        description="environment variable holding the bearer token every request must carry; unset (or null "
        "here): no auth, warned about in the logs. Named explicitly, it must be set.",
    )
    limits: Limits = Field(default_factory=Limits, description="budgets each run is checked against")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="larger request bodies get 413")

    @field_validator("executor")
    @classmethod
    def _known_executor(cls, executor: str | None) -> str | None:
        if executor is not None:
            try:
                check_executor(executor)  # a package's own executor may be named too
            except GraphError as err:
                raise ValueError(str(err)) from None
        return executor

    @model_validator(mode="after")
    def _check(self) -> "GraphAppArgs":
        if not self.graph.startswith(TEMPLATE_PREFIX):
            # Replicas may start in another working directory: pin the path where the app is built.
            self.graph = str(Path(self.graph).expanduser().resolve())
        return self


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for a Serve config (`import_path: serve_apps.graph_app:app_builder`)."""
    try:
        config = GraphAppArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "args"), file="serve_apps.graph_app") from None
    try:  # fail here, with the config's own message, rather than in a replica restart loop
        describe(load_graph(config.graph, config.params, weights=False))
    except ConfigError as err:
        raise ConfigError(err.detail, file=err.file or config.graph, path=err.path) from None
    except WorldgenError as err:
        raise ConfigError(str(err), file=config.graph) from None
    token_sha256 = token_digest(config.token_env)
    if token_sha256 is None and config.token_env and "token_env" in config.model_fields_set:
        # named on purpose: serving without the auth the operator asked for would be worse than not serving
        raise ConfigError(f"environment variable {config.token_env} is not set", path="args.token_env")
    if token_sha256 is None:
        # Open by default like the gateway (a laptop's `serve run` needs no secret), but never silently: whoever
        # reaches Serve's HTTP port can spend this machine's accelerator.
        log.warning(
            "graph endpoint %s has NO AUTHENTICATION: anyone who reaches Serve's HTTP port can run it; set %s "
            "where the app is built to require a bearer token",
            config.graph,
            config.token_env or "WORLDGEN_API_TOKEN (args.token_env)",
        )
    deployment = GraphEndpoint.options(**config.deployment_options())
    return deployment.bind(
        config.graph,
        config.params,
        config.executor,
        token_sha256,
        config.limits.model_dump(),
        config.max_body_bytes,
    )
