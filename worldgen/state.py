"""The world state that flows between stages: five typed blocks (DESIGN.md §2.3), the world's content, its resume
point and the metadata recorded with each episode.

| # | block                                   | written by                 |
|---|-----------------------------------------|----------------------------|
| 1 | what is supposed to happen next (text)  | Development                |
| 2 | configuration for generating artifacts  | Architect (validated JSON) |
| 3 | the generated artifacts (references)    | Creator                    |
| 4 | description of the artifacts (text)     | Philosopher                |
| 5 | what really happened (text)             | Author                     |
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worldgen.errors import ConfigError, format_validation_error
from worldgen.media import MAX_FPS, media_type

BLOCKS = (1, 2, 3, 4, 5)
_FIELDS = {1: "happening", 2: "generation", 3: "artifacts", 4: "description", 5: "outcome"}


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8, got {value}")
    return value


# One rule for an image side, the steps and the guidance scale, wherever generation settings are given (block 2,
# a world's `generation_defaults`): a value that passes here is one the diffusion pipelines can run.
ImageSide = Annotated[
    int, Field(ge=8, le=4096, description="pixels, a multiple of 8"), AfterValidator(_multiple_of_8)
]
Steps = Annotated[int, Field(ge=1, le=500)]
# The same for a clip's frames and frame rate and a sound's length (block 2's requests, `generation_defaults`).
Frames = Annotated[int, Field(ge=1, le=1024)]
Fps = Annotated[float, Field(gt=0, le=MAX_FPS)]
Seconds = Annotated[float, Field(gt=0, le=600)]
Guidance = Annotated[float, Field(ge=0.0, le=50.0)]


ArtifactKind = Literal["image", "video", "audio"]

# How a referenced image steers a generation (worldgen.stage.REFERENCE_INPUTS names the pipeline inputs each feeds):
# `controlnet` keeps its layout (edges, pose, depth), `ip_adapter` its subject or style, `img2img` starts from it.
Control = Literal["controlnet", "ip_adapter", "img2img"]
_SCALED = ("controlnet", "ip_adapter")  # the controls with a conditioning scale; img2img has a strength


class Reference(BaseModel):
    """An image of an earlier episode of this world that a generation is conditioned on, and how. Never a path:
    only the world's own episodes can be referenced (the world reads the image from its storage)."""

    model_config = ConfigDict(extra="forbid")

    episode: Literal["previous"] | Annotated[int, Field(ge=1)] = Field(
        "previous", description='"previous" (the last saved episode) or an episode number'
    )
    image: int = Field(0, ge=0, le=15, description="which of the episode's images (0: the first)")
    control: Control = Field(
        description="controlnet: keep the layout; ip_adapter: keep a recurring subject or style; "
        "img2img: a small change of the same scene"
    )
    scale: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="controlnet / ip_adapter: how strongly (None: the pipeline's default)",
    )
    strength: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="img2img: how much of the picture changes (1: all of it; None: the pipeline's default)",
    )

    @field_validator("scale", "strength")
    @classmethod
    def _fits_control(cls, value: float | None, info: ValidationInfo) -> float | None:
        # `control` is validated first (field order), so a wrong pairing names the field that does not fit
        control = info.data.get("control")
        if value is None or control is None:
            return value
        wanted = "scale" if control in _SCALED else "strength"
        if info.field_name != wanted:
            raise ValueError(f"control '{control}' takes `{wanted}`, not `{info.field_name}`")
        return value


def _one_or_more(value: Any) -> Any:
    """One item given as a mapping (or a model) means a list of one."""
    return [value] if isinstance(value, (Mapping, BaseModel)) else value


EpisodeNumber = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=1, le=16, description="how many artifacts to generate")]
Seed = Annotated[int | None, Field(ge=0, description="None: derived from the world's seed and step")]
Prompt = Annotated[str, Field(min_length=1, max_length=2000)]
NegativePrompt = Annotated[str, Field(max_length=2000)]


