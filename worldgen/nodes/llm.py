"""Language-model task nodes (role `llm`): text (or validated JSON) from Jinja prompts.

| block type          | generates with                                                              |
|---------------------|-----------------------------------------------------------------------------|
| `llm/template`      | a Jinja template (offline, deterministic: the default world's "LLM")        |
| `llm/openai`        | any OpenAI-compatible endpoint through the official `openai` client          |
| `llm/anthropic`     | the Anthropic Messages API through the `anthropic` client                   |
| `llm/transformers`  | a local transformers causal LM, loaded once through the model pool           |

Every one renders its `prompt`/`system` templates (inline Jinja or `file:NAME.j2`, see `worldgen.prompts`)
with the `context` input, and for `output: json` extracts the JSON object from the answer, validates it
against a registered schema (e.g. `generation_config`, block 2 of the world state) and asks again with the
validation error until `max_attempts` is reached.

API keys live in the environment only: configs hold `${env:NAME}` references, resolved when a client is
created, never stored on a block, written to a file or put in a message.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from worldgen.block import AdapterRef, Block, BlockConfig, ModelBlock, ModelRef
from worldgen.config import resolve_env
from worldgen.errors import ConfigError, ExecutionError, did_you_mean, format_validation_error
from worldgen.ports import Port, PortKind
from worldgen.prompts import render_prompt
from worldgen.registry import register_block
from worldgen.rng import RngState, generator_or_none

K = PortKind
Message = dict[str, str]

# ---- output schemas ------------------------------------------------------------------------------------
_SCHEMAS: dict[str, type[BaseModel]] = {}


def register_schema(name: str, model: type[BaseModel]) -> type[BaseModel]:
    """Make a pydantic model usable as `schema: <name>` in LLM block configs."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"schema '{name}' must be a pydantic BaseModel class, got {model!r}")
    _SCHEMAS[name] = model
    return model


def output_schema(name: str) -> type[BaseModel]:
    """The pydantic model registered as `name` (ConfigError with a hint when there is none)."""
    try:
        return _SCHEMAS[name]
    except KeyError:
        raise ConfigError(
            f"unknown output schema '{name}'{did_you_mean(name, _SCHEMAS)}; "
            f"registered schemas: {', '.join(sorted(_SCHEMAS)) or 'none'}"
        ) from None


def schema_names() -> list[str]:
    return sorted(_SCHEMAS)


def _register_builtin_schemas() -> None:
    from worldgen.state import GenerationConfig, GenerationPlan

    register_schema("generation", GenerationPlan)  # block 2: a list of requests (or one mapping)
    register_schema(
        "generation_config", GenerationConfig
    )  # one image request: block 2 before videos and audio


_register_builtin_schemas()


