"""Checkpoints: the weights of every level in one safetensors file, keys prefixed by node id.

A model used by several nodes (a shared block, or two blocks with the same model reference) is stored once,
under the first node that uses it; the others are recorded as aliases in the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worldgen.block import Block
from worldgen.errors import ConfigError
from worldgen.lora import base_state_dict, load_base_state_dict
from worldgen.storage_io import atomic_write

FORMAT = "worldgen.checkpoint"


def _torch_modules(block: Block) -> dict[str, Any]:
    import torch

    return {name: m for name, m in block.modules().items() if isinstance(m, torch.nn.Module)}


def _prefix(node_id: str, name: str) -> str:
    return node_id if name == "model" else f"{node_id}.{name}"


def collect_state(blocks: Iterable[tuple[str, Block]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors keyed '<node>.<param>', aliases {prefix: prefix it shares weights with})."""
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    owner: dict[int, str] = {}
    storages: set[int] = set()
    for node_id, block in blocks:
        for name, module in _torch_modules(block).items():
            prefix = _prefix(node_id, name)
            if id(module) in owner:
                aliases[prefix] = owner[id(module)]
                continue
            owner[id(module)] = prefix
            for key, value in base_state_dict(module).items():  # never the adapters custom worlds attached
                value = value.detach().contiguous()
                if value.data_ptr() in storages:  # tied weights: safetensors refuses shared storage
                    value = value.clone()
                storages.add(value.data_ptr())
                tensors[f"{prefix}.{key}"] = value
    return tensors, aliases


def save_checkpoint(blocks: Iterable[tuple[str, Block]], path: str | Path) -> Path:
    from safetensors.torch import save_file

    tensors, aliases = collect_state(blocks)
    metadata = {"format": FORMAT, "aliases": json.dumps(aliases)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(blocks: Iterable[tuple[str, Block]], path: str | Path) -> None:
    """Load weights into the blocks' models (strict: every parameter present, no extras per node)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    aliases = json.loads(metadata.get("aliases", "{}"))
    loaded: set[int] = set()
    for node_id, block in blocks:
        for name, module in _torch_modules(block).items():
            if id(module) in loaded:
                continue
            prefix = _prefix(node_id, name)
            prefix = aliases.get(prefix, prefix)
            state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            if not state:
                raise ConfigError(
                    f"checkpoint has no weights for node '{node_id}' (prefix '{prefix}.')", file=str(path)
                )
            try:
                load_base_state_dict(module, state)
            except RuntimeError as err:
                raise ConfigError(
                    f"weights for node '{node_id}' do not fit its model: {err}", file=str(path)
                ) from None
            loaded.add(id(module))


CHECKPOINT_FILE = "checkpoint.safetensors"
ASSETS_DIR = "assets"


def save_weights(blocks: list[tuple[str, Block]], directory: Path) -> None:
    """Each block's assets (once per block) under `assets/<node>/`, and every weight once in the checkpoint."""
    seen: set[int] = set()
    for node_id, block in blocks:
        if id(block) not in seen:
            seen.add(id(block))
            block.save_assets(directory / ASSETS_DIR / node_id)
    save_checkpoint(blocks, directory / CHECKPOINT_FILE)


def load_weights(blocks: list[tuple[str, Block]], directory: Path) -> None:
    """Counterpart of `save_weights`: rebuild models from their assets, then fill in the checkpoint's weights.

    Blocks whose model references are the same model share one rebuilt instance, as they did when saved.
    """
    from worldgen.block import ModelBlock

    rebuilt: dict[str, ModelBlock] = {}  # identity key -> the block that rebuilt that model
    seen: set[int] = set()
    for node_id, block in blocks:
        if id(block) in seen:
            continue
        seen.add(id(block))
        ref = block.config.model if isinstance(block, ModelBlock) else None
        key = ref.identity_key() if ref is not None and ref.reuse else None
        if key in rebuilt:
            block.set_model(rebuilt[key].model, origin=rebuilt[key].model_origin)
            continue
        block.load_assets(directory / ASSETS_DIR / node_id)
        if key is not None and block.model_loaded:
            rebuilt[key] = block
    if (directory / CHECKPOINT_FILE).exists():
        load_checkpoint(blocks, directory / CHECKPOINT_FILE)
