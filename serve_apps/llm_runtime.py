"""Local chat models for the OpenAI-compatible server (`serve_apps.llm_server`), one runtime per replica.

Why a runtime of its own: Serve's multiplexer caches *model ids* (a base model or a LoRA adapter) and evicts
them LRU, but adapters share their base's weights. The runtime keeps what is really in memory: each base
model loaded once per process while any model id on it is open, each adapter attached once (peft, several
adapters on one `PeftModel`, switched per request), everything counted so that a replica can report what it
loaded. Generation reuses `llm/transformers`' helpers (`worldgen.nodes.llm`), so one model answers a chat the
same way through the server and through the block.

No Ray or Serve import here: the runtime is plain Python, driven by the Serve deployment.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from worldgen.nodes.llm import encode_chat, generate_tokens

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "float16", "bfloat16"]
MIN_TEMPERATURE = 1e-4  # below it, sampling is greedy in all but name and dividing by it overflows


class RequestError(ValueError):
    """A request this model cannot serve as asked (a chat its template rejects, a prompt longer than the
    model's context): the client's error, answered with HTTP 400."""


class GenerationRequest(BaseModel):
    """What one chat completion asks of a model (the OpenAI request, already checked and normalised)."""

    messages: list[dict[str, str]]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class Completion(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def check_model_dir(path: str, what: str, marker: str) -> Path:
    """`path` as a directory holding `marker` (config.json, adapter_config.json); ValueError naming `what`."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{what}: {path} is not a directory")
    if not (directory / marker).is_file():
        raise ValueError(f"{what}: {path} has no {marker}")
    return directory


