"""Endpoint nodes: a graph served over HTTP (serve_apps/graph_app.py) used as a node of a pipeline, stage or world.

    graphs:
      draw: {endpoint: "http://gpu-box:8000/t2i", name: draw, timeout: 600, retries: 2, headers_env: T2I_TOKEN}

`{endpoint: ...}` builds an `EndpointGraph`: one `endpoint/http` node whose ports are the served graph's exposed
ports (its spec, fetched once, when the ports are first needed), exposed under the same names. The block calls
`POST <url>/run` with tensor encoding, so the result is bit for bit what the graph gives locally; the run's seed
travels as the request's `seed`. It is a light block: a Ray task under the Ray executor.

Wire format (the server in serve_apps/graph_app.py and this client share it):
- text, int, scalar, json: plain JSON values.
- a tensor (latent, embedding, tokens, mask; an image with `"encoding": "tensor"`):
  `{"dtype": "float32", "shape": [1, 3, 64, 64], "data_base64": "<raw little-endian bytes, base64>"}`.
- an image with the default `"encoding": "png"`: `{"png_base64": ["<PNG, base64>", ...]}`, one per batch item
  (8-bit, so lossy); an image *input* may come either way.
- rng and solver_state ports hold process-local values and are not served.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worldgen.block import Block, BlockConfig
from worldgen.errors import ConfigError, ExecutionError, format_validation_error
from worldgen.graph import Graph
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind

TENSOR_KINDS = frozenset({K.IMAGE, K.LATENT, K.EMBEDDING, K.TOKENS, K.MASK})
UNSERVED_KINDS = frozenset({K.RNG, K.SOLVER_STATE})  # generator states, scheduler internals: process-local
ENCODINGS = ("png", "tensor")
TENSOR_KEYS = frozenset({"dtype", "shape", "data_base64"})
PNG_KEYS = frozenset({"png_base64"})
RETRY_STATUS = frozenset({502, 503, 504})  # Serve answers 503 while replicas start or are overloaded
SPEC_TIMEOUT_S = 30.0


class EndpointError(ExecutionError):
    """An endpoint could not be reached, or refused or failed a call; the message names its URL."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None):
        self.url, self.status = url, status  # defaults: exceptions are rebuilt from `args` when unpickled
        super().__init__(message)


# ---- wire format -------------------------------------------------------------------------------------
def encode_tensor(tensor: Any) -> dict[str, Any]:
    """A tensor (or array) as `{dtype, shape, data_base64}`: its raw bytes, so decoding gives it back exactly."""
    import torch

    if (
        sys.byteorder != "little"
    ):  # the format is little-endian; torch has no portable byte swap for all dtypes
        raise ExecutionError("tensor encoding needs a little-endian machine")
    t = torch.as_tensor(tensor).detach().to("cpu").contiguous()
    flat = t.reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data_base64": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(payload: Mapping[str, Any]) -> Any:
    """`{dtype, shape, data_base64}` -> the tensor; a malformed payload is a ValueError naming the bad field."""
    import torch

    name = payload.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"dtype: unknown tensor dtype {name!r} (expected a torch dtype name such as 'float32')"
        )
    shape = payload.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"shape: expected a list of non-negative integers, got {shape!r}")
    try:
        raw = base64.b64decode(payload.get("data_base64", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("data_base64: not valid base64") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"data_base64: {len(raw)} bytes do not match shape {list(shape)} of {name} ({expected} bytes)"
        )
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def encode_png(image: Any) -> dict[str, Any]:
    """An image batch ((B, C, H, W) in [0, 1], or PIL image(s)) as `{png_base64: [...]}`, one PNG per item."""
    from PIL import Image

    from worldgen.images import png_bytes, to_pil

    if isinstance(image, Image.Image):
        pictures = [image]
    elif isinstance(image, (list, tuple)) and image and all(isinstance(p, Image.Image) for p in image):
        pictures = list(image)
    else:
        pictures = to_pil(image)
    return {"png_base64": [base64.b64encode(png_bytes(p)).decode("ascii") for p in pictures]}


def decode_png(payload: Mapping[str, Any]) -> Any:
    """`{png_base64: [...]}` -> a float32 (B, C, H, W) tensor in [0, 1] (C = 1, 3 or 4, as stored)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    items = payload.get("png_base64")
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise ValueError("png_base64: expected a non-empty list of base64 strings")
    arrays = []
    for i, text in enumerate(items):
        try:
            picture = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            picture.load()
        except (binascii.Error, ValueError):
            raise ValueError(f"png_base64[{i}]: not valid base64") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"png_base64[{i}]: not a readable image ({err})") from None
        if picture.mode not in ("L", "RGB", "RGBA"):
            picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        array = np.asarray(picture, dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"png_base64: the images differ in size or channels: {[a.shape for a in arrays]}")
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def _is_tensor(value: Any) -> bool:
    return type(value).__module__ in ("torch", "numpy") and hasattr(value, "shape")


def encode_value(value: Any, kind: PortKind = K.ANY, encoding: str = "tensor") -> Any:
    """A port value as JSON: tensors as tensor payloads (images as PNG unless `encoding` is 'tensor')."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if _is_tensor(value):
        if kind is K.IMAGE and encoding == "png":
            return encode_png(value)
        return encode_tensor(value)
    if type(value).__module__.startswith("PIL."):  # PIL images on an image port
        if encoding == "png":
            return encode_png(value)
        return encode_tensor(decode_png(encode_png(value)))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): encode_value(v, K.ANY, encoding) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if kind is K.IMAGE and value and all(type(v).__module__.startswith("PIL.") for v in value):
            return encode_value(decode_png(encode_png(list(value))), kind, encoding)
        return [encode_value(v, K.ANY, encoding) for v in value]
    raise TypeError(f"a {type(value).__name__} cannot be sent over HTTP")


