"""What a `vlm` block is given, read into one list of artifacts: pictures, clips (sampled frames) and sounds.

The Philosopher's `images` input holds the paths of all of block 3's files in order: images (.png, ...), videos
(.mp4, .webm) and sounds (.wav, .flac, .ogg). `read_media` turns each into a `Picture`, a `Clip` (its `frames`
evenly spaced frames, first and last included, plus what motion needs) or a `Sound` (its samples and rate),
numbered in the order given. Tensors count too: (B, C, H, W) images and (B, F, C, H, W) clips (a VIDEO port).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worldgen.errors import ConfigError

MAX_FRAMES = (
    32  # the most frames a VLM block samples from one clip (each one costs a caption or image tokens)
)


@dataclass
class Picture:
    image: Any  # PIL RGB
    kind: str = "image"

    def label(self, number: int) -> str:
        return f"Image {number}"


@dataclass
class Clip:
    """A video: `frames` are the sampled PIL frames, `picked` their 0-based indices among `total` frames;
    `all_frames` every decoded frame (for measuring motion)."""

    frames: list[Any]
    picked: list[int]
    total: int
    fps: float | None
    all_frames: list[Any] = field(repr=False, default_factory=list)
    kind: str = "video"

    @property
    def duration(self) -> float | None:
        return self.total / self.fps if self.fps else None

    def timing(self) -> str:
        """'9 frames, 8 fps, 1.1 s' (as much as is known)."""
        parts = [f"{self.total} frame{'s' if self.total != 1 else ''}"]
        if self.fps:
            parts += [f"{self.fps:g} fps", f"{self.duration:.1f} s"]
        return ", ".join(parts)

    def label(self, number: int) -> str:
        """'Video 2: frames 1, 4, 7, 9 of 9, 8 fps, 1.1 s' (frames numbered from 1)."""
        shown = ", ".join(str(i + 1) for i in self.picked)
        rest = f", {self.fps:g} fps, {self.duration:.1f} s" if self.fps else ""
        return f"Video {number}: frame{'s' if len(self.picked) != 1 else ''} {shown} of {self.total}{rest}"


@dataclass
class Sound:
    samples: Any  # float32 (samples, channels) in [-1, 1]
    rate: int
    kind: str = "audio"

    def label(self, number: int) -> str:
        return f"Audio {number}"


Item = Picture | Clip | Sound


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included (all of them when fewer);
    the same frames worldgen.media.read_frames picks."""
    if count >= total:
        return list(range(total))
    if count <= 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def check_frames(frames: int, where: str = "frames") -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise ConfigError(
            f"vlm: frames per clip must be an integer from 1 to {MAX_FRAMES}; got {frames!r}", path=where
        )
    return frames


def read_media(value: Any, frames: int = 4) -> list[Item]:
    """Every artifact in `value` (a path, a mapping or object with a `path`, a PIL image, an image or video
    tensor, or a list of these, nested), in order; a clip sampled to `frames` frames."""
    check_frames(frames)
    if value is None:
        raise ConfigError("vlm: no images given (the `images` input is empty)", path="images")
    out: list[Item] = []
    _collect(value, out, frames)
    if not out:
        raise ConfigError("vlm: no images given (the `images` input is an empty list)", path="images")
    return out


def _collect(value: Any, out: list[Item], frames: int) -> None:
    from PIL import Image

    if isinstance(value, Image.Image):
        out.append(Picture(value if value.mode == "RGB" else value.convert("RGB")))
    elif isinstance(value, (str, Path)):
        out.append(read_file(Path(value), frames))
    elif isinstance(value, Mapping) and "path" in value:
        out.append(read_file(Path(value["path"]), frames))
    elif hasattr(value, "detach") or type(value).__module__ == "numpy":  # torch tensor / numpy array
        out.extend(_from_tensor(value, frames))
    elif isinstance(value, Sequence):
        for item in value:
            _collect(item, out, frames)
    elif isinstance(getattr(value, "path", None), (str, Path)):  # ArtifactRef-like objects
        out.append(read_file(Path(value.path), frames))
    else:
        raise ConfigError(
            f"vlm: cannot read an artifact from a {type(value).__name__}; expected a file path (image, video "
            "or audio), a PIL image, a tensor (B, 3, H, W) or (B, F, 3, H, W) in [0, 1], or a list of these",
            path="images",
        )


def _from_tensor(value: Any, frames: int) -> list[Item]:
    from worldgen.images import to_pil

    shape = tuple(getattr(value, "shape", ()))
    try:
        if len(shape) == 5:  # (B, F, C, H, W): a batch of clips, frame rate unknown
            clips = []
            for clip in value:
                pictures = [p.convert("RGB") for p in to_pil(clip)]
                clips.append(_clip(pictures, frames, fps=None))
            return clips
        return [Picture(p if p.mode == "RGB" else p.convert("RGB")) for p in to_pil(value)]
    except ValueError as err:
        raise ConfigError(f"vlm: {err} (or (B, F, C, H, W) for clips)", path="images") from None


def _clip(pictures: list[Any], frames: int, fps: float | None) -> Clip:
    picked = evenly_spaced(len(pictures), frames)
    return Clip([pictures[i] for i in picked], picked, len(pictures), fps, pictures)


def read_file(path: Path, frames: int) -> Item:
    """One artifact file by its suffix: a video or a sound, else an image (as before videos existed)."""
    from worldgen.media import kind_of

    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"vlm: artifact file '{path}' does not exist", path="images")
    kind = kind_of(path)
    try:
        if kind == "video":
            return _read_video(path, frames)
        if kind == "audio":
            from worldgen.media import read_audio

            samples, rate = read_audio(path)
            return Sound(samples, rate)
        from PIL import Image

        with Image.open(path) as img:
            return Picture(img.convert("RGB"))  # convert() loads the pixels, so the file can be closed
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken file is the input's problem, said with its name
        raise ConfigError(f"vlm: cannot read {kind or 'image'} file '{path}': {err}", path="images") from None


def _read_video(path: Path, frames: int) -> Clip:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate
        pictures = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    if not pictures:
        raise ConfigError(f"vlm: video file '{path}' has no frames", path="images")
    return _clip(pictures, frames, fps=float(rate) if rate else None)
