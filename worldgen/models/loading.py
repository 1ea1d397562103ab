"""Loading diffusers/transformers components from a preset, a local directory or a hub id, and rebuilding
a component's architecture (without weights) for graph save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from worldgen.errors import ModelLoadError, did_you_mean
from worldgen.model_ref import ModelRef
from worldgen.models.presets import PRESET_PREFIX, build_preset_component, preset_config

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}

# Written next to the component's own config so a rebuilt model gets the dtype it was saved with.
_ARCH_META = "worldgen_architecture.json"


AUTO = "auto"


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype for a name such as 'float32', 'fp16'/'float16', 'bfloat16'/'bf16'.

    'auto' (a model reference's, copied into a graph's noise node) is float32 here: values made outside a model
    (noise, on the CPU) stay exact and are cast to the model's dtype where the model is (`resolve_dtype`).
    """
    key = str(name).lower().removeprefix("torch.")
    if key == AUTO:
        return torch.float32
    if key not in _DTYPES:
        raise ModelLoadError(
            f"unknown dtype '{name}'{did_you_mean(key, [*_DTYPES, AUTO])}; expected one of: "
            f"{', '.join([*_DTYPES, AUTO])}"
        )
    return _DTYPES[key]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a model is loaded in on `device`: the named one, or for 'auto' bfloat16 on a CUDA device that
    supports it (float16 on older ones: half the bytes of float32, tensor cores) and float32 elsewhere (CPUs
    have no fast half-precision kernels, and float32 keeps CPU runs exact)."""
    if str(name).lower() != AUTO:
        return dtype_from_name(name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def component_kind(cls: type) -> str:
    """'diffusers_model', 'scheduler', 'transformers_model' or 'tokenizer' (anything else loads like a tokenizer)."""
    from diffusers import ModelMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedModel

    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        return "diffusers_model"
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return "scheduler"
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        return "transformers_model"
    return "tokenizer"


def _where(ref: ModelRef, cls: type) -> str:
    sub = f", subfolder '{ref.subfolder}'" if ref.subfolder else ""
    return f"model '{ref.source}'{sub} as {getattr(cls, '__name__', cls)}"


def resolve_device(device: str | None) -> torch.device:
    """The device a model goes to: the reference's, else the GPU when this process has one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _finish(obj: Any, kind: str, dtype: torch.dtype, device: str | torch.device | None = None) -> Any:
    """Cast models to the requested dtype and device and put them in eval mode (inference is the default)."""
    if kind in ("diffusers_model", "transformers_model"):
        # Cast only when needed: diffusers warns on every `.to(dtype)` call, even a no-op one.
        if obj.dtype != dtype:
            obj = obj.to(dtype)
        target = torch.device(device) if device is not None else resolve_device(None)
        if obj.device != target:
            obj = obj.to(target)
        obj.eval()
    return obj


def _load_preset(ref: ModelRef, cls: type, kind: str, dtype: torch.dtype) -> Any:
    name = ref.source[len(PRESET_PREFIX) :]
    if not ref.subfolder:
        raise ModelLoadError(
            f"{_where(ref, cls)}: a preset reference needs a subfolder "
            "('unet', 'vae', 'text_encoder', 'tokenizer' or 'scheduler')"
        )
    obj = build_preset_component(name, ref.subfolder)
    if kind == "scheduler":
        # Like diffusers users do: the preset's (DDIM) config becomes whatever scheduler class was asked for.
        return cls.from_config(obj.config)
    # Auto* classes cannot be isinstance-checked; any built component satisfies them.
    if not cls.__name__.startswith("Auto") and not isinstance(obj, cls):
        raise ModelLoadError(
            f"{_where(ref, cls)}: the preset's '{ref.subfolder}' is a "
            f"{type(obj).__name__}, not a {cls.__name__}"
        )
    return obj


def _looks_like_path(source: str) -> bool:
    """True for filesystem paths; hub ids are 'name' or 'owner/name' (a missing path must not go to the hub)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _check_local(ref: ModelRef, cls: type, kind: str) -> None:
    """Clear errors for the common local-directory mistakes before diffusers/transformers give obscure ones."""
    root = Path(ref.source)
    if ref.subfolder and not (root / ref.subfolder).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise ModelLoadError(
            f"cannot load {_where(ref, cls)}: directory '{root}' has no subfolder '{ref.subfolder}'"
            f"{did_you_mean(ref.subfolder, found)} (found: {', '.join(found) or 'no subfolders'})"
        )
    config = {
        "scheduler": "scheduler_config.json",
        "diffusers_model": "config.json",
        "transformers_model": "config.json",
    }.get(kind)
    where = root / ref.subfolder if ref.subfolder else root
    if config and not (where / config).is_file():
        found = sorted(p.name for p in where.iterdir() if not p.name.startswith("."))
        raise ModelLoadError(
            f"cannot load {_where(ref, cls)}: directory '{where}' has no {config}, so it holds no "
            f"{cls.__name__} (found: {', '.join(found) or 'nothing'})"
        )


def component_config(source: str, subfolder: str, revision: str | None, cls: type) -> dict[str, Any]:
    """A component's config (its config.json) without loading its weights: a preset's from its table, a local
    directory's or a hub id's through `cls.load_config` (diffusers) or `cls.config_class` (transformers). Templates size graphs by it, and blocks check
    a run's inputs by it (`Block.check_inputs`) before any weights are loaded."""
    if source.startswith(PRESET_PREFIX):
        return preset_config(source[len(PRESET_PREFIX) :], subfolder)
    try:
        path = str(Path(source).expanduser())
        if (
            component_kind(cls) == "transformers_model"
        ):  # a text encoder: transformers' own config class reads it
            config = cls.config_class.from_pretrained(path, subfolder=subfolder, revision=revision)
            return config.to_dict()
        return dict(cls.load_config(path, subfolder=subfolder, revision=revision))
    except Exception as err:  # reported naming the source
        raise ModelLoadError(f"cannot read {subfolder}/config.json of '{source}': {err}") from None


