"""Block base class: ports, config, call; ModelBlock, a block holding one model (references: model_ref.py)."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from worldgen.errors import ConfigError, format_validation_error
from worldgen.model_ref import AdapterRef, ModelRef
from worldgen.ports import Aggregation, Port, PortKind

_TRAINING = contextvars.ContextVar("worldgen_training", default=False)
# The LoRA files (worldgen.models.lora_files.LoraFile) fed to the model block being called: set by
# `ModelBlock.__call__` for the length of one call, read by `active_model` (which some forwards call again).
_CALL_LORAS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "worldgen_call_loras", default=()
)


@contextmanager
def training() -> Iterator[None]:
    """Blocks called inside keep their autograd graph (a training loss runs a graph's own blocks)."""
    token = _TRAINING.set(True)
    try:
        yield
    finally:
        _TRAINING.reset(token)


def inference(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a model block's `forward`: no autograd graph (inference), except inside `training()`."""

    @functools.wraps(forward)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _TRAINING.get():
            return forward(*args, **kwargs)
        import torch

        with torch.no_grad():
            return forward(*args, **kwargs)

    return wrapper


@dataclass
class Work:
    """What one call's values ask of a block, as far as the block itself sets it (`Block.check_inputs`): what a
    server's budgets (worldgen/limits.py) are checked against, and the batch sizes a graph must agree on."""

    width: int | None = None  # pixels of the images the call makes or takes
    height: int | None = None
    steps: int | None = None  # denoising steps
    batch: dict[str, int] = field(
        default_factory=dict
    )  # port -> the batch its value fixes (a latent's, an image's)
    items: dict[str, int] = field(
        default_factory=dict
    )  # port -> items in its value (a prompt list); 1 broadcasts


class BlockConfig(BaseModel):
    """Typed config of a block type. Subclass it per block type and set it as the block's `Config`."""

    model_config = ConfigDict(extra="forbid")


class Block:
    """A Lego piece: config + optional weights + typed ports; computes `forward(**inputs) -> {port: value}`.

    Subclasses set `block_type` ("role/impl"), `Config`, and `INPUTS`/`OUTPUTS` (or override
    `input_ports`/`output_ports` when ports depend on the config). `forward` must not mutate its inputs and
    must not keep per-call state on the block: anything that changes between calls travels through ports, so
    the same block can run in any process (or in several nodes at once).
    """

    block_type: ClassVar[str] = ""
    Config: ClassVar[type[BlockConfig]] = BlockConfig
    INPUTS: ClassVar[tuple[Port, ...]] = ()
    OUTPUTS: ClassVar[tuple[Port, ...]] = ()
    # Sub-millisecond pure-Python work (rendering a template): a distributed executor runs it where the run is
    # driven instead of paying a task round trip (~1-2 ms) for it.
    inline: ClassVar[bool] = False

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if isinstance(config, BlockConfig) and not overrides:
            self.config = config
        else:
            data = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
            data.update(overrides)
            try:
                self.config = self.Config.model_validate(data)
            except ValidationError as err:
                raise ConfigError(format_validation_error(err, "config"), path=self.block_type) from None

    @property
    def role(self) -> str:
        return self.block_type.split("/", 1)[0]

    def input_ports(self) -> dict[str, Port]:
        return {p.name: p for p in self.INPUTS}

    def output_ports(self) -> dict[str, Port]:
        return {p.name: p for p in self.OUTPUTS}

    def forward(self, **inputs: Any) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        return self.forward(**inputs)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        """Check, before a run, the values this block will be called with, and say what they ask of it.

        `inputs` holds the values known before anything runs (the run's inputs, defaults); a port fed by another
        node is absent. Raise ConfigError(path=<port>) for a value the block cannot take, so a server answers
        400 instead of failing mid-run. Loads no weights (a scheduler's or tokenizer's config is fine).
        """
        return Work()

    def loop_iterations(self, inputs: Mapping[str, Any]) -> int | None:
        """How many iterations a loop containing this block runs, given the values entering it (or None)."""
        return None

    def model_refs(self) -> dict[str, ModelRef]:
        """The models this block holds, by name (empty for light blocks)."""
        return {}

    def modules(self) -> dict[str, Any]:
        """The loaded models by name (loads them). Torch modules among them are checkpointed."""
        return {}

    def save_assets(self, directory: Path) -> None:
        """Write what rebuilding this block needs besides its config and weights (architectures, vocab)."""

    def load_assets(self, directory: Path) -> None:
        """Counterpart of `save_assets`: called before the checkpoint's weights are loaded."""

    def config_dict(self) -> dict[str, Any]:
        """The config as plain data, without values equal to the defaults."""
        return self.config.model_dump(mode="json", exclude_defaults=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.block_type!r})"


LORA_PORT = Port(
    "lora",
    PortKind.ADAPTER,
    optional=True,
    aggregate=Aggregation.CONCAT,
    doc="LoRA files (from adapter/lora nodes) this call runs with, on top of the block's own adapter",
)


def _lora_files(value: Any) -> tuple[Any, ...]:
    """A `lora` input as a tuple of LoraFile: one edge gives one value, several a list (in edge order)."""
    if value is None:
        return ()
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    from worldgen.models.lora_files import LoraFile

    for item in values:
        if not isinstance(item, LoraFile):
            raise ConfigError(
                f"expected LoRA files from adapter/lora nodes, got {type(item).__name__}", path="lora"
            )
    return values


class ModelConfig(BlockConfig):
    """Config of a block that holds one model."""

    model: ModelRef
    adapter: AdapterRef | None = None


class ModelBlock(Block):
    """A block holding one model (weights, a tokenizer or a scheduler config), loaded lazily through the pool.

    `model: "<source>"` in a config is short for `{source: ..., subfolder: <default_subfolder>}`.
    Building and validating a graph never loads weights; the first call (or `.model`) does.
    """

    Config: ClassVar[type[BlockConfig]] = ModelConfig
    default_subfolder: ClassVar[str | None] = None
    # Module names a LoRA adapter targets on this block's model (worldgen/lora.py); None: peft's default for
    # the model's architecture; False: the block takes no adapter (tokenizers, the VAE).
    lora_targets: ClassVar[tuple[str, ...] | None | bool] = False

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if not isinstance(config, BlockConfig):
            data = {**dict(config or {}), **overrides}
            if isinstance(data.get("model"), str):
                data["model"] = {"source": data["model"], "subfolder": self.default_subfolder}
            config, overrides = data, {}
        super().__init__(config, **overrides)
        self._model: Any = None
        self._placement: tuple | None = None
        self.model_origin: str | None = None  # None: the weights are the model reference's own

    def __getstate__(self) -> dict[str, Any]:
        # Weights never travel with a block (to a Ray worker, a host actor): they are loaded where the block
        # runs, from its model reference, or handed to its host actor explicitly.
        state = self.__dict__.copy()
        state["_model"], state["_placement"] = None, None
        return state

    def model_class(self) -> type:
        """The class the model is loaded as (imported lazily so building graphs stays light)."""
        raise NotImplementedError

    def lora_target_modules(self) -> list[str] | str | None:
        """peft's `target_modules` for an adapter on this block's model: a list of module-name suffixes, a regex
        over full module names, or None for peft's default for the model's architecture. Blocks whose targets
        depend on the loaded model (e.g. only a VLM's language model) override this."""
        return list(self.lora_targets) if isinstance(self.lora_targets, tuple) else None

    def lora_component(self) -> str | None:
        """The part of a LoRA file this block's model takes: its subfolder, named as diffusers' loaders prefix a
        file's keys (`unet`, `text_encoder`, `text_encoder_2`, `transformer`); None takes the keys unprefixed."""
        subfolder = self.config.model.subfolder
        return subfolder.rstrip("/").rsplit("/", 1)[-1] if subfolder else None

    def input_ports(self) -> dict[str, Port]:
        ports = super().input_ports()
        if self.lora_targets is not False and "lora" not in ports:
            ports["lora"] = LORA_PORT
        return ports

    def active_model(self) -> Any:
        """The model with this block's LoRA adapter (or none) and the LoRA files of the current call active: a
        model may carry the adapters of several worlds and graphs, and each call runs with its own."""
        if self.lora_targets is not False:
            from worldgen.models.adapters import activate_adapter

            extra: list[tuple[str, float]] = []
            if loras := _CALL_LORAS.get():
                from worldgen.models.lora_files import attach_lora_file

                component = self.lora_component()
                extra = [(f.key, f.weight) for f in loras if attach_lora_file(self.model, f, component)]
            activate_adapter(self.model, getattr(self.config, "adapter", None), extra)
        return self.model

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        loras = _lora_files(inputs.pop("lora", None)) if self.lora_targets is not False else ()
        token = _CALL_LORAS.set(loras)
        try:
            self.active_model()
            return self.forward(**inputs)
        finally:
            _CALL_LORAS.reset(token)

    @property
    def model(self) -> Any:
        if self._model is None:
            from worldgen.models.pool import default_pool

            self._model = default_pool().get(self.config.model, self.model_class())
        return self._model

    def set_model(self, model: Any, origin: str | None = None) -> None:
        """Use this already-loaded model (graph loading, tests). `origin` names where its weights come from
        when that is not the model reference (e.g. a saved checkpoint), so Ray hosts it separately."""
        self._model = model
        self._placement = None
        self.model_origin = origin

    def placement(self) -> tuple[Any, Any]:
        """(device, dtype) inputs must be moved to for the model.

        diffusers' `model.device`/`.dtype` walk every submodule (~0.6 ms on a UNet), too slow for the per-step
        path, so the answer is cached until the model's first parameter moves or changes dtype.
        """
        model = self.model
        first = next(model.parameters())
        key = (first.device, first.dtype)
        if self._placement is None or self._placement[0] != key:
            self._placement = (key, (model.device, model.dtype))
        return self._placement[1]

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def model_refs(self) -> dict[str, ModelRef]:
        return {"model": self.config.model}

    def save_assets(self, directory: Path) -> None:
        from worldgen.models.loading import save_architecture

        save_architecture(self.model, directory)

    def load_assets(self, directory: Path) -> None:
        if not directory.exists():
            return  # nothing saved: the model reference is loaded as usual
        from worldgen.models.loading import build_from_architecture, dtype_from_name

        model = build_from_architecture(self.model_class(), directory)
        dtype = dtype_from_name(self.config.model.dtype)
        if getattr(model, "dtype", dtype) != dtype:
            model = model.to(dtype)
        self.set_model(model, origin=str(directory))

    def modules(self) -> dict[str, Any]:
        return {"model": self.model}
