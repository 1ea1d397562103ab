"""How many bytes a model takes once loaded, known before loading it: what a model host's GPU share is sized
from (actors/placement.py). Reads only what is cheap: safetensors headers, a preset's tiny build."""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any

from worldgen.errors import ModelLoadError
from worldgen.model_ref import ModelRef
from worldgen.models.loading import AUTO, component_kind, dtype_from_name
from worldgen.models.presets import PRESET_PREFIX

# Bytes per element of the safetensors dtypes (the header's names).
_FILE_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# A header is at most this long (safetensors' own limit is 100 MB): a bigger length means a damaged file.
_MAX_HEADER = 100_000_000


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a model reference's dtype; 'auto' counts as 2: it means half precision where a
    size matters, on a GPU (float32 on a CPU host, which is not sized)."""
    if str(dtype).lower() == AUTO:
        return 2
    return dtype_from_name(dtype).itemsize


def model_bytes(ref: ModelRef, component_class: type) -> int | None:
    """Bytes of the weights `ref` loads as `component_class`, in the reference's dtype (floating tensors are
    cast to it when loaded; others keep their own), without loading them.

    A local directory: the safetensors headers under the reference's subfolder. `preset:<name>`: its tiny
    build, counted. A hub id: its cached snapshot when there is one (never downloads), else None (unknown).
    0 for what holds no weights (a tokenizer, a scheduler).
    """
    if component_kind(component_class) not in ("diffusers_model", "transformers_model"):
        return 0
    element = dtype_bytes(ref.dtype)
    if ref.source.startswith(PRESET_PREFIX):
        counts = _preset_counts(ref.source[len(PRESET_PREFIX) :], ref.subfolder or "")
        return counts[0] * element + counts[1]
    root = Path(ref.source).expanduser()
    if not root.is_dir():
        root = _cached_snapshot(ref)
        if root is None:
            return None
    folder = root / ref.subfolder if ref.subfolder else root
    files = _weight_files(folder, ref.variant)
    if not files:
        return None
    total = 0
    for path in files:
        for dtype, numel in _tensors(path):
            total += numel * (element if dtype in _FLOAT_DTYPES else _FILE_DTYPE_BYTES.get(dtype, 4))
    return total


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files a load reads: the variant's (`model.fp16.safetensors`), or the plain ones
    (`model.safetensors`, shards `model-00001-of-00002.safetensors`), never both."""
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"))
    if variant:
        return [f for f in files if f.name.endswith(f".{variant}.safetensors")]
    return [f for f in files if "." not in f.name.removesuffix(".safetensors")]


def _tensors(path: Path) -> list[tuple[str, int]]:
    """(dtype, number of elements) of every tensor in a safetensors file, from its header only: 8 bytes of
    little-endian length, then that many bytes of JSON (name -> dtype, shape, offsets)."""
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= _MAX_HEADER:
            raise ModelLoadError(f"'{path}' is not a safetensors file (its header length is {length})")
        try:
            header: dict[str, Any] = json.loads(f.read(length))
        except ValueError as err:
            raise ModelLoadError(f"'{path}' has a damaged safetensors header: {err}") from None
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in entry.get("shape", ()):
            numel *= int(dim)
        out.append((str(entry.get("dtype", "F32")), numel))
    return out


@functools.lru_cache(maxsize=64)
def _preset_counts(name: str, subfolder: str) -> tuple[int, int]:
    """(elements of floating tensors, bytes of the others) of a preset's component. Presets are tiny: building
    one costs milliseconds, so counting its state dict is simpler than a meta-device build."""
    from worldgen.models.presets import build_preset_component

    model = build_preset_component(name, subfolder)
    floats, other = 0, 0
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            floats += tensor.numel()
        else:
            other += tensor.numel() * tensor.element_size()
    return floats, other


def _cached_snapshot(ref: ModelRef) -> Path | None:
    """The hub cache's snapshot of a hub id, when it is there (no network: `local_files_only`)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(ref.source, revision=ref.revision, local_files_only=True)
    except Exception:  # not cached, not a hub id, no huggingface_hub: unknown size
        return None
    return Path(path)