class ImageRequest(BaseModel):
    """A block-2 request for images (the default kind: block 2 as written before videos and audio)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image"] = "image"
    pipeline: str = Field("text_to_image", description="name of one of the Creator's pipelines")
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: ImageSide = 512
    height: ImageSide = 512
    steps: Steps = 30
    guidance: Guidance = 7.5
    seed: Seed = None
    count: Count = 1
    reference: Annotated[list[Reference], BeforeValidator(_one_or_more), Field(max_length=4)] = Field(
        default_factory=list,
        description="earlier images of this world to condition on (one mapping or a list): the k-th reference "
        "of a control feeds that control's k-th input of the pipeline",
    )


# The name block 2 had when it held one image request (kept: configs, schemas and user code use it).
GenerationConfig = ImageRequest


class VideoSource(BaseModel):
    """The image a clip starts from: an image request of this block 2 (made before the clip, in this step) or an
    image of an earlier episode of this world. Never a path: the world reads it from its own storage."""

    model_config = ConfigDict(extra="forbid")

    request: int | None = Field(None, ge=0, description="an earlier image request of this block 2 (0-based)")
    episode: Literal["previous"] | EpisodeNumber | None = Field(
        None, description='or an episode: "previous" (the last saved one) or its number'
    )
    image: int = Field(
        0, ge=0, le=15, description="which of that request's or episode's images (0: the first)"
    )

    @model_validator(mode="after")
    def _one_origin(self) -> VideoSource:
        if (self.request is None) == (self.episode is None):
            raise ValueError(
                "give exactly one of `request` (this step's image) or `episode` (an earlier one)"
            )
        return self


class VideoRequest(BaseModel):
    """A block-2 request for video clips (`frames` at `fps`), from a source image or from the prompt alone."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["video"]
    pipeline: str = Field("image_to_video", description="name of one of the Creator's pipelines")
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: ImageSide = 512
    height: ImageSide = 512
    frames: Frames = Field(17, description="frames in each clip")
    fps: Fps = Field(16.0, description="frames per second of the file written")
    steps: Steps = 30
    guidance: Guidance = 5.0
    seed: Seed = None
    count: Count = 1
    format: Literal["mp4", "webm"] = Field("mp4", description="mp4 (H.264) or webm (VP9)")
    source: VideoSource | None = Field(
        None, description="the image the clip starts from (image-to-video pipelines need one)"
    )


class AudioRequest(BaseModel):
    """A block-2 request for sounds of `duration` seconds."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["audio"]
    pipeline: str = Field("text_to_audio", description="name of one of the Creator's pipelines")
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    duration: Seconds = Field(5.0, description="seconds of each sound")
    sample_rate: int | None = Field(
        None, ge=8000, le=192_000, description="samples per second of the file (None: the model's own)"
    )
    steps: Steps = 30
    guidance: Guidance = 7.0
    seed: Seed = None
    count: Count = 1
    format: Literal["wav", "flac", "ogg"] = "wav"


def _request_kind(value: Any) -> str:
    """The kind of a request (a mapping without `kind` is an image request: block 2 as it was written before)."""
    if isinstance(value, Mapping):
        return str(value.get("kind", "image"))
    return str(getattr(value, "kind", "image"))


GenerationRequest = Annotated[
    Annotated[ImageRequest, Tag("image")]
    | Annotated[VideoRequest, Tag("video")]
    | Annotated[AudioRequest, Tag("audio")],
    Discriminator(_request_kind),
]


def _sources_made_before(requests: list[Any]) -> list[Any]:
    """A clip's `source.request` names an image request before it, and one of the images that one makes."""
    for i, request in enumerate(requests):
        source = getattr(request, "source", None)
        if source is None or source.request is None:
            continue
        j = source.request
        if j >= i:
            raise ValueError(
                f"request {i}: source.request {j} is not an earlier request; a clip starts from an image "
                f"made before it (requests 0 to {i - 1})"
            )
        if requests[j].kind != "image":
            raise ValueError(
                f"request {i}: source.request {j} is a {requests[j].kind} request, not an image one"
            )
        if source.image >= requests[j].count:
            raise ValueError(
                f"request {i}: source.image {source.image}, but request {j} makes {requests[j].count} image(s)"
            )
    return requests