# ---- text as it streams --------------------------------------------------------------------------------
def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence (which OpenAI leaves out of the answer), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class TextDeltas:
    """Turns a growing list of token ids into text increments whose concatenation is the final answer.

    Each step decodes all tokens so far (byte-level tokens may split a character; decoding the whole
    sequence keeps the text exact) and emits what is new, holding back an incomplete character and the
    tail that could still become a stop sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text, hit = cut_at_stop(self.decode(self.ids), self.stop)
        if hit:
            self.stopped = True
            return self._advance(text)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next bytes
            return ""
        return self._advance(text[: len(text) - self.hold])

    def finish(self, final: str) -> str:
        """The rest of the final answer; a final text that no longer extends what was sent is logged."""
        if not final.startswith(self.emitted):
            log.warning("streamed text diverged from the final decoding; the stream keeps what was sent")
            return ""
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class _Streamer:
    """A transformers streamer: skips the prompt `generate` pushes first, hands on each new token's id."""

    def __init__(self, on_tokens: Callable[[list[int]], None]):
        self.on_tokens = on_tokens
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_tokens([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion: ends generation once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


# ---- what is in memory ---------------------------------------------------------------------------------
class _Base:
    """One base model in memory, with the LoRA adapters attached to it. `lock` serialises generation and
    adapter changes: the active adapter is state of the shared modules."""

    def __init__(self, name: str, model: Any, tokenizer: Any):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.lock = threading.Lock()
        self.peft: Any = None  # a PeftModel around `model` once an adapter is attached
        self.adapters: Counter[str] = Counter()  # attached adapter -> open model ids using it
        self.users = 0  # open model ids on this base (itself and its adapters)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(model, tokenizer)  # tokens that end an answer ("stop", not "length")

    @contextmanager
    def selected(self, adapter: str | None) -> Iterator[None]:
        """The base's modules with `adapter` active (None: the base alone). Hold `lock`."""
        if self.peft is None:
            yield
        elif adapter is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(adapter, inference_mode=True)
            yield


class ModelRuntime:
    """The models of one replica: configured base models (local transformers dirs) and LoRA adapters
    (peft dirs on a named base), opened by model id, loaded on first use and freed when nothing uses them."""

    def __init__(
        self,
        models: Mapping[str, str],
        adapters: Mapping[str, tuple[str, str]],
        dtype: DType = "auto",
        default_max_tokens: int = 512,
    ):
        self.models = {
            name: check_model_dir(p, f"models.{name}", "config.json") for name, p in models.items()
        }
        self.adapters = {
            name: (base, check_model_dir(p, f"adapters.{name}.path", "adapter_config.json"))
            for name, (base, p) in adapters.items()
        }
        self.dtype, self.default_max_tokens = dtype, default_max_tokens
        self._bases: dict[str, _Base] = {}
        self._lock = threading.RLock()  # counts and attach/detach; taken before a base's lock, never after
        self.base_loads: Counter[str] = Counter()
        self.adapter_loads: Counter[str] = Counter()
        self.completions: Counter[str] = Counter()

    def open(self, model_id: str) -> ServedModel:
        """A handle on `model_id`, loading its base and attaching its adapter if needed (blocking)."""
        if model_id in self.models:
            base_name, adapter = model_id, None
        elif model_id in self.adapters:
            base_name, adapter = self.adapters[model_id][0], model_id
        else:
            raise KeyError(f"unknown model '{model_id}'")
        with self._lock:
            base = self._acquire_base(base_name)
            try:
                if adapter is not None:
                    self._attach(base, adapter)
            except BaseException:
                self._release_base(base)
                raise
        return ServedModel(self, model_id, base, adapter)

    def report(self) -> dict[str, Any]:
        """What this process loaded: loads from disk per base and adapter (a base shared by adapters loads
        once), the bases in memory with their attached adapters, and completions served per model id."""
        with self._lock:
            return {
                "base_loads": dict(self.base_loads),
                "adapter_loads": dict(self.adapter_loads),
                "loaded": {name: sorted(b.adapters) for name, b in self._bases.items()},
                "completions": dict(self.completions),
            }

    def count_completion(self, model_id: str) -> None:
        with self._lock:
            self.completions[model_id] += 1

    # ---- loading -------------------------------------------------------------------------------------
    def _acquire_base(self, name: str) -> _Base:
        base = self._bases.get(name)
        if base is None:
            base = self._bases[name] = self._load_base(name)
        base.users += 1
        return base

    def _load_base(self, name: str) -> _Base:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.models[name]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype: Any = self.dtype
        if dtype == "auto":
            dtype = "auto" if device == "cuda" else torch.float32  # half precision is slow or absent on CPUs
        log.info("loading base model '%s' from %s (%s, %s)", name, path, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.base_loads[name] += 1
        return _Base(name, model, tokenizer)

    def _attach(self, base: _Base, adapter: str) -> None:
        if base.adapters[adapter] == 0:
            path = self.adapters[adapter][1]
            log.info("attaching LoRA adapter '%s' from %s to '%s'", adapter, path, base.name)
            with base.lock:
                if base.peft is None:
                    from peft import PeftModel

                    base.peft = PeftModel.from_pretrained(base.model, path, adapter_name=adapter)
                else:
                    base.peft.load_adapter(path, adapter_name=adapter)
                base.peft.eval()
            self.adapter_loads[adapter] += 1
        base.adapters[adapter] += 1

    def close(self, model: ServedModel) -> None:
        """Give back what `model` held: its adapter once no open id uses it, its base once nothing does."""
        with self._lock:
            base = model.base
            adapter = model.adapter
            if adapter is not None:
                base.adapters[adapter] -= 1
                if base.adapters[adapter] <= 0:
                    del base.adapters[adapter]
                    with base.lock:
                        if base.adapters:
                            base.peft.delete_adapter(adapter)
                        else:  # the last adapter: take the LoRA layers out again
                            base.model = base.peft.unload()
                            base.peft = None
                    log.info("detached LoRA adapter '%s' from '%s'", adapter, base.name)
            self._release_base(base)

    def _release_base(self, base: _Base) -> None:
        base.users -= 1
        if base.users <= 0:
            del self._bases[base.name]
            base.model = base.peft = None
            gc.collect()
            _empty_device_cache()
            log.info("unloaded base model '%s'", base.name)


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ServedModel:
    """An open model id, as Serve's multiplexer caches it. Serve calls `__del__` when it evicts the id; what
    the id holds is given back then, or when the last request still running on it ends."""

    def __init__(self, runtime: ModelRuntime, model_id: str, base: _Base, adapter: str | None):
        self.runtime, self.model_id, self.base, self.adapter = runtime, model_id, base, adapter
        self._state = threading.Lock()
        self._running = 0
        self._evicted = self._closed = False

    # ---- lifetime ------------------------------------------------------------------------------------
    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the model while a request runs on it. Enter it right after the multiplexer hands the model
        out (no `await` in between): an eviction then waits for the request instead of pulling the model
        from under it."""
        with self._state:
            if self._closed:
                raise RuntimeError(f"model '{self.model_id}' was unloaded")
            self._running += 1
        try:
            yield
        finally:
            with self._state:
                self._running -= 1
                close = self._evicted and self._running == 0 and not self._closed
                self._closed = self._closed or close
            if close:
                self.runtime.close(self)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is None:
            return
        with state:
            self._evicted = True
            close = self._running == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self.runtime.close(self)

    # ---- generation ----------------------------------------------------------------------------------
    def complete(self, request: GenerationRequest) -> Completion:
        """The whole answer (blocking; inside `in_use`)."""
        return self._generate(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Events as generation goes: {"type": "start", "prompt_tokens"} once the prompt is accepted, then
        {"type": "delta", "text"} per new piece of text, then {"type": "end", **Completion}. Generation runs
        in a thread; closing the iterator early stops it. Iterate inside `in_use`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def push(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                push("end", self._generate(request, push=push, cancel=cancel))
            except BaseException as err:  # noqa: BLE001 - re-raised on the event loop's side
                push("error", err)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    yield {"type": "end", **value.model_dump()}
                    return
                yield {"type": kind, **value}
        finally:
            cancel.set()
            await asyncio.shield(worker)

    def _generate(
        self,
        request: GenerationRequest,
        push: Callable[[str, dict[str, Any]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        import torch

        base = self.base
        tokenizer = base.tokenizer
        try:
            encoded = encode_chat(tokenizer, request.messages)
        except Exception as err:  # noqa: BLE001 - a chat template raising on this chat
            raise RequestError(f"model '{self.model_id}' cannot format this chat: {err}") from None
        prompt_tokens = int(encoded["input_ids"].shape[1])
        max_new = self._max_new_tokens(request, prompt_tokens)
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None

        def decode(ids: Any) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        options: dict[str, Any] = {}
        deltas = TextDeltas(decode, request.stop)
        if push is not None:
            push("start", {"prompt_tokens": prompt_tokens})

            def on_tokens(ids: list[int]) -> None:
                delta = deltas.add(ids)
                if delta:
                    push("delta", {"text": delta})

            options["streamer"] = _Streamer(on_tokens)
        if cancel is not None:
            from transformers import StoppingCriteriaList

            options["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        with base.lock, base.selected(self.adapter):
            tokens = generate_tokens(
                base.model,
                tokenizer,
                encoded,
                max_new_tokens=max_new,
                temperature=request.temperature if request.temperature >= MIN_TEMPERATURE else 0.0,
                top_p=request.top_p,
                generator=generator,
                stop=request.stop or None,
                **options,
            )
        text, hit = cut_at_stop(decode(tokens), request.stop)
        ended = len(tokens) > 0 and int(tokens[-1]) in base.eos_ids
        reason: Literal["stop", "length"] = (
            "length" if len(tokens) >= max_new and not (hit or ended) else "stop"
        )
        if push is not None:
            rest = deltas.finish(text)
            if rest:
                push("delta", {"text": rest})
        self.runtime.count_completion(self.model_id)
        return Completion(
            text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=len(tokens)
        )

    def _max_new_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """The request's limit (or the server's default), within what the model's context leaves."""
        wanted = request.max_tokens or self.runtime.default_max_tokens
        context = self.base.context
        if context is None:
            return wanted
        if prompt_tokens >= context:
            raise RequestError(
                f"the prompt is {prompt_tokens} tokens long; model '{self.model_id}' takes at most {context}"
            )
        return min(wanted, context - prompt_tokens)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


__all__ = [
    "Completion",
    "GenerationRequest",
    "ModelRuntime",
    "RequestError",
    "ServedModel",
    "TextDeltas",
    "check_model_dir",
    "cut_at_stop",
]
