"""Budgets on work: what one request, generation, template or stage may cost, checked before any model runs.

A server (the world gateway, a graph endpoint, the LLM server) holds every request to one `Limits`; the CLI and
the Python API run worlds without generation/stage budgets (their user is the config's author), while prompt
templates are always bounded (a template may come from anyone who wrote a config).

Every refusal is a `LimitExceeded` that names the limit (its field here) and the value asked for.

Wall-time limits (a world stage's `stage_seconds`) are one cooperative `Deadline` carried in a context variable:
`time_limit(...)` sets it around the work, and every executor honours it — the local executor checks it between
node calls and loop iterations, the Ray executor waits at most until it and cancels what it started, and a
fused loop on a model host gets it with the call. Work past it raises `DeadlineExceeded`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worldgen.errors import ConfigError, ExecutionError


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
    max_video_frames: int = Field(241, ge=1, description="frames of one clip (Wan 2.x makes 81 at 16 fps)")
    max_audio_seconds: float = Field(120.0, gt=0, description="seconds of one sound")
    max_request_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="memory of one request's output as the pipeline hands it over (float32 pixels or samples, "
        "all its images, clips or sounds): 4 GiB holds eight 81-frame 832x480 clips",
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
        600.0,
        gt=0,
        description="how long a model host may wait for a node the autoscaler adds to fit its placement "
        "(a cloud GPU node takes minutes to start; with no autoscaler, no wait: an error at once)",
    )

    def check_generation(
        self,
        *,
        width: int,
        height: int,
        steps: int,
        count: int = 1,
        path: str | None = None,
        file: str | None = None,
    ) -> None:
        """Raise LimitExceeded when one generation of `count` images of width x height at `steps` is too big;
        `path` (and `file`) say where the settings were given."""
        for name, value in (("width", width), ("height", height)):
            if value > self.max_image_side:
                raise LimitExceeded(
                    "max_image_side",
                    f"{name} {value} is over {self.max_image_side} pixels",
                    path=path,
                    file=file,
                )
        if steps > self.max_steps:
            raise LimitExceeded("max_steps", f"{steps} steps is over {self.max_steps}", path=path, file=file)
        if count > self.max_count:
            raise LimitExceeded("max_count", f"count {count} is over {self.max_count}", path=path, file=file)
        cost = width * height * count * steps
        if cost > self.max_pixel_steps:
            raise LimitExceeded(
                "max_pixel_steps",
                f"{width}x{height} x {count} image(s) x {steps} steps = {cost:,} pixel-steps is over "
                f"{self.max_pixel_steps:,}",
                path=path,
                file=file,
            )

    def check_request(self, request: Any, *, path: str | None = None) -> None:
        """Raise LimitExceeded when one block-2 request (worldgen.state: image, video or audio) is too big."""
        kind = getattr(request, "kind", "image")
        if kind == "audio":
            if request.steps > self.max_steps:
                raise LimitExceeded("max_steps", f"{request.steps} steps is over {self.max_steps}", path=path)
            if request.count > self.max_count:
                raise LimitExceeded("max_count", f"count {request.count} is over {self.max_count}", path=path)
            if request.duration > self.max_audio_seconds:
                raise LimitExceeded(
                    "max_audio_seconds",
                    f"duration {request.duration:g} s is over {self.max_audio_seconds:g} s",
                    path=f"{path}.duration" if path else None,
                )
            rate = request.sample_rate or 48_000
            size = request.duration * rate * 2 * 4 * request.count  # stereo float32
            what = f"{request.count} sound(s) of {request.duration:g} s at {rate} Hz"
        elif kind == "video":
            frames = request.frames
            if frames > self.max_video_frames:
                raise LimitExceeded(
                    "max_video_frames",
                    f"{frames} frames is over {self.max_video_frames}",
                    path=f"{path}.frames" if path else None,
                )
            # a clip's cost per step is its frames' pixels; the pixel-step budget is for images
            self.check_generation(
                width=request.width,
                height=request.height,
                steps=request.steps,
                count=request.count,
                path=path,
            )
            size = request.width * request.height * 3 * 4 * frames * request.count
            what = f"{request.count} clip(s) of {frames} frames at {request.width}x{request.height}"
        else:
            self.check_generation(
                width=request.width,
                height=request.height,
                steps=request.steps,
                count=request.count,
                path=path,
            )
            size = request.width * request.height * 3 * 4 * request.count
            what = f"{request.count} image(s) at {request.width}x{request.height}"
        if size > self.max_request_bytes:
            raise LimitExceeded(
                "max_request_bytes",
                f"{what} need {size / 1024**2:,.0f} MiB as float32, over {self.max_request_bytes / 1024**2:,.0f} MiB",
                path=path,
            )


DEFAULT_LIMITS = Limits()


# ---- wall-time limits --------------------------------------------------------------------------------------
class DeadlineExceeded(ExecutionError):
    """Work ran past a wall-time limit; `limit` names the field in `Limits`. Nothing it was doing is kept, so
    running it again (a world's next step) starts over from the last persisted point."""

    def __init__(self, limit: str, message: str):
        self.limit = limit
        super().__init__(f"{message} (limit '{limit}')")


@dataclass(frozen=True)
class Deadline:
    """When work must be done by. `at` is wall-clock time (time.time()), not a monotonic clock, so the deadline
    means the same in another process or on another node (a model host actor) and counts time spent queued."""

    at: float
    seconds: float  # the limit's value, for messages
    limit: str = "stage_seconds"
    what: str = "the work"  # e.g. "stage 'creator'"

    def remaining(self) -> float:
        return self.at - time.time()

    def check(self) -> None:
        """Raise DeadlineExceeded once the deadline has passed."""
        if self.remaining() <= 0:
            raise self.exceeded()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(self.limit, f"{self.what} ran past its time limit of {self.seconds:g} s")


_deadline: ContextVar[Deadline | None] = ContextVar("worldgen_deadline", default=None)
_limits: ContextVar[Limits | None] = ContextVar("worldgen_limits", default=None)


def current_limits() -> Limits | None:
    """The limits the running work is under (a world's, set around its stages), or None (full trust)."""
    return _limits.get()


@contextmanager
def applying(limits: Limits | None) -> Iterator[None]:
    """Run the block under `limits`, for the parts that read them while running (a model host's placement)."""
    token = _limits.set(limits)
    try:
        yield
    finally:
        _limits.reset(token)


def current_deadline() -> Deadline | None:
    """The deadline the running work must honour, or None (no limit)."""
    return _deadline.get()


def check_deadline() -> None:
    """Raise DeadlineExceeded when the running work is past its deadline (a cheap no-op without one)."""
    deadline = _deadline.get()
    if deadline is not None:
        deadline.check()


@contextmanager
def within(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Run the block under `deadline` (None: no new limit). An enclosing deadline that comes sooner wins."""
    outer = _deadline.get()
    if deadline is None or (outer is not None and outer.at <= deadline.at):
        yield outer
        return
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def time_limit(seconds: float | None, what: str, limit: str = "stage_seconds") -> Deadline | None:
    """A deadline `seconds` from now for `what` (None: no limit); use with `within(...)`."""
    return None if seconds is None else Deadline(time.time() + seconds, seconds, limit, what)