def _requests(value: Any) -> Any:
    """Block 2 as written: a list of requests, `{"requests": [...]}` (a JSON object, as APIs' JSON modes answer),
    or one request."""
    if isinstance(value, Mapping) and set(value) == {"requests"}:
        return value["requests"]
    return _one_or_more(value)


# Block 2: the requests of one step, in order.
Generation = Annotated[
    list[GenerationRequest],
    BeforeValidator(_requests),
    Field(max_length=8),
    AfterValidator(_sources_made_before),
]


class GenerationPlan(RootModel[Generation]):
    """Block 2 as a whole, for the Architect's JSON (the `generation` output schema): a list of requests."""


class ReferenceUse(BaseModel):
    """What the Creator did with one of block 2's references (recorded with the episode): the image it fed,
    through which pipeline inputs, or why it fed none."""

    model_config = ConfigDict(extra="forbid")

    control: Control
    episode: int | None = Field(None, description="the episode the image came from (None: none was fed)")
    image: int = 0
    artifact: str | None = Field(None, description="the image's path in the world directory")
    sha256: str | None = None
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="the pipeline inputs fed: the image input (its artifact path), the scale",
    )
    note: str | None = Field(
        None, description="why nothing was fed (e.g. the first episode has no previous one)"
    )


class ArtifactRef(BaseModel):
    """Block 3 entry: a file in the world directory (path relative to it), typed: what it is and what it holds."""

    model_config = ConfigDict(extra="forbid")

    path: str
    kind: ArtifactKind = "image"
    mime: str | None = Field(None, description="its MIME type (from the file's suffix when not given)")
    width: int | None = None
    height: int | None = None
    frames: int | None = Field(None, description="video: frames in the clip")
    fps: float | None = Field(None, description="video: frames per second")
    duration: float | None = Field(None, description="video, audio: seconds")
    sample_rate: int | None = Field(None, description="audio: samples per second")
    channels: int | None = Field(None, description="audio: 1 mono, 2 stereo")
    sha256: str | None = None
    preview: str | None = Field(None, description="video: a small animated WebP of the clip (path)")
    request: int | None = Field(None, description="the block-2 request that made it (0-based)")
    source: VideoSource | None = Field(
        None, description="video: the image it started from (an earlier episode's by its number)"
    )

    @model_validator(mode="after")
    def _mime_from_suffix(self) -> ArtifactRef:
        if self.mime is None:
            self.mime = media_type(self.path)
        return self


# The format of a saved state (state.json, the resume journal). 1: block 2 was one image request and block 3 held
# untyped image files (worldgen before videos and audio); 2: block 2 a list of typed requests, block 3 typed.
STATE_SCHEMA_VERSION = 2


def upgrade_state(data: Any) -> Any:
    """A saved state's JSON in the current format. A state without `schema_version` is version 1, which the
    schema reads as it is: one block-2 mapping is a list of one image request (`Generation`), an untyped block-3
    entry is an image whose MIME type comes from its suffix (`ArtifactRef`). A newer version is refused."""
    if not isinstance(data, Mapping):
        return data
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or not 1 <= version <= STATE_SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {version!r}: this worldgen reads states of versions 1 to {STATE_SCHEMA_VERSION} "
            "(a newer worldgen wrote it?)"
        )
    return {**data, "schema_version": STATE_SCHEMA_VERSION}