# ---- JSON answers --------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any] | list[dict[str, Any]]:
    """The JSON object (or array of objects: block 2's list of requests) in a model's answer: the whole answer,
    a ```json fenced block, or the first `{…}` / `[{…}, …]` that parses in surrounding prose. ValueError when
    there is none."""
    stripped = text.strip()
    candidates = [stripped, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if _is_answer(value):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if _is_answer(value):
            return value
    if not stripped:
        raise ValueError("the answer is empty, expected a JSON object")
    raise ValueError("the answer contains no JSON object")


def _is_answer(value: Any) -> bool:
    """An object, or a non-empty array of objects (a `[1]` in prose is not an answer)."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, dict) for v in value)
    return isinstance(value, dict)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- the shared base -----------------------------------------------------------------------------------
with warnings.catch_warnings():
    # `schema` is the config's natural name; it shadows pydantic's deprecated `BaseModel.schema()` only.
    warnings.filterwarnings("ignore", message='Field name "schema"', category=UserWarning)

    class LLMConfig(BlockConfig):
        prompt: str | None = Field(
            None,
            description="user prompt: a Jinja template string or 'file:NAME.j2', rendered with `context`",
        )
        system: str | None = Field(None, description="system prompt (template string or 'file:NAME.j2')")
        temperature: float | None = Field(
            0.7, ge=0.0, le=2.0, description="0: greedy/deterministic; None: the backend's default"
        )
        max_tokens: int = Field(512, ge=1, description="most tokens generated per answer")
        output: Literal["text", "json"] = Field(
            "text", description="json: parse (and validate) a JSON object"
        )
        schema: str | None = Field(
            None,
            description="name of a registered output schema the JSON must match (e.g. generation_config)",
        )
        max_attempts: int = Field(3, ge=1, le=20, description="tries to get valid JSON before failing")

        @field_validator("schema")
        @classmethod
        def _known_schema(cls, value: str | None) -> str | None:
            if value is not None:
                try:
                    output_schema(value)
                except ConfigError as err:
                    raise ValueError(err.detail) from None
            return value

        @model_validator(mode="after")
        def _schema_needs_json(self) -> LLMConfig:
            if self.schema is not None and self.output != "json":
                raise ValueError(f"schema '{self.schema}' applies to JSON answers: set output: json")
            return self


class LLMBlock(Block):
    """Base of the LLM blocks: prompt rendering, messages, JSON extraction, validation and retries.

    Subclasses implement `generate(messages, **call) -> str`; `call` holds `context` (the template
    variables) and whatever the subclass's `forward` adds (e.g. a seeded generator).
    """

    Config: ClassVar[type[BlockConfig]] = LLMConfig
    requires_prompt: ClassVar[bool] = True
    INPUTS = (
        Port("context", K.JSON, optional=True, doc="variables for the prompt templates (a mapping)"),
        Port(
            "prompt", K.TEXT, optional=True, doc="the user prompt; overrides the rendered `prompt` template"
        ),
        Port(
            "system", K.TEXT, optional=True, doc="the system prompt; overrides the rendered `system` template"
        ),
    )
    OUTPUTS = (
        Port("text", K.TEXT, doc="the final raw answer"),
        Port("data", K.JSON, doc="output=json: the parsed (and validated) object; else None"),
    )

    def generate(self, messages: list[Message], **call: Any) -> str:
        """One answer to a chat (`[{"role": "system"|"user"|"assistant", "content": ...}, ...]`)."""
        raise NotImplementedError(f"{type(self).__name__}.generate")

    # ---- prompt --------------------------------------------------------------------------------------
    def messages(
        self, context: Mapping[str, Any] | None = None, prompt: str | None = None, system: str | None = None
    ) -> list[Message]:
        """The chat sent to the model: the system prompt (when there is one), then the user prompt."""
        variables = dict(context or {})
        if system is None and self.config.system:
            system = render_prompt(self.config.system, variables)
        if prompt is None and self.config.prompt:
            prompt = render_prompt(self.config.prompt, variables)
        if prompt is None and self.requires_prompt:
            raise ConfigError(
                f"{self.block_type}: no prompt: set `prompt` in the config (a template) or feed the `prompt` input"
            )
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": prompt or ""}]

    def forward(
        self, context: Mapping[str, Any] | None = None, prompt: str | None = None, system: str | None = None
    ) -> dict[str, Any]:
        return self.complete(context, prompt, system)

    def complete(
        self,
        context: Mapping[str, Any] | None = None,
        prompt: str | None = None,
        system: str | None = None,
        **call: Any,
    ) -> dict[str, Any]:
        """Render, generate and (for JSON output) parse, validate and retry: {"text": ..., "data": ...}."""
        if context is not None and not isinstance(context, Mapping):
            raise ConfigError(
                f"{self.block_type}: the `context` input must be a mapping, got {type(context).__name__}"
            )
        context = dict(context or {})
        messages = self.messages(context, prompt, system)
        if self.config.output == "text":
            return {"text": self.generate(messages, context=context, **call), "data": None}
        schema = output_schema(self.config.schema) if self.config.schema else None
        error = ""
        text = ""
        for attempt in range(1, self.config.max_attempts + 1):
            text = self.generate(messages, context=context, **call)
            try:
                data = self.parse(text, schema)
            except ValueError as err:
                error = str(err)
                if attempt < self.config.max_attempts:
                    messages = [
                        *messages,
                        {"role": "assistant", "content": text},
                        self._correction(error, schema),
                    ]
                continue
            return {"text": text, "data": data}
        what = f"schema '{self.config.schema}'" if self.config.schema else "a JSON object"
        raise ExecutionError(
            f"{self.block_type}: no valid answer for {what} after {self.config.max_attempts} attempt(s); "
            f"last error: {error}; last answer: {_short(text)!r}"
        )

    @staticmethod
    def parse(text: str, schema: type[BaseModel] | None) -> Any:
        """The answer's JSON object, validated against `schema` and dumped back to plain data."""
        value = extract_json(text)
        if schema is None:
            return value
        try:
            return schema.model_validate(value).model_dump(mode="json")
        except ValidationError as err:
            raise ValueError(f"the JSON does not match the schema: {format_validation_error(err)}") from None

    @staticmethod
    def _correction(error: str, schema: type[BaseModel] | None) -> Message:
        wanted = "Return only a JSON object"
        if schema is not None:
            wanted += f" matching this schema: {json.dumps(schema.model_json_schema(), ensure_ascii=False)}"
        return {
            "role": "user",
            "content": f"Your answer could not be used: {error}. {wanted}. No text before or after it.",
        }


# ---- offline template "LLM" ----------------------------------------------------------------------------
class TemplateLLMConfig(LLMConfig):
    template: str = Field(
        description="the answer: a Jinja template string or 'file:NAME.j2', rendered with the context "
        "plus `prompt` and `system` (the rendered prompts, or None)"
    )


@register_block
class TemplateLLM(LLMBlock):
    """A deterministic, offline stand-in for a language model: the answer is a rendered Jinja template.

    The default world runs on it (no key, no download); real worlds swap in `llm/openai` & co. with the
    same prompts and context.
    """

    block_type = "llm/template"
    Config = TemplateLLMConfig
    inline = True  # rendering a template costs far less than a Ray task
    requires_prompt = False

    def generate(self, messages: list[Message], **call: Any) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        prompt = next((m["content"] for m in messages if m["role"] == "user"), None)
        variables = {**dict(call.get("context") or {}), "prompt": prompt or None, "system": system}
        return render_prompt(self.config.template, variables)


# ---- remote APIs ---------------------------------------------------------------------------------------
_ENV_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")


def _literal_key_message(field: str, default: str) -> str:
    return (
        f"{field} must name an environment variable, e.g. '{default}', not hold a key: configs are saved "
        "with worlds and graphs, and keys must never be written to disk. Export the key "
        "(export NAME=...) and reference it as '${env:NAME}'"
    )


def _scrub(text: str, secret: str | None) -> str:
    """`text` with the secret (and any long fragment of it an API echoes back) masked."""
    if not secret:
        return text
    text = text.replace(secret, "***")
    if len(secret) >= 16:
        for size in (12, 8):
            for i in range(0, len(secret) - size + 1):
                text = text.replace(secret[i : i + size], "***")
    return text


class RemoteLLMConfig(LLMConfig):
    model: str = Field(description="model name at the endpoint (may be '${env:NAME}')")
    base_url: str | None = Field(
        None, description="endpoint URL (may be '${env:NAME}'); default: the vendor's"
    )
    api_key: str = Field(
        description="'${env:NAME}': the environment variable holding the key (never the key)"
    )
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(3, ge=0, le=20, description="retries of failed requests (exponential backoff)")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="extra JSON fields sent with requests"
    )

    @field_validator("api_key")
    @classmethod
    def _env_reference(cls, value: str) -> str:
        if not _ENV_REF.match(value):
            raise ValueError(_literal_key_message("api_key", "${env:API_KEY}"))
        return value


