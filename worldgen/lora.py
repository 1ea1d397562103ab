"""LoRA worlds: adapters on a world's model blocks, saved in PEFT format, selected per call.

A world's trainable models are the weights of its model blocks that declare LoRA targets (the diffusion
backbone's attention projections, the text conditioner's projections, a local LLM's attention, a local VLM's
language-model attention). Preparing a world for training (`attach_adapters`) walks world -> stages ->
pipelines -> graphs -> blocks, injects one adapter per *model* (a model shared by several nodes gets one
adapter, so the optimizer sees its parameters once), freezes everything else and points the blocks at the
adapter. `save_adapters` writes each adapter as a PEFT adapter directory (`adapter_config.json` +
`adapter_model.safetensors`) and a manifest; `use_adapters` points a (custom) world's blocks at saved
adapters, which are loaded into the model the first time a block runs with them. A model holds many adapters
and each call activates its block's one (or none), so on Ray the base model stays in one host actor while
several custom worlds select their adapters per call.

    custom/adapters/adapters.json                       {"lora": {...}, "adapters": {KEY: {"blocks": [...]}}}
    custom/adapters/<KEY>/adapter_config.json           PEFT's LoraConfig
    custom/adapters/<KEY>/adapter_model.safetensors     the adapter's weights only
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worldgen.block import AdapterRef, ModelBlock
from worldgen.errors import ConfigError
from worldgen.models.adapters import activate_adapter, inject_adapter, loaded_adapters, tuner_layers
from worldgen.storage_io import atomic_write_text

MANIFEST = "adapters.json"
TRAINING_ADAPTER = "worldgen_training"  # not "train": a ModuleDict key may not shadow nn.Module.train


class LoraSettings(BaseModel):
    """Which blocks get adapters and how big they are (the `lora:` section of a training config)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    roles: list[str] | None = Field(None, description="world roles whose blocks get adapters (None: all)")
    nodes: list[str] | None = Field(
        None, description="glob patterns over block paths, e.g. 'creator.*.unet' (None: every eligible block)"
    )


@dataclass
class AdapterTarget:
    """One model that gets an adapter, and every block (by path) that uses it."""

    key: str  # the first block path using the model: names the adapter's folder
    model: Any
    target_modules: list[str] | str | None  # peft's: suffixes, a full-name regex, or its default
    blocks: list[tuple[str, ModelBlock]] = field(default_factory=list)

    @property
    def role(self) -> str:
        return self.key.split(".", 1)[0]


def eligible_models(world: Any, settings: LoraSettings) -> list[AdapterTarget]:
    """The models of `world` that get adapters under `settings`, one entry per model object (loads them)."""
    targets: dict[int, AdapterTarget] = {}
    for path, block in world.named_blocks():
        if not isinstance(block, ModelBlock) or block.lora_targets is False:
            continue
        role = path.split(".", 1)[0]
        if settings.roles is not None and role not in settings.roles:
            continue
        if settings.nodes is not None and not any(fnmatch.fnmatchcase(path, p) for p in settings.nodes):
            continue
        model = block.model
        target = targets.setdefault(id(model), AdapterTarget(path, model, block.lora_target_modules()))
        target.blocks.append((path, block))
    return list(targets.values())


def _lora_config(settings: LoraSettings, target_modules: list[str] | str | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        init_lora_weights=True,  # B = 0: a fresh adapter leaves the world's outputs unchanged
    )


def attach_adapters(world: Any, settings: LoraSettings, name: str = TRAINING_ADAPTER) -> list[AdapterTarget]:
    """Inject a fresh adapter `name` into every eligible model of `world`, freeze all other weights, and point
    the blocks at it. Returns the targets; `trainable_parameters(targets)` is what the optimizer gets."""
    targets = eligible_models(world, settings)
    if not targets:
        raise ConfigError(
            "no block of this world can take a LoRA adapter (with these roles/nodes); eligible: the diffusion "
            "backbone, the text conditioner, local LLMs and local VLMs (vlm/transformers)",
            path="lora",
        )
    for target in targets:
        target.model.requires_grad_(False)
        if name in loaded_adapters(
            target.model
        ):  # attached before (another run in this process): start afresh
            for layer in tuner_layers(target.model):
                if name in layer.lora_A:
                    layer.delete_adapter(name)
        inject_adapter(_lora_config(settings, target.target_modules), target.model, name)
        loaded_adapters(target.model).add(name)
        target.model.__dict__.pop("_worldgen_active", None)
        activate_adapter(target.model, AdapterRef(name=name))
        for param_name, param in target.model.named_parameters():
            param.requires_grad_(f".{name}." in param_name and "lora_" in param_name)
        for _, block in target.blocks:
            block.config.adapter = AdapterRef(name=name)
    return targets