class WorldState(BaseModel):
    """The five blocks; `None` means empty. `id` identifies this state across saves (for exactly-once episodes)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[2] = Field(
        STATE_SCHEMA_VERSION,
        description="the format the state is written in (older ones are upgraded on read)",
    )
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    happening: str | None = None
    generation: Generation | None = None
    artifacts: list[ArtifactRef] | None = None
    description: str | None = None
    outcome: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        return upgrade_state(data)

    def block(self, number: int) -> Any:
        return getattr(self, _FIELDS[_check_number(number)])

    def with_block(self, number: int, value: Any) -> WorldState:
        """A copy with block `number` set (validated)."""
        data = self.model_dump()
        data[_FIELDS[_check_number(number)]] = value
        return WorldState.model_validate(data)

    def filled(self) -> set[int]:
        return {n for n in BLOCKS if self.block(n) not in (None, "", [])}

    def blocks(self) -> dict[int, Any]:
        return {n: self.block(n) for n in BLOCKS}

    @classmethod
    def from_blocks(
        cls, blocks: Mapping[int | str, Any] | WorldState | None, *, where: str = "state"
    ) -> WorldState:
        """From a WorldState or a mapping {block number: content}: block 2 a list of requests (or one mapping),
        block 3 a list of artifact paths (or artifact references), the others text."""
        if blocks is None:
            return cls()
        if isinstance(blocks, WorldState):
            return blocks
        data: dict[str, Any] = {}
        for key, value in blocks.items():
            try:
                number = int(key)
                field = _FIELDS[_check_number(number)]
            except (ValueError, ConfigError):
                raise ConfigError(
                    f"unknown block {key!r}; blocks are numbered 1 to 5", path=f"{where}.{key}"
                ) from None
            if number == 3 and value is not None:
                value = [{"path": str(v)} if not isinstance(v, (Mapping, ArtifactRef)) else v for v in value]
            data[field] = value
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, where)) from None


class WorldContent(BaseModel):
    """What the world is: its story so far, the history of episodes, glossary, style and rules."""

    model_config = ConfigDict(extra="forbid")

    title: str = "Untitled world"
    story: str = ""
    history: list[str] = Field(
        default_factory=list, description="one entry per episode: what really happened"
    )
    glossary: dict[str, str] = Field(default_factory=dict)
    style: str = ""
    rules: list[str] = Field(default_factory=list)
    last_state_id: str | None = Field(None, description="the state whose episode was applied last")


def _check_number(number: int) -> int:
    if number not in _FIELDS:
        raise ConfigError(f"unknown block {number!r}; blocks are numbered 1 to 5")
    return number


class Progress(BaseModel):
    """The resume point of a world, persisted after every stage: a crash loses at most the stage in flight."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(0, ge=0, description="steps completed")
    stage_index: int = Field(0, ge=0, description="next stage of the cycle to consider in the step in flight")
    action: str | None = Field(None, description="the user's action for the step in flight")
    state: WorldState = Field(default_factory=WorldState)
    state_action: str | None = Field(
        None, description="the action the in-flight state was developed from (recorded with its episode)"
    )
    ran: list[str] = Field(default_factory=list, description="stages run so far in the step in flight")
    skipped: list[str] = Field(default_factory=list)
    episode: int | None = Field(None, description="episode saved by the step in flight")
    state_references: list[ReferenceUse] = Field(
        default_factory=list,
        description="what the Creator fed for block 2's references (recorded with its episode)",
    )


class EpisodeMeta(BaseModel):
    """What the world records beside an episode's five blocks when it saves it (the storage writes and reads it;
    training reads it back, from a world's episodes or from episode folders written by hand).

    Every field is optional (a hand-written episode may give none) and unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    episode: int | None = Field(None, description="the episode's number")
    state_id: str | None = Field(None, description="the id of the state saved as this episode")
    step: int | None = Field(None, ge=1, description="the step in which World update saved the episode")
    action: str | None = Field(None, description="the visitor's action Development was given")
    ran: list[str] = Field(default_factory=list, description="stages run in the saving step before it")
    time: str | None = Field(None, description="when it was saved (ISO 8601, UTC)")
    content: WorldContent | None = Field(
        None, description="the world's content as the episode's stages saw it (exact prompts when given)"
    )
    references: list[ReferenceUse] = Field(
        default_factory=list,
        description="the earlier images the Creator conditioned this episode on, and how",
    )

    def recorded(self) -> dict[str, Any]:
        """The fields as recorded (as JSON values): the keys the file holds, no defaults added."""
        return self.model_dump(mode="json", exclude_unset=True)