def load_component(ref: ModelRef, cls: type, device: str | torch.device | None = None) -> Any:
    """Load the component of class `cls` that `ref` points to (preset, local directory or hub id).

    `cls` is a diffusers model or scheduler class, a transformers model class, or a tokenizer class.
    Models come back on `device` (the reference's when None, else a GPU when this process has one) in
    `ref.dtype` ('auto' resolved for that device), in eval mode, with `ref.runtime`'s options applied;
    schedulers are built from the stored config with `cls.from_config`, so any compatible scheduler class can be
    asked for.
    """
    from worldgen.models.runtime import apply_runtime

    target = torch.device(device) if device is not None else resolve_device(ref.device)
    dtype = resolve_dtype(ref.dtype, target)
    obj = _load(ref, cls, dtype, target)
    return apply_runtime(obj, ref.runtime, _where(ref, cls))


def _load(ref: ModelRef, cls: type, dtype: torch.dtype, device: torch.device) -> Any:
    kind = component_kind(cls)
    if ref.source.startswith(PRESET_PREFIX):
        try:
            return _finish(_load_preset(ref, cls, kind, dtype), kind, dtype, device)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot build {_where(ref, cls)}: {exc}") from exc

    local = Path(ref.source).expanduser().is_dir()
    if local:
        ref = ref.model_copy(update={"source": str(Path(ref.source).expanduser())})
        _check_local(ref, cls, kind)
    elif _looks_like_path(ref.source):
        raise ModelLoadError(
            f"cannot load {_where(ref, cls)}: directory '{ref.source}' does not exist "
            "(expected a local diffusers/transformers directory, a hub id or 'preset:<name>')"
        )
    # Hub ids only resolve where the hub cache (or network) has them; local directories need no revision.
    extra: dict[str, Any] = {} if local else {"revision": ref.revision}
    sub: dict[str, Any] = {"subfolder": ref.subfolder} if ref.subfolder else {}
    try:
        if kind == "scheduler":
            config = cls.load_config(ref.source, **sub, **extra)
            obj = cls.from_config(config)
        elif kind == "diffusers_model":
            obj = cls.from_pretrained(ref.source, **sub, **extra, torch_dtype=dtype, variant=ref.variant)
        elif kind == "transformers_model":
            variant = {"variant": ref.variant} if ref.variant else {}
            obj = cls.from_pretrained(ref.source, **sub, **extra, dtype=dtype, **variant)
        else:
            obj = cls.from_pretrained(ref.source, **sub, **extra)
    except Exception as exc:
        what = "a local directory" if local else "a hub id (no local directory of that name)"
        raise ModelLoadError(
            f"cannot load {_where(ref, cls)} from {what}: expected a diffusers/transformers "
            f"{'scheduler config' if kind == 'scheduler' else 'checkpoint'} there "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return _finish(obj, kind, dtype, device)


def save_architecture(obj: Any, directory: str | Path) -> None:
    """Write what is needed to rebuild `obj` without its weights (its config, or a tokenizer's files)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    kind = component_kind(type(obj))
    if kind in ("diffusers_model", "scheduler"):
        obj.save_config(path)
    elif kind == "transformers_model":
        obj.config.save_pretrained(path)
    else:
        obj.save_pretrained(path)
    meta: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "kind": kind}
    if kind in ("diffusers_model", "transformers_model"):
        meta["dtype"] = str(obj.dtype).removeprefix("torch.")
    (path / _ARCH_META).write_text(json.dumps(meta, indent=2) + "\n")


def build_from_architecture(cls: type, directory: str | Path) -> Any:
    """Rebuild a component of class `cls` from `save_architecture` output: models get fresh (random) weights."""
    path = Path(directory)
    kind = component_kind(cls)
    try:
        meta_file = path / _ARCH_META
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        if kind in ("diffusers_model", "scheduler"):
            obj = cls.from_config(cls.load_config(path))
        elif kind == "transformers_model":
            obj = cls._from_config(cls.config_class.from_pretrained(path))
        else:
            return cls.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot rebuild {getattr(cls, '__name__', cls)} from '{path}': expected the output of "
            f"save_architecture there ({type(exc).__name__}: {exc})"
        ) from exc
    if kind == "scheduler":
        return obj
    return _finish(obj, kind, dtype_from_name(meta.get("dtype", "float32")))
