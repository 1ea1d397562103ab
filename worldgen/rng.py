"""Random-number state as a value that travels on edges (so seeded runs are reproducible in any process).

A block that draws random numbers takes an `rng` input and returns the advanced state as an `rng` output;
an `rng` input that nothing feeds gets a generator seeded from the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and negatives, folded onto those)


@dataclass(frozen=True)
class RngState:
    device: str
    state: torch.Tensor

    @classmethod
    def seeded(cls, seed: int, device: str | torch.device = "cpu") -> RngState:
        return cls.of(torch.Generator(device=device).manual_seed(int(seed)))

    @classmethod
    def of(cls, generator: torch.Generator) -> RngState:
        return cls(str(generator.device), generator.get_state())

    def generator(self) -> torch.Generator:
        """A fresh generator at this state (the state itself is never advanced in place)."""
        gen = torch.Generator(device=self.device)
        gen.set_state(self.state)
        return gen


def generator_or_none(rng: RngState | None) -> torch.Generator | None:
    return rng.generator() if rng is not None else None