class RemoteLLM(LLMBlock):
    """Common plumbing of API-backed LLM blocks: key references, one cached client per endpoint and model,
    errors that name the endpoint and model (and never the key)."""

    vendor: ClassVar[str] = "API"
    default_base_url: ClassVar[str] = ""
    # One cache for all subclasses: its keys start with the block's class name.
    _clients: ClassVar[dict[tuple[str, ...], Any]] = {}
    _clients_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if not isinstance(config, BlockConfig) or overrides:
            raw = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
            key = {**raw, **overrides}.get("api_key")
            if isinstance(key, str) and not _ENV_REF.match(key):
                # Raised here so the rejected value never appears in the message (pydantic would quote it).
                default = self.Config.model_fields["api_key"].default
                raise ConfigError(_literal_key_message("config.api_key", default), path=self.block_type)
        super().__init__(config, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.block_type!r}, model={self.config.model!r})"

    # ---- clients -------------------------------------------------------------------------------------
    def _resolved(self, field: str) -> str | None:
        value = getattr(self.config, field)
        return resolve_env(value, path=f"{self.block_type}.{field}") if value is not None else None

    def endpoint(self) -> str:
        """The endpoint's URL as errors name it (no secrets: URLs come from config or the environment)."""
        return self._resolved("base_url") or self.default_base_url

    def _sdk(self) -> tuple[Callable[..., Any], type[Exception]]:
        """(client class, the SDK's base error class) of the vendor's client library, imported on use."""
        raise NotImplementedError

    def client(self) -> Any:
        """The shared client for this endpoint, key variable and model, created on first use (thread-safe).

        The key is read from the environment here, handed to the client and kept nowhere else; a changed
        key (rotation) gets a new client.
        """
        base_url, model = self._resolved("base_url"), self._resolved("model")
        api_key = resolve_env(self.config.api_key, path=f"{self.block_type}.api_key")
        cache_key = (type(self).__name__, base_url or "", self.config.api_key, model or "")
        with self._clients_lock:
            client = self._clients.get(cache_key)
            if client is None or client.api_key != api_key:
                client = self._sdk()[0](api_key=api_key, base_url=base_url)
                self._clients[cache_key] = client
        return client.with_options(timeout=self.config.timeout, max_retries=self.config.retries)

    def _call(self, send: Callable[[Any], Any]) -> Any:
        """`send(client)` with the shared client; the SDK's errors become ExecutionErrors (see `_fail`)."""
        error = self._sdk()[1]
        client = None
        try:
            client = self.client()
            return send(client)
        except error as err:
            raise self._fail(err, client) from None

    def _no_text(self, detail: str) -> ExecutionError:
        return ExecutionError(
            f"{self.block_type}: {self.endpoint()} returned no text for model '{self._resolved('model')}' "
            f"({detail})"
        )

    def _fail(self, err: Exception, client: Any | None) -> ExecutionError:
        key = getattr(client, "api_key", None)
        status = getattr(err, "status_code", None)
        what = f"answered HTTP {status}" if status else "failed"
        detail = _scrub(f"{type(err).__name__}: {err}", key)
        return ExecutionError(
            f"{self.block_type}: {self.vendor} endpoint {self.endpoint()} {what} for model "
            f"'{self._resolved('model')}' (timeout {self.config.timeout:g} s, retries {self.config.retries}): "
            f"{detail}"
        )


