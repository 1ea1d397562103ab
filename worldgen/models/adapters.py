"""LoRA adapters on a loaded model: injecting one, listing those attached, and switching the active one.

A model may carry the adapters of several worlds (one model host serves them all); each block call runs with
its own block's adapter active (`ModelBlock.active_model`). Preparing a world's adapters (which models, saving,
the manifest) is worldgen/lora.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worldgen.errors import ConfigError
from worldgen.model_ref import AdapterRef


@contextmanager
def keeping_trainable_flags(model: Any) -> Iterator[None]:
    """Adding adapters inside leaves the model's own trainable flags as they were: peft marks only adapters
    trainable, and a shared model keeps its own flags (training freezes explicitly)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for param_name, param in model.named_parameters():
            base_name = param_name.replace(".base_layer", "")
            if param_name in flags or base_name in flags:
                param.requires_grad_(flags.get(param_name, flags.get(base_name)))


def inject_adapter(config: Any, model: Any, name: str) -> None:
    """Add adapter `name` (a peft LoraConfig) to `model`, leaving the model's own trainable flags as they are."""
    import warnings

    from peft import inject_adapter_in_model

    with keeping_trainable_flags(model), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Already found a `peft_config`"
        )  # on purpose: one per world
        inject_adapter_in_model(config, model, adapter_name=name)


def tuner_layers(model: Any) -> Iterable[Any]:
    """The model's peft LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def loaded_adapters(model: Any) -> set[str]:
    """Names of the adapters attached to `model` (kept on the model object, shared by its users)."""
    return model.__dict__.setdefault("_worldgen_adapters", set())


_UNKNOWN = object()  # no active set recorded (or an adapter was added since): walk the layers


def activate_adapter(model: Any, ref: AdapterRef | None, extra: Sequence[tuple[str, float]] = ()) -> None:
    """Make `ref`'s adapter (a world's, loading it on first use) and the `extra` adapters already on the model
    (LoRA files: (adapter name, weight), see worldgen/models/lora_files.py) the active set, weighted as
    diffusers' `set_adapters(names, weights)` does; none active when both are empty.

    The set is remembered on the model, so a denoising loop calling the same block each step walks the layers
    only when the set changes (another graph's call in between)."""
    loaded = loaded_adapters(model)
    wanted = (((ref.name, 1.0),) if ref is not None else ()) + tuple(extra)
    if model.__dict__.get("_worldgen_active", _UNKNOWN) == wanted or (not wanted and not loaded):
        return  # already so: a denoising loop calls the same block many times
    if ref is not None and ref.name not in loaded:
        if ref.path is None:
            raise ConfigError(f"adapter '{ref.name}' is not attached to this model and has no path to load")
        _load_adapter(model, ref)
        loaded.add(ref.name)
    training = {ref.name} if ref is not None and ref.path is None else set()
    for layer in tuner_layers(model):
        present = [(name, weight) for name, weight in wanted if name in layer.lora_A]
        if not present:  # a layer only other adapters target stays off
            layer.enable_adapters(False)
            continue
        layer.set_adapter([name for name, _ in present])  # in the given order: the sum's order, as diffusers
        layer.enable_adapters(True)  # (re-marks the active adapters trainable: frozen again below)
        for name, weight in present:
            layer.set_scale(name, weight)
            if name not in training:  # `set_adapter` marks it trainable; a loaded adapter is only served
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)
    model.__dict__["_worldgen_active"] = wanted


def _load_adapter(model: Any, ref: AdapterRef) -> None:
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(ref.path)
    inject_adapter(LoraConfig.from_pretrained(folder), model, ref.name)
    weights = load_file(folder / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights, adapter_name=ref.name)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(
            f"adapter weights do not fit this model: {result.unexpected_keys[:3]}", file=str(folder)
        )
