"""Block 2's requests, planned and run by the Creator: each request (an image, a video or an audio request,
worldgen.state) picks one of the Creator's pipelines by name, and that pipeline must make what the request asks for.

Everything a request needs is checked before any model runs — when block 2 is written (the Architect's output, a
user's state) and again when the Creator starts: the pipeline exists and makes the request's kind, the request is
within the server's limits, its references and its video source name images the world has (or makes earlier in the
step), and every block of the pipeline accepts the request's values (`Block.check_inputs` through
worldgen.preflight: a Wan clip's frame count, a Stable Audio duration over the model's maximum). So a bad request is
a ConfigError naming block 2's field, and nothing saved changes.

A pipeline's kind is what it outputs: `video` (a VIDEO port), `audio` (with its `sample_rate`), else `image`.

| request | pipeline inputs fed                                                                  |
|---------|--------------------------------------------------------------------------------------|
| image   | prompt, negative_prompt, width, height, steps, guidance_scale (+ references' inputs) |
| video   | prompt, negative_prompt, width, height, frames, steps, guidance_scale (+ `image`: the source) |
| audio   | prompt, negative_prompt, duration, steps, guidance_scale                             |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.engine import Engine
from worldgen.errors import ConfigError
from worldgen.limits import Limits
from worldgen.media import Media
from worldgen.reference import episode_image, plan_references, read_image
from worldgen.stage import SOURCE_INPUT, Stage, pipeline_kind
from worldgen.state import (
    ArtifactRef,
    AudioRequest,
    GenerationRequest,
    ImageRequest,
    ReferenceUse,
    VideoRequest,
    VideoSource,
)
from worldgen.storage import WorldStorage

# The request field each pipeline input comes from (the others are named alike).
_FIELDS = {"guidance_scale": "guidance", SOURCE_INPUT: "source"} | {
    name: name for name in ("prompt", "negative_prompt", "steps", "width", "height", "frames", "duration")
}


def request_inputs(request: GenerationRequest) -> dict[str, Any]:
    """The pipeline inputs a request sets (the world feeds those its pipeline exposes)."""
    inputs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "guidance_scale": request.guidance,
    }
    if isinstance(request, AudioRequest):
        return inputs | {"duration": request.duration}
    inputs |= {"width": request.width, "height": request.height}
    if isinstance(request, VideoRequest):
        inputs["frames"] = request.frames
    return inputs


class Plan:
    """What the Creator will do for block 2, checked: for each request its pipeline and the references it feeds
    (image requests), and, for a clip, where its source image comes from (resolved to an episode number)."""

    def __init__(self, requests: list[GenerationRequest]):
        self.requests = requests
        self.engines: list[Engine] = []
        self.references: list[list[ReferenceUse]] = []
        self.sources: list[VideoSource | None] = []

    def all_references(self) -> list[ReferenceUse]:
        return [use for uses in self.references for use in uses]


def plan(
    requests: list[GenerationRequest] | None,
    creator: Stage,
    storage: WorldStorage,
    *,
    where: str,
    limits: Limits | None = None,
) -> Plan:
    """Check block 2 against the Creator's pipelines, the world's episodes and `limits`, before any model runs;
    `where` names block 2 in errors (e.g. `state.generation`)."""
    from worldgen.preflight import preflight

    result = Plan(list(requests or []))
    for i, request in enumerate(result.requests):
        at = f"{where}.{i}"
        if limits is not None:
            limits.check_request(request, path=at)
        engine = _pipeline(creator, request, at)
        uses = (
            plan_references(request, creator, storage, where=at) if isinstance(request, ImageRequest) else []
        )
        source = _plan_source(request, engine, result.requests, storage, at)
        inputs = {k: v for k, v in request_inputs(request).items() if k in engine.exposed_inputs}
        if source is not None:
            inputs[SOURCE_INPUT] = _placeholder_image(request)
        for use in uses:  # the referenced images are read later; their scales are checked now
            inputs |= {
                k: (_placeholder_image(request) if v == use.artifact else v) for k, v in use.inputs.items()
            }
        try:
            preflight(engine, inputs)
        except ConfigError as err:  # a block refused an input: name the request's field that set it
            port = str(err.path or "").removeprefix("inputs.")  # preflight names the run's input
            field = _FIELDS.get(port)
            raise ConfigError(
                f"pipeline '{request.pipeline}' cannot run request {i}: {err.detail}",
                path=f"{at}.{field}" if field in type(request).model_fields else at,
            ) from None
        result.engines.append(engine)
        result.references.append(uses)
        result.sources.append(source)
    return result


def source_image(
    plan: Plan, index: int, made: Mapping[int, list[ArtifactRef]], storage: WorldStorage, where: str
) -> Any | None:
    """The first frame of request `index`'s clip, read from the world's storage at the clip's size: an image an
    earlier request of this step made (`made`: its artifacts by request), or an earlier episode's."""
    source, request = plan.sources[index], plan.requests[index]
    if source is None:
        return None
    if source.request is not None:
        path = made[source.request][source.image].path
    else:
        path = episode_image(storage, source.episode, source.image, f"{where}.{index}.source").path
    return read_image(storage, path, request.width, request.height, f"{where}.{index}.source")


