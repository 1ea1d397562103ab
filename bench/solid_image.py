"""`image/solid`, the Creator of bench/world_step.py: an image in one colour derived from the prompt, no model.

A module of its own, not the benchmark's `__main__`: Ray workers then import the class by name (they get the
driver's sys.path) instead of receiving it pickled by value with every task.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from worldgen.block import Block
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block


@register_block
class SolidImageBlock(Block):
    """A (1, 3, 8, 8) image in one colour derived from the prompt."""

    block_type = "image/solid"
    INPUTS = (Port("prompt", PortKind.TEXT),)
    OUTPUTS = (Port("image", PortKind.IMAGE),)

    def forward(self, prompt: str) -> dict[str, Any]:
        rgb = torch.tensor(list(hashlib.sha1(str(prompt).encode()).digest()[:3]), dtype=torch.float32) / 255
        return {"image": rgb.view(1, 3, 1, 1).expand(1, 3, 8, 8).clone()}
