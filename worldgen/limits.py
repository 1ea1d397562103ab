"""Budgets on work: what one request, generation, template or stage may cost, checked before any model runs.

A server (the world gateway, a graph endpoint, the LLM server) holds every request to one `Limits`; the CLI and
the Python API run worlds without generation/stage budgets (their user is the config's author), while prompt
templates are always bounded (a template may come from anyone who wrote a config).

Every refusal is a `LimitExceeded` that names the limit (its field here) and the value asked for.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from worldgen.errors import ConfigError


class LimitExceeded(ConfigError):
    """A request asks for more than a limit allows; `limit` is the name of the field in `Limits`."""

    def __init__(self, limit: str, message: str, *, file: str | None = None, path: str | None = None):
        self.limit = limit
        super().__init__(f"{message} (limit '{limit}')", file=file, path=path)


class Limits(BaseModel):
    """Per-server budgets. The defaults fit one GPU of 24-80 GB serving a handful of users; raise them in the
    server's settings (`limits:` in its Serve config args) for bigger machines."""

    model_config = ConfigDict(extra="forbid")

    # ---- one generation (a Creator call, a graph-endpoint run) -------------------------------------------
    max_image_side: int = Field(
        2048, ge=8, description="pixels, width or height of one image (SDXL/Flux work at 1024-2048)"
    )
    max_count: int = Field(4, ge=1, description="images one generation may ask for")
    max_steps: int = Field(100, ge=1, description="denoising steps of one generation")
    max_pixel_steps: int = Field(
        1024 * 1024 * 4 * 50,
        ge=1,
        description="width x height x count x steps of one generation: four 1024x1024 images at 50 steps",
    )
    max_iterations: int = Field(
        1000, ge=1, description="loop iterations of one graph run (a graph endpoint's `iterations`)"
    )
    # ---- language models -------------------------------------------------------------------------------
    max_new_tokens: int = Field(4096, ge=1, description="tokens one LLM answer may generate")
    max_prompt_chars: int = Field(200_000, ge=1, description="characters of one prompt (all messages)")
    # ---- prompt templates (Jinja) ----------------------------------------------------------------------
    template_chars: int = Field(
        200_000, ge=1, description="characters a template may render, or build in one string or list"
    )
    template_seconds: float = Field(2.0, gt=0, description="wall time of one template render")
    # ---- worlds ----------------------------------------------------------------------------------------
    stage_seconds: float | None = Field(
        900.0, gt=0, description="wall time of one stage of a world step (None: no limit)"
    )
    max_worlds: int = Field(32, ge=1, description="worlds one gateway holds (a world driver is ~0.5 GB)")
    placement_seconds: float = Field(
        30.0, gt=0, description="how long a model host may wait for a node that fits its placement"
    )

    def check_generation(
        self, *, width: int, height: int, steps: int, count: int = 1, path: str | None = None
    ) -> None:
        """Raise LimitExceeded when one generation of `count` images of width x height at `steps` is too big."""
        for name, value in (("width", width), ("height", height)):
            if value > self.max_image_side:
                raise LimitExceeded(
                    "max_image_side", f"{name} {value} is over {self.max_image_side} pixels", path=path
                )
        if steps > self.max_steps:
            raise LimitExceeded("max_steps", f"{steps} steps is over {self.max_steps}", path=path)
        if count > self.max_count:
            raise LimitExceeded("max_count", f"count {count} is over {self.max_count}", path=path)
        cost = width * height * count * steps
        if cost > self.max_pixel_steps:
            raise LimitExceeded(
                "max_pixel_steps",
                f"{width}x{height} x {count} image(s) x {steps} steps = {cost:,} pixel-steps is over "
                f"{self.max_pixel_steps:,}",
                path=path,
            )


DEFAULT_LIMITS = Limits()