def trainable_parameters(targets: list[AdapterTarget]) -> list[Any]:
    """The adapters' parameters, each once (a model shared by several blocks has one adapter)."""
    return [p for t in targets for p in t.model.parameters() if p.requires_grad]


def save_adapters(
    targets: list[AdapterTarget], directory: str | Path, settings: LoraSettings, name: str = TRAINING_ADAPTER
) -> Path:
    """Write each target's adapter `name` in PEFT format under `directory`, and the manifest."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    manifest: dict[str, Any] = {"lora": settings.model_dump(), "adapters": {}}
    for target in targets:
        folder = directory / target.key
        folder.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(target.model, adapter_name=name)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()},
            folder / "adapter_model.safetensors",
        )
        _lora_config(settings, target.target_modules).save_pretrained(folder)
        manifest["adapters"][target.key] = {"blocks": [path for path, _ in target.blocks]}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return directory


def base_state_dict(module: Any) -> dict[str, Any]:
    """The module's own weights under their own names, as if no adapter were attached: what a checkpoint of a
    shared model must hold, whatever custom worlds have attached to it in this process."""
    state = module.state_dict()
    if not any(True for _ in tuner_layers(module)):
        return state
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def load_base_state_dict(module: Any, state: dict[str, Any]) -> None:
    """`module.load_state_dict(state, strict=True)` for weights saved by `base_state_dict` (adapters kept)."""
    if not any(True for _ in tuner_layers(module)):
        module.load_state_dict(state, strict=True)
        return
    names = {k.replace(".base_layer.", "."): k for k in module.state_dict() if "lora_" not in k}
    missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    module.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)


def world_weight_bytes(world: Any) -> int:
    """Bytes of every weight of `world`'s models (each model once; adapters not counted)."""
    models = {id(b.model): b.model for _, b in world.named_blocks() if isinstance(b, ModelBlock)}
    return sum(
        p.numel() * p.element_size()
        for model in models.values()
        if hasattr(model, "named_parameters")  # a tokenizer holds no weights
        for name, p in model.named_parameters()
        if "lora_" not in name
    )


def adapter_bytes(directory: str | Path) -> int:
    """Bytes of the adapter weights saved under `directory`."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        LoraSettings.model_validate(manifest["lora"])
        if not isinstance(manifest["adapters"], dict):
            raise TypeError("`adapters` must be a mapping")
    except FileNotFoundError:
        raise ConfigError("no adapter manifest here", file=str(path)) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"not an adapter manifest: {err}", file=str(path)) from None
    return manifest


def use_adapters(world: Any, directory: str | Path) -> int:
    """Point `world`'s blocks at the saved adapters in `directory` (loaded on first use, wherever the block
    runs: in this process or on its model host). Returns the number of blocks changed."""
    directory = Path(directory).resolve()
    blocks = dict(world.named_blocks())
    changed = 0
    for key, entry in read_manifest(directory)["adapters"].items():
        folder = directory / key
        if not (folder / "adapter_model.safetensors").is_file():
            raise ConfigError(f"adapter '{key}' has no adapter_model.safetensors", file=str(folder))
        # the adapter's name on a shared model: unique per saved adapter, the same in every process
        name = "wg_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
        for path in entry["blocks"]:
            block = blocks.get(path)
            if not isinstance(block, ModelBlock):
                raise ConfigError(
                    f"adapter '{key}' is for block '{path}', which this world does not have (or holds no "
                    f"model); its model blocks: {', '.join(p for p, b in blocks.items() if isinstance(b, ModelBlock))}",
                    file=str(directory / MANIFEST),
                )
            block.config.adapter = AdapterRef(name=name, path=str(folder))
            changed += 1
    return changed