def decode_value(value: Any) -> Any:
    """The inverse of `encode_value`: tensor and PNG payloads (anywhere inside) become tensors."""
    if isinstance(value, Mapping):
        if set(value) == TENSOR_KEYS:
            return decode_tensor(value)
        if set(value) == PNG_KEYS:
            return decode_png(value)
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def port_from_spec(name: str, spec: Mapping[str, Any]) -> Port:
    try:
        kind = PortKind(spec.get("kind", "any"))
    except ValueError:  # a kind this version does not know: let any edge connect
        kind = K.ANY
    return Port(
        name,
        kind,
        optional=bool(spec.get("optional", False)),
        default=spec.get("default"),
        doc=str(spec.get("doc", "")),
    )


# ---- the block ---------------------------------------------------------------------------------------
class EndpointConfig(BlockConfig):
    url: str = Field(
        description="base URL of a graph endpoint (serve_apps/graph_app.py), e.g. http://host:8000/t2i"
    )
    timeout: float = Field(600.0, gt=0, description="seconds to wait for one run's answer")
    retries: int = Field(
        2, ge=0, le=20, description="retries while the endpoint is unreachable or busy (HTTP 502/503/504)"
    )
    headers_env: str | None = Field(
        None, description="environment variable holding a bearer token, sent as 'Authorization: Bearer …'"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return _check_url(url)


@register_block
class EndpointBlock(Block):
    """A graph behind an HTTP endpoint as one block: its ports are the endpoint's exposed ports.

    Holds only plain data (config and, once fetched, the spec): no connection or client object, so it pickles
    to Ray workers as is; every call opens its own connection (one per run of a whole graph, so cheap enough).
    """

    block_type = "endpoint/http"
    Config = EndpointConfig
    RNG_PORT: ClassVar[str] = "rng"

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._spec: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def spec(self) -> dict[str, Any]:
        """The endpoint's spec (`GET <url>/spec`), fetched on first use and kept."""
        if self._spec is None:
            spec = self._request("GET", "/spec", None, timeout=min(SPEC_TIMEOUT_S, self.config.timeout))
            if not (
                isinstance(spec, Mapping)
                and isinstance(spec.get("inputs"), Mapping)
                and isinstance(spec.get("outputs"), Mapping)
            ):
                raise EndpointError(
                    f"endpoint {self.url} did not answer with a graph spec ({{name, inputs, outputs}}); is a "
                    "graph served there (serve_apps/graph_app.py)?",
                    url=self.url,
                )
            self._spec = dict(spec)
        return self._spec

    def _rng_port(self) -> str:
        # The run's seed arrives as the seeded generator state every unfed rng input gets; the name only has
        # to avoid the endpoint's own inputs.
        name = self.RNG_PORT
        while name in self.spec()["inputs"]:
            name = "_" + name
        return name

    def input_ports(self) -> dict[str, Port]:
        ports = {name: port_from_spec(name, s) for name, s in self.spec()["inputs"].items()}
        rng = self._rng_port()
        ports[rng] = Port(rng, K.RNG, optional=True, doc="the run's seed (sent as the endpoint run's seed)")
        return ports

    def output_ports(self) -> dict[str, Port]:
        return {name: port_from_spec(name, s) for name, s in self.spec()["outputs"].items()}

    def forward(self, **inputs: Any) -> dict[str, Any]:
        rng = inputs.pop(self._rng_port(), None)
        ports = self.input_ports()
        payload = {
            name: encode_value(value, ports[name].kind if name in ports else K.ANY, "tensor")
            for name, value in inputs.items()
            # an optional input left unset arrives as None: leave it out so the endpoint applies its own default
            if not (value is None and name in ports and ports[name].optional)
        }
        body: dict[str, Any] = {"inputs": payload, "encoding": "tensor"}
        seed = _seed_of(rng)
        if seed is not None:
            body["seed"] = seed
        answer = self._request("POST", "/run", body, timeout=self.config.timeout)
        outputs = answer.get("outputs") if isinstance(answer, Mapping) else None
        wanted = self.spec()["outputs"]
        missing = set(wanted) - set(outputs or {})
        if outputs is None or missing:
            raise EndpointError(
                f"endpoint {self.url} answered without output(s) {sorted(missing)}", url=self.url
            )
        try:
            return {name: decode_value(outputs[name]) for name in wanted}
        except ValueError as err:
            raise EndpointError(f"endpoint {self.url} sent a malformed output: {err}", url=self.url) from None

    # ---- HTTP --------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        name = self.config.headers_env
        if name:
            token = os.environ.get(name)  # read where the call runs: the token is never stored or pickled
            if not token:
                raise ConfigError(
                    f"environment variable {name} is not set (the bearer token for endpoint {self.url})"
                )
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(self, method: str, path: str, body: Any, *, timeout: float) -> Any:
        url = self.url + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            request = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as err:
                if err.code in RETRY_STATUS and attempt + 1 < attempts:
                    time.sleep(0.5 * 2**attempt)
                    continue
                detail = _error_detail(err)
                what = "rejected the request" if 400 <= err.code < 500 else "failed"
                raise EndpointError(
                    f"endpoint {self.url} {what} (HTTP {err.code} on {method} {path}): {detail}",
                    url=self.url,
                    status=err.code,
                ) from None
            except urllib.error.URLError as err:  # nothing listening, DNS, refused: worth another try
                if attempt + 1 < attempts:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise EndpointError(
                    f"endpoint {self.url} is unreachable ({err.reason}; tried {attempts} time(s)); is the graph "
                    "served there (serve_apps/graph_app.py) and the URL right?",
                    url=self.url,
                ) from None
            except TimeoutError:  # the request went out: retrying could run the graph twice
                raise EndpointError(
                    f"endpoint {self.url} did not answer {method} {path} within {timeout:g} s (raise `timeout`)",
                    url=self.url,
                ) from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EndpointError(
                    f"endpoint {self.url} answered {method} {path} with non-JSON", url=self.url
                ) from None
        raise AssertionError("unreachable")


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's error body, shortened: FastAPI's `detail` (a message, or a list of field errors)."""
    try:
        body = json.loads(err.read() or b"null")
    except Exception:
        return err.reason or "no detail"
    detail = body.get("detail", body) if isinstance(body, Mapping) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    return str(detail)[:2000]


def _seed_of(rng: Any) -> int | None:
    """The seed an rng input was seeded from (the run's seed), or None when the run is unseeded."""
    if rng is None:
        return None
    import torch

    from worldgen.rng import RngState

    seed = rng.generator().initial_seed()
    if not torch.equal(RngState.seeded(seed, rng.device).state, rng.state):
        raise ExecutionError(
            "an endpoint node passes on the run's seed, not an advanced generator state: leave its rng input "
            "unconnected"
        )
    return int(seed)


# ---- the graph a pipeline, stage or world holds --------------------------------------------------------
class EndpointSpec(BaseModel):
    """The config of an endpoint item: `{endpoint: URL, name, timeout, retries, headers_env}`."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(description="base URL of the served graph")
    name: str | None = Field(None, description="the graph's name here (default: the URL's last path segment)")
    timeout: float = Field(600.0, gt=0)
    retries: int = Field(2, ge=0, le=20)
    headers_env: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return _check_url(url)


class EndpointGraph(Graph):
    """A graph that runs behind an HTTP endpoint: one `endpoint/http` node, its ports exposed as they are.

    Building a config that holds an endpoint must not need the endpoint up (it may be deployed alongside): the
    graph is deferred, and its node and ports come from the endpoint's spec when something first asks for them.
    """

    NODE: ClassVar[str] = "endpoint"

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        timeout: float = 600.0,
        retries: int = 2,
        headers_env: str | None = None,
    ):
        self.block = EndpointBlock(url=url, timeout=timeout, retries=retries, headers_env=headers_env)
        super().__init__(name or _name_from_url(self.block.url), deferred=True)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> EndpointGraph:
        """From an `{endpoint: URL, ...}` config item; errors name the key."""
        try:
            item = EndpointSpec.model_validate(dict(spec))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err)) from None
        return cls(
            item.endpoint,
            name=item.name,
            timeout=item.timeout,
            retries=item.retries,
            headers_env=item.headers_env,
        )

    @property
    def url(self) -> str:
        return self.block.url

    def load_structure(self) -> None:
        spec = self.block.spec()  # fails naming the URL (the graph stays deferred)
        self._add_item(self.NODE, self.block)
        for name, port in spec["inputs"].items():
            target = f"{self.NODE}.{name}"
            if "default" in port:
                self.expose_input(name, target, default=port["default"])
            else:
                self.expose_input(name, target)
        for name in spec["outputs"]:
            self.expose_output(name, f"{self.NODE}.{name}")

    def named_blocks(self) -> list[tuple[str, Block]]:
        return [(self.NODE, self.block)]  # no weights here; saving must not need the endpoint up

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"endpoint": self.url, "name": self.name}
        defaults = EndpointConfig.model_fields
        for key in ("timeout", "retries", "headers_env"):
            value = getattr(self.block.config, key)
            if value != defaults[key].default:
                config[key] = value
        return config

    def __repr__(self) -> str:
        return f"EndpointGraph({self.name!r}, url={self.url!r})"


def _check_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return url.rstrip("/")


def _name_from_url(url: str) -> str:
    path = urlparse(url).path.strip("/")
    return path.rsplit("/", 1)[-1] if path else "endpoint"