class OpenAIConfig(RemoteLLMConfig):
    api_key: str = Field(
        "${env:OPENAI_API_KEY}", description="'${env:NAME}': the environment variable holding the key"
    )
    json_mode: bool = Field(
        True,
        description="output=json: ask for response_format json_object (OpenAI then wants 'JSON' in the prompt)",
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="request field for the token limit (reasoning models want max_completion_tokens)",
    )


@register_block
class OpenAILLM(RemoteLLM):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ray Serve LLM, hosted models)."""

    block_type = "llm/openai"
    Config = OpenAIConfig
    vendor = "OpenAI-compatible"
    default_base_url = "https://api.openai.com/v1"

    def _sdk(self) -> tuple[Callable[..., Any], type[Exception]]:
        import openai

        return openai.OpenAI, openai.OpenAIError

    def generate(self, messages: list[Message], **call: Any) -> str:
        cfg = self.config
        request: dict[str, Any] = {"model": self._resolved("model"), "messages": messages}
        request[cfg.max_tokens_field] = cfg.max_tokens
        if cfg.temperature is not None:
            request["temperature"] = cfg.temperature
        if cfg.output == "json" and cfg.json_mode:
            request["response_format"] = {"type": "json_object"}
        if cfg.extra_body:
            request["extra_body"] = cfg.extra_body
        response = self._call(lambda client: client.chat.completions.create(**request))
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        if content is None:
            raise self._no_text(choices[0].finish_reason if choices else "no choices")
        return content


class AnthropicConfig(RemoteLLMConfig):
    api_key: str = Field(
        "${env:ANTHROPIC_API_KEY}", description="'${env:NAME}': the environment variable holding the key"
    )


@register_block
class AnthropicLLM(RemoteLLM):
    """Anthropic's Messages API (the system prompt goes in the top-level `system` parameter)."""

    block_type = "llm/anthropic"
    Config = AnthropicConfig
    vendor = "Anthropic"
    default_base_url = "https://api.anthropic.com"

    def _sdk(self) -> tuple[Callable[..., Any], type[Exception]]:
        import anthropic

        return anthropic.Anthropic, anthropic.AnthropicError

    def generate(self, messages: list[Message], **call: Any) -> str:
        cfg = self.config
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        request: dict[str, Any] = {
            "model": self._resolved("model"),
            "max_tokens": cfg.max_tokens,
            "messages": [m for m in messages if m["role"] != "system"],
        }
        if system:
            request["system"] = system
        if cfg.extra_body:
            request["extra_body"] = cfg.extra_body

        def send(client: Any) -> Any:
            if cfg.temperature is not None and _accepts(client.messages.create, "temperature"):
                # Anthropic's range is [0, 1]; recent clients (and models) no longer take a temperature.
                request["temperature"] = min(cfg.temperature, 1.0)
            return client.messages.create(**request)

        response = self._call(send)
        texts = [b.text for b in getattr(response, "content", None) or [] if getattr(b, "type", "") == "text"]
        if not texts:
            raise self._no_text(f"stop reason: {getattr(response, 'stop_reason', None)}")
        return "".join(texts)


