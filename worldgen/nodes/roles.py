"""Role rules: the default wiring applied when a node is added with auto-connect on (DESIGN.md §2.2)."""

from __future__ import annotations

from typing import NamedTuple


class RoleRule(NamedTuple):
    source_role: str
    source_port: str
    target_role: str
    target_port: str


ROLE_RULES: tuple[RoleRule, ...] = (
    RoleRule("tokenizer", "token_ids", "conditioner", "token_ids"),
    RoleRule("conditioner", "embedding", "backbone", "condition"),
    RoleRule("backbone", "pred", "guidance", "pred_cond"),
    RoleRule("backbone", "pred_uncond", "guidance", "pred_uncond"),
    RoleRule("guidance", "pred", "solver", "pred"),
    RoleRule("solver", "model_input", "backbone", "sample"),  # closes the denoising loop
    RoleRule("solver", "timestep", "backbone", "timestep"),
    RoleRule("codec", "latent", "solver", "latent"),  # encoder -> solver (image-to-image)
    RoleRule("solver", "latent", "codec", "latent"),  # solver -> decoder
)
