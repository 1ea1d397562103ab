"""LoRA files (diffusers, kohya/A1111 or PEFT-named safetensors) as adapters on a shared model component.

A graph names a file through an `adapter/lora` node, whose output is a `LoraFile`; every model block it feeds
(a UNet, a transformer, a text encoder) takes the file's part for its own component, chosen by the block's
model subfolder as diffusers' `load_lora_weights` does (`unet`, `text_encoder`, `text_encoder_2`,
`transformer`). The file is parsed by diffusers' own `lora_state_dict` (which converts kohya keys) and loaded by
the component's own loader (`load_lora_adapter` / `load_lora_into_text_encoder`), so an image matches the
pipeline's by construction. The base weights are never copied: the file becomes a named peft adapter on the
one pooled (or hosted) instance, switched on per call by `worldgen.models.adapters.activate_adapter`.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldgen.errors import ConfigError

# kohya/A1111 key prefixes -> the diffusers component they belong to
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file as a graph applies it: what travels from an `adapter/lora` node to the blocks it feeds.

    `key` names the adapter on the shared model: the file's name plus a digest of its path, size and mtime, so
    two files with the same stem (or a file rewritten in place) never reuse each other's adapter."""

    name: str
    path: str
    weight: float
    key: str


def lora_file(path: str | Path, name: str | None = None, weight: float = 1.0) -> LoraFile:
    """Check `path` is a LoRA safetensors file (header only, nothing unpickled) and describe it."""
    file = Path(path).expanduser().resolve()
    lora_file_keys(file)  # exists, is safetensors, holds LoRA weights
    stat = file.stat()
    digest = hashlib.sha1(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    label = name or file.stem
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", label)  # peft adapter names are module-dict keys: no dots
    return LoraFile(name=label, path=str(file), weight=float(weight), key=f"{safe}-{digest}")


def lora_file_keys(file: Path) -> list[str]:
    """The tensor names in a LoRA safetensors file, from its header; ConfigError(path='path') when the file is
    missing, not safetensors (a pickle is never opened), or has keys that are not LoRA weights."""
    if not file.is_file():
        raise ConfigError(f"LoRA file not found: {file}", path="path")
    if file.suffix != ".safetensors":
        raise ConfigError(
            f"LoRA file {file.name}: only .safetensors files are loaded (pickled .bin/.ckpt/.pt files can run "
            "code when opened)",
            path="path",
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"LoRA file {file.name} is not a readable safetensors file: {err}", path="path"
        ) from None
    not_lora = [k for k in keys if "lora" not in k]
    if not keys or not_lora:
        raise ConfigError(
            f"LoRA file {file.name} holds no LoRA weights (every key names a 'lora' layer in the diffusers, "
            f"kohya and PEFT formats); found: {not_lora[:3] or '(no tensors)'}",
            path="path",
        )
    return keys


def file_components(keys: list[str]) -> set[str]:
    """The diffusers components a file has weights for (`unet`, `text_encoder`, ...), from its keys."""
    found = set()
    for key in keys:
        kohya = next((c for p, c in _KOHYA_PREFIXES.items() if key.startswith(p)), None)
        found.add(kohya or key.split(".", 1)[0])
    return found


def _loader_mixin(model: Any) -> tuple[type, dict[str, Any]]:
    """The diffusers LoRA loader whose `lora_state_dict` a pipeline with this model would use, and its extras."""
    import diffusers

    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        return diffusers.loaders.FluxLoraLoaderMixin, {}
    if name == "SD3Transformer2DModel":
        return diffusers.loaders.SD3LoraLoaderMixin, {}
    if name == "UNet2DConditionModel" and model.config.get("addition_embed_type") == "text_time":
        # SDXL maps kohya's SGM block numbers with the UNet's config, as StableDiffusionXLPipeline does
        return diffusers.loaders.StableDiffusionXLLoraLoaderMixin, {"unet_config": model.config}
    return diffusers.loaders.StableDiffusionLoraLoaderMixin, {}


def read_lora_file(spec: LoraFile, model: Any) -> tuple[dict[str, Any], dict[str, float] | None, Any]:
    """(state_dict, network_alphas, metadata) as the pipeline's `lora_state_dict` reads the file for `model`."""
    mixin, extra = _loader_mixin(model)
    file = Path(spec.path)
    out = mixin.lora_state_dict(
        str(file.parent),
        weight_name=file.name,
        use_safetensors=True,  # and so no pickle fallback
        local_files_only=True,
        return_lora_metadata=True,
        **extra,
    )
    if len(out) == 3:
        return out
    state_dict, metadata = out  # SD3 (and Flux without kohya alphas) return no alphas
    return state_dict, None, metadata


def attach_lora_file(model: Any, spec: LoraFile, component: str | None) -> bool:
    """Load `spec`'s part for `component` onto `model` as adapter `spec.key` (once per model); whether the file
    has weights for this component (a UNet-only LoRA wired to a text encoder is fine and changes nothing)."""
    attached: dict[str, bool] = model.__dict__.setdefault("_worldgen_lora_files", {})
    if spec.key in attached:
        return attached[spec.key]
    state_dict, alphas, metadata = read_lora_file(spec, model)
    prefix = f"{component}." if component else ""
    mine = [k for k in state_dict if k.startswith(prefix)]
    if not mine:
        attached[spec.key] = False
        return False
    _load(model, spec, component, state_dict, alphas, metadata, mine)
    from worldgen.models.adapters import loaded_adapters, tuner_layers

    if not any(spec.key in layer.lora_A for layer in tuner_layers(model)):
        _unmatched(spec, component, mine, "no module took its weights")
    for layer in tuner_layers(model):  # served, never trained here
        if spec.key in layer.lora_A:
            layer.lora_A[spec.key].requires_grad_(False)
            layer.lora_B[spec.key].requires_grad_(False)
    attached[spec.key] = True
    loaded_adapters(model).add(spec.key)
    model.__dict__.pop("_worldgen_active", None)  # loading may have changed which adapters are on
    return True


def _load(
    model: Any,
    spec: LoraFile,
    component: str | None,
    state_dict: dict[str, Any],
    alphas: dict[str, float] | None,
    metadata: Any,
    mine: list[str],
) -> None:
    from worldgen.models.adapters import keeping_trainable_flags

    try:
        with keeping_trainable_flags(model):
            if hasattr(
                model, "load_lora_adapter"
            ):  # a diffusers model (UNet, SD3/Flux transformer): its own loader
                with warnings.catch_warnings():  # "multiple adapters in the model": on purpose, one per file
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    model.load_lora_adapter(
                        state_dict,
                        prefix=component,
                        network_alphas=alphas,
                        adapter_name=spec.key,
                        metadata=metadata,
                    )
            else:
                _load_into_text_encoder(model, spec, component, state_dict, alphas, metadata)
    except (ValueError, KeyError, RuntimeError) as err:
        _forget(model, spec.key)
        _unmatched(spec, component, mine, str(err).splitlines()[0])


def _load_into_text_encoder(
    model: Any,
    spec: LoraFile,
    component: str | None,
    state_dict: dict[str, Any],
    alphas: dict[str, float] | None,
    metadata: Any,
) -> None:
    """diffusers' `load_lora_into_text_encoder`, step for step, with peft injecting the adapter itself.

    diffusers hands the converted weights to transformers' `load_adapter`, whose PEFT integration (transformers
    5) refuses every peft release so far (it asks for peft >= 0.22): the same conversions and LoraConfig are
    applied here, and peft's `inject_adapter_in_model` + `set_peft_model_state_dict` load them as
    `load_adapter` would."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import set_peft_model_state_dict

    from worldgen.models.adapters import inject_adapter

    prefix = f"{component}." if component else ""
    state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if metadata is not None and prefix:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(model, "text_model"):  # CLIPTextModel is flattened in recent transformers
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    projections = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
    rank = {
        f"{name}.lora_B.weight": state[f"{name}.lora_B.weight"].shape[1]
        for name, _ in model.named_modules()
        if name.endswith(projections) and f"{name}.lora_B.weight" in state
    }
    if alphas is not None and component:
        alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.split(".")[0] == component}
    config = _create_lora_config(state, alphas, metadata, rank, is_unet=False)
    inject_adapter(config, model, spec.key)
    result = set_peft_model_state_dict(model, state, adapter_name=spec.key)
    unexpected = [k for k in getattr(result, "unexpected_keys", None) or [] if ".lora_" in k]
    if unexpected:
        raise ValueError(f"weights for modules the model does not have: {unexpected[:3]}")
    model.to(device=model.device, dtype=model.dtype)  # the new layers where the model is


def _forget(model: Any, key: str) -> None:
    """Take a half-loaded adapter off the model again (a failed load must leave the shared model as it was)."""
    from worldgen.models.adapters import tuner_layers

    for layer in tuner_layers(model):
        if key in layer.lora_A:
            layer.delete_adapter(key)
    getattr(model, "peft_config", {}).pop(key, None)


def _unmatched(spec: LoraFile, component: str | None, keys: list[str], why: str) -> None:
    raise ConfigError(
        f"LoRA '{spec.name}': its {component or 'model'} weights match no module of the {component or 'model'} "
        f"({why}); first keys: {keys[:3]}",
        file=spec.path,
        path="lora.path",
    )