def _accepts(method: Any, name: str) -> bool:
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return True


# ---- local transformers causal LM ----------------------------------------------------------------------
class LocalLLMConfig(LLMConfig):
    model: ModelRef = Field(
        description="a transformers causal LM directory or hub id ('<dir>' is short for it)"
    )
    tokenizer_subfolder: str | None = Field(
        None, description="where the tokenizer is, inside the model's source"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling (when temperature > 0)")
    adapter: AdapterRef | None = Field(None, description="a LoRA adapter to run with (set by LoRA worlds)")


class _SeededSampler:
    """A logits processor that samples the next token itself, from a torch.Generator, and leaves only that
    token possible: `generate` then runs greedy, so its caching and stopping stay as they are while the
    randomness comes from the run's seed (transformers' own sampling draws from the global RNG)."""

    def __init__(self, generator: Any, temperature: float, top_p: float):
        self.generator, self.temperature, self.top_p = generator, temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        device = self.generator.device if self.generator is not None else probs.device
        choice = torch.multinomial(probs.to(device), 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter(-1, choice, 0.0)


# Shared by `llm/transformers` and the OpenAI-compatible server (serve_apps/llm_server.py), so that one
# local model answers a chat the same way whichever of the two runs it.
def chat_prompt(tokenizer: Any, messages: list[Message]) -> tuple[str, bool]:
    """(text to tokenize, whether it already holds the special tokens the chat template adds): the
    tokenizer's chat template when it has one, else the messages' contents separated by blank lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return "\n\n".join(m["content"] for m in messages if m["content"]), False


def encode_chat(tokenizer: Any, messages: list[Message]) -> dict[str, Any]:
    """The chat as model inputs (`input_ids`, `attention_mask`; batch of one, on the CPU)."""
    text, templated = chat_prompt(tokenizer, messages)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=not templated))


def generate_tokens(
    model: Any,
    tokenizer: Any,
    encoded: Mapping[str, Any],
    *,
    max_new_tokens: int,
    temperature: float | None = 0.0,
    top_p: float = 1.0,
    generator: Any = None,
    stop: list[str] | None = None,
    **generate_options: Any,
) -> Any:
    """The new token ids (1-D) a causal LM generates after `encoded`.

    Greedy at temperature 0 / None; otherwise each token is sampled from `generator` (seeded: the same
    tokens every time). `stop` strings end generation once generated (they stay in the tokens; callers
    cut the text). `generate_options` go to `model.generate` (a streamer, stopping criteria).
    """
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoded.items()}
    settings = copy.deepcopy(model.generation_config)
    settings.update(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1)
    for name in ("temperature", "top_p", "top_k"):
        setattr(settings, name, None)
    if settings.pad_token_id is None:
        candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, settings.eos_token_id)
        settings.pad_token_id = next((c for c in candidates if c is not None), None)
    if stop:
        settings.stop_strings = list(stop)
        generate_options["tokenizer"] = tokenizer
    if temperature:  # 0 / None: greedy
        from transformers import LogitsProcessorList

        generate_options["logits_processor"] = LogitsProcessorList(
            [_SeededSampler(generator, temperature, top_p)]
        )
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=settings, **generate_options)
    return output[0, inputs["input_ids"].shape[1] :].cpu()


@register_block
class LocalLLM(LLMBlock, ModelBlock):
    """A local transformers causal LM (shared through the model pool). Uses the tokenizer's chat template
    when it has one; samples from the `rng` input (reproducible per run seed), greedy at temperature 0."""

    block_type = "llm/transformers"
    lora_targets = (
        None  # peft's attention projections for the model's architecture (q_proj/v_proj, c_attn, ...)
    )
    Config = LocalLLMConfig
    default_subfolder = None
    INPUTS = (*LLMBlock.INPUTS, Port("rng", K.RNG, optional=True, doc="generator state for sampling"))
    OUTPUTS = (*LLMBlock.OUTPUTS, Port("rng", K.RNG))

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._tokenizer: Any = None
        self._tokenizer_from_assets = False
        self._model_cls: type | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if not self._tokenizer_from_assets:
            state["_tokenizer"] = None  # reloaded through the pool where the block runs
        return state

    def model_class(self) -> type:
        # The concrete class (e.g. LlamaForCausalLM) rather than AutoModelForCausalLM: the loaders apply
        # dtype/device and rebuild saved architectures only for PreTrainedModel subclasses.
        if self._model_cls is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            ref = self.config.model
            cls: type = AutoModelForCausalLM
            if not ref.source.startswith("preset:"):
                try:
                    options = {"subfolder": ref.subfolder} if ref.subfolder else {}
                    if ref.revision and not Path(ref.source).expanduser().is_dir():
                        options["revision"] = ref.revision
                    model_config = AutoConfig.from_pretrained(str(Path(ref.source).expanduser()), **options)
                    cls = AutoModelForCausalLM._model_mapping[type(model_config)]
                except Exception:  # noqa: BLE001 - the loader reports a missing/odd model clearly
                    cls = AutoModelForCausalLM
            self._model_cls = cls
        return self._model_cls

    def tokenizer_ref(self) -> ModelRef:
        ref = self.config.model
        return ModelRef(source=ref.source, revision=ref.revision, subfolder=self.config.tokenizer_subfolder)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from worldgen.models.pool import default_pool

            self._tokenizer = default_pool().get(self.tokenizer_ref(), AutoTokenizer)
        return self._tokenizer

    def save_assets(self, directory: Path) -> None:
        super().save_assets(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer")

    def load_assets(self, directory: Path) -> None:
        super().load_assets(directory)
        if (directory / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
            self._tokenizer_from_assets = True

    def forward(
        self,
        context: Mapping[str, Any] | None = None,
        prompt: str | None = None,
        system: str | None = None,
        rng: RngState | None = None,
    ) -> dict[str, Any]:
        generator = generator_or_none(rng)
        out = self.complete(context, prompt, system, generator=generator)
        out["rng"] = RngState.of(generator) if generator is not None else rng
        return out

    def prompt_text(self, messages: list[Message]) -> tuple[str, bool]:
        """(text to tokenize, whether it already holds the special tokens the chat template adds)."""
        return chat_prompt(self.tokenizer, messages)

    def generate(self, messages: list[Message], **call: Any) -> str:
        tokenizer = self.tokenizer
        tokens = generate_tokens(
            self.model,
            tokenizer,
            encode_chat(tokenizer, messages),
            max_new_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            generator=call.get("generator"),
        )
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()
