"""`adapter/lora`: a LoRA file (diffusers, kohya/A1111 or PEFT-named safetensors) for the model blocks it feeds.

    adapter/lora (path, name, weight) --lora--> unet.lora, te.lora, te_neg.lora   (any block with a `lora` input)

The node holds no weights: it checks the file (its safetensors header, nothing unpickled) and hands the blocks a
small `LoraFile` (name, path, weight). Each block then loads its own part of the file once, as an adapter on its
shared model (worldgen/models/lora_files.py), and runs every call with exactly the LoRA files that call was fed:
other graphs on the same base model run without them. Several `adapter/lora` nodes feeding one block combine, with
their weights, as diffusers' `pipe.set_adapters([a, b], [wa, wb])`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from worldgen.block import Block, BlockConfig, Work
from worldgen.errors import ConfigError
from worldgen.models.lora_files import LoraFile, lora_file
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


class LoraConfig(BlockConfig):
    path: str = Field(description="the LoRA .safetensors file (diffusers, kohya/A1111 or PEFT key names)")
    name: str | None = Field(None, description="the adapter's name (default: the file's stem)")
    weight: float = Field(1.0, description="its strength when the `weight` input is not given (0: off)")


@register_block
class LoraFileBlock(Block):
    """A LoRA file and its weight, for the backbone and text encoders it is wired into."""

    block_type = "adapter/lora"
    Config = LoraConfig
    inline = True  # a header read and a small value: runs where the graph is driven
    INPUTS = (Port("weight", K.SCALAR, optional=True, doc="this call's weight (default: the config's)"),)
    OUTPUTS = (Port("lora", K.ADAPTER, doc="the file and weight, for the `lora` input of model blocks"),)

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        _weight(inputs.get("weight"), self.config.weight)
        lora_file(self.config.path, self.config.name)
        return Work()

    def forward(self, weight: float | None = None) -> dict[str, Any]:
        spec: LoraFile = lora_file(self.config.path, self.config.name, _weight(weight, self.config.weight))
        return {"lora": spec}


def _weight(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"a LoRA weight is a finite number, got {value!r}", path="weight")
    return float(value)
