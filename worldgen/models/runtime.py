"""Acceleration options of a loaded model (`ModelRef.runtime`): channels-last weights, the attention backend,
torch.compile. Applied once, right after loading, wherever the model lives (a model host, the local pool)."""

from __future__ import annotations

from typing import Any

import torch

from worldgen.errors import ModelLoadError
from worldgen.model_ref import Runtime

# transformers' names for the attention backends (`attn_implementation`)
_TRANSFORMERS_ATTENTION = {"sdpa": "sdpa", "math": "eager", "eager": "eager"}


def apply_runtime(model: Any, runtime: Runtime, where: str = "the model") -> Any:
    """`model` with `runtime`'s options applied (in place where possible; the same object comes back).

    Only torch modules are touched: a tokenizer or a scheduler has nothing to accelerate. `where` names the
    model in errors.
    """
    if not isinstance(model, torch.nn.Module) or runtime == Runtime():
        return model
    if runtime.channels_last:
        # 4-D conv weights only: other parameters have no channels-last layout (and keep their own)
        model = model.to(memory_format=torch.channels_last)
    if runtime.attention != "default":
        _set_attention(model, runtime.attention, where)
    if runtime.compile:
        mode = "default" if runtime.compile is True else runtime.compile
        # Module.compile compiles forward in place: the model keeps its class, config and state dict keys
        # (torch.compile(model) would return a wrapper that isinstance checks and checkpoints do not expect).
        model.compile(mode=mode)
    return model


def _set_attention(model: torch.nn.Module, backend: str, where: str) -> None:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if isinstance(model, ModelMixin):
        if not hasattr(model, "set_attn_processor"):
            raise ModelLoadError(
                f"{where}: runtime.attention '{backend}' needs attention layers, and "
                f"{type(model).__name__} has none to switch (use attention: default)"
            )
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        # Only the plain processors are interchangeable: a family's own (Flux, SD3 joint attention) computes
        # something else, and replacing it would change the model's output.
        other = {type(p).__name__ for p in model.attn_processors.values()} - {
            "AttnProcessor",
            "AttnProcessor2_0",
        }
        if other:
            raise ModelLoadError(
                f"{where}: runtime.attention '{backend}' switches the plain attention processors, and "
                f"{type(model).__name__} uses its own ({', '.join(sorted(other))}); use attention: default"
            )
        model.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    elif isinstance(model, PreTrainedModel):
        try:
            model.set_attn_implementation(_TRANSFORMERS_ATTENTION[backend])
        except (ValueError, ImportError) as err:  # a model without that backend says so
            raise ModelLoadError(f"{where}: runtime.attention '{backend}': {err}") from None
    else:
        raise ModelLoadError(
            f"{where}: runtime.attention '{backend}' applies to diffusers and transformers models, not to "
            f"{type(model).__name__} (use attention: default)"
        )