def media_of(request: GenerationRequest, index: int, outputs: Mapping[str, Any], source: Any) -> list[Media]:
    """The artifacts one pipeline run made for a request, ready for the storage: one per batch item."""
    if isinstance(request, ImageRequest):
        return [Media("image", image, request=index) for image in outputs["image"]]
    if isinstance(request, VideoRequest):
        return [
            Media("video", clip, fps=request.fps, format=request.format, request=index, source=source)
            for clip in outputs["video"]
        ]
    from worldgen.media import resample

    rate = int(outputs.get("sample_rate") or 44_100)
    target = request.sample_rate or rate
    if target < 1000:  # a test-sized model's rate: no player or file format takes it as it is
        raise ConfigError(
            f"pipeline '{request.pipeline}' makes {rate} Hz audio, below what a sound file holds (1000 Hz); "
            "ask for a `sample_rate` (e.g. 16000) and the sound is resampled",
            path=f"generation.{index}.sample_rate",
        )
    return [
        Media(
            "audio", resample(sound, rate, target), sample_rate=target, format=request.format, request=index
        )
        for sound in outputs["audio"]
    ]


def _pipeline(creator: Stage, request: GenerationRequest, at: str) -> Engine:
    """The Creator's pipeline a request names; it must make the request's kind."""
    names = creator.node_ids
    if request.pipeline not in names:
        from worldgen.errors import did_you_mean

        raise ConfigError(
            f"block 2 asks for pipeline '{request.pipeline}'{did_you_mean(request.pipeline, names)}, but the "
            f"creator has: {', '.join(names)}",
            path=f"{at}.pipeline",
        )
    engine = creator.item(request.pipeline)
    kind = pipeline_kind(engine)
    if kind != request.kind:
        takers = [n for n in names if pipeline_kind(creator.item(n)) == request.kind]
        raise ConfigError(
            f"pipeline '{request.pipeline}' makes {kind}s, not {request.kind}s; the creator's {request.kind} "
            f"pipelines: {', '.join(takers) or 'none'}",
            path=f"{at}.pipeline",
        )
    return engine


def _plan_source(
    request: GenerationRequest, engine: Engine, requests: list[Any], storage: WorldStorage, at: str
) -> VideoSource | None:
    """A clip's source, checked against the pipeline and the world; an episode source resolved to its number."""
    if not isinstance(request, VideoRequest):
        return None  # an image pipeline's `image` is fed by a reference (img2img), not a source
    takes = engine.exposed_inputs.get(SOURCE_INPUT)
    source = getattr(request, "source", None)
    if source is None:
        if takes is not None and not takes.optional:
            raise ConfigError(
                f"pipeline '{request.pipeline}' makes a clip from an image: give `source` (an image request of "
                'this step, {"request": 0}, or an earlier episode\'s, {"episode": "previous"})',
                path=f"{at}.source",
            )
        return None
    if takes is None:
        raise ConfigError(
            f"pipeline '{request.pipeline}' takes no source image (no input '{SOURCE_INPUT}'); leave `source` out "
            "or pick an image-to-video pipeline",
            path=f"{at}.source",
        )
    if source.request is not None:
        return source  # an earlier image request of this block 2 (state.Generation checked that it is one)
    ref = episode_image(storage, source.episode, source.image, f"{at}.source")
    return VideoSource(episode=_episode_number(ref), image=source.image)


def _episode_number(ref: ArtifactRef) -> int:
    return int(ref.path.split("/")[1])  # episodes/000003/000.png


def _placeholder_image(request: Any) -> Any:
    """An image of the request's size, standing in for one read later (checks look at shapes, not pixels)."""
    import torch

    return torch.zeros(1, 3, request.height, request.width)
