"""Media files people can open: video (MP4/H.264 or WebM/VP9, written with PyAV: the FFmpeg libraries ship in its
wheel), an animated WebP preview of a clip, audio (WAV, FLAC, OGG/Vorbis, written with soundfile), each written
atomically; and the way back: a clip's frames, a sound's samples, a file's kind, MIME type and measures.

Tensors follow worldgen.ports: a video is (F, C, H, W) per clip (a VIDEO port carries (B, F, C, H, W)) in [0, 1],
a sound (channels, samples) in [-1, 1].
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

from worldgen.storage_io import atomic_write, atomic_write_bytes

Kind = Literal["image", "video", "audio"]

# The MIME type of each file the world writes or serves, by suffix.
MEDIA_TYPES: dict[str, str] = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
}
VIDEO_FORMATS: dict[str, tuple[str, str]] = {  # container -> (encoder, pixel format) every browser plays
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
}
AUDIO_FORMATS: dict[str, tuple[str, str]] = {  # suffix -> (soundfile format, subtype)
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
}
MAX_FPS = 120.0  # a sane ceiling: players and encoders handle it, a clip never needs more


@dataclass(frozen=True)
class MediaInfo:
    """What a media file holds, as a reader sees it (None where it does not apply)."""

    kind: Kind
    mime: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: float | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Media:
    """One artifact to write (worldgen.storage): an image ((C, H, W) in [0, 1] or a PIL image), a clip ((F, C, H, W)
    in [0, 1]) played at `fps`, or a sound ((channels, samples) in [-1, 1]) at `sample_rate`; `format` is the file's
    suffix (png; mp4 or webm; wav, flac or ogg). `request` and `source` are recorded with it (block 3)."""

    kind: Kind
    data: Any
    fps: float | None = None
    sample_rate: int | None = None
    format: str | None = None
    request: int | None = None
    source: Any = None

    @property
    def suffix(self) -> str:
        return self.format or {"image": "png", "video": "mp4", "audio": "wav"}[self.kind]


def media_type(path: str | PurePath) -> str:
    """The MIME type of a media file by its suffix (application/octet-stream when unknown)."""
    return MEDIA_TYPES.get(PurePath(path).suffix.lower(), "application/octet-stream")


def kind_of(path: str | PurePath) -> Kind | None:
    """'image', 'video' or 'audio' by suffix; None for anything else."""
    major = media_type(path).split("/")[0]
    return major if major in ("image", "video", "audio") else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- video
def video_array(frames: Any) -> Any:
    """One clip as uint8 (F, H, W, 3): from (F, C, H, W) floats in [0, 1] (C = 1 or 3; a tensor or an array), or
    a list of PIL images."""
    import numpy as np

    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if hasattr(frames, "detach"):
        frames = frames.detach().to("cpu").float().numpy()
    array = np.asarray(frames, dtype=np.float32)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] < 1:
        raise ValueError(f"expected one clip of shape (frames, C, H, W) with C in 1, 3; got {array.shape}")
    if array.shape[1] == 1:
        array = np.repeat(array, 3, axis=1)
    array = np.nan_to_num(array, nan=0.0).clip(0.0, 1.0)
    return (array * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_video(frames: Any, *, fps: float, format: str = "mp4", quality: int = 18) -> bytes:
    """A clip encoded as MP4 (H.264) or WebM (VP9), playable in every browser (see `write_video`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / f"clip.{format}"
        _encode_video(target, frames, fps=fps, format=format, quality=quality)
        return target.read_bytes()


def write_video(path: str | Path, frames: Any, *, fps: float, quality: int = 18) -> MediaInfo:
    """Write one clip atomically; the container comes from the suffix (.mp4: H.264, .webm: VP9). `quality` is the
    encoder's CRF (lower: better, bigger). Returns what was written."""
    path = Path(path)
    format = path.suffix.lower().lstrip(".")
    atomic_write(
        path, lambda tmp: _encode_video(tmp, frames, fps=fps, format=format, quality=quality), durable=False
    )
    return probe(path)


def _encode_video(target: Path, frames: Any, *, fps: float, format: str, quality: int) -> None:
    import av
    import numpy as np

    if format not in VIDEO_FORMATS:
        raise ValueError(f"video format {format!r}: expected one of {', '.join(VIDEO_FORMATS)}")
    _check_fps(fps)
    array = video_array(frames)
    # H.264 in yuv420p needs even sides: an odd side gets its last row/column repeated
    pad = ((0, 0), (0, array.shape[1] % 2), (0, array.shape[2] % 2), (0, 0))
    array = np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array
    codec, pixel_format = VIDEO_FORMATS[format]
    # mp4: the index first (a second pass over the file), so a browser starts playing before it has it all
    options = {"movflags": "+faststart"} if format == "mp4" else {}
    with av.open(str(target), mode="w", format=format, options=options) as container:
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = pixel_format
        stream.options = {"crf": str(quality)} | ({"b:v": "0"} if codec == "libvpx-vp9" else {})
        for picture in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def encode_preview(frames: Any, *, fps: float, max_side: int = 160, max_frames: int = 48) -> bytes:
    """A small animated WebP of a clip (every browser shows it as an image; a report's thumbnail): at most
    `max_frames` frames, evenly picked, and `max_side` pixels."""
    from PIL import Image

    _check_fps(fps)  # the frame duration divides by it
    array = video_array(frames)
    picks = _evenly(len(array), max_frames)
    pictures = [Image.fromarray(array[i]) for i in picks]
    scale = min(1.0, max_side / max(pictures[0].size))
    if scale < 1.0:
        size = (max(1, round(pictures[0].width * scale)), max(1, round(pictures[0].height * scale)))
        pictures = [p.resize(size, Image.Resampling.BILINEAR) for p in pictures]
    frame_ms = max(20, round(1000.0 / fps * len(array) / len(picks)))  # the clip's own duration, fewer frames
    buffer = io.BytesIO()
    pictures[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=pictures[1:],
        duration=frame_ms,
        loop=0,
        quality=80,
    )
    return buffer.getvalue()


def write_preview(path: str | Path, frames: Any, *, fps: float, max_side: int = 160) -> Path:
    return atomic_write_bytes(path, encode_preview(frames, fps=fps, max_side=max_side), durable=False)


def read_frames(path: str | Path, count: int | None = None) -> list[Any]:
    """A video's frames as PIL images: all of them, or `count` evenly spaced (first and last included)."""
    import av

    with av.open(str(path)) as container:
        pictures = [frame.to_image() for frame in container.decode(video=0)]
    if not pictures:
        raise ValueError(f"{path}: no video frames")
    return pictures if count is None else [pictures[i] for i in _evenly(len(pictures), count)]


# ---------------------------------------------------------------------------------------------------- audio
def audio_array(waveform: Any) -> Any:
    """One sound as float32 (samples, channels) for soundfile: from (channels, samples) (a tensor or an array)."""
    import numpy as np

    if hasattr(waveform, "detach"):
        waveform = waveform.detach().to("cpu").float().numpy()
    array = np.asarray(waveform, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] > 16 or array.shape[1] < 1:
        raise ValueError(f"expected one sound of shape (channels, samples); got {array.shape}")
    return np.nan_to_num(array, nan=0.0).clip(-1.0, 1.0).T


def encode_audio(waveform: Any, *, sample_rate: int, format: str = "wav") -> bytes:
    """A sound encoded as WAV (16-bit PCM), FLAC or OGG/Vorbis."""
    import soundfile

    if format not in AUDIO_FORMATS:
        raise ValueError(f"audio format {format!r}: expected one of {', '.join(AUDIO_FORMATS)}")
    if not 1000 <= int(sample_rate) <= 384_000:
        raise ValueError(f"sample rate {sample_rate}: expected 1000 to 384000 Hz")
    container, subtype = AUDIO_FORMATS[format]
    buffer = io.BytesIO()
    soundfile.write(buffer, audio_array(waveform), int(sample_rate), format=container, subtype=subtype)
    return buffer.getvalue()


def write_audio(path: str | Path, waveform: Any, *, sample_rate: int) -> MediaInfo:
    """Write one sound atomically; the format comes from the suffix (.wav, .flac or .ogg)."""
    path = Path(path)
    data = encode_audio(waveform, sample_rate=sample_rate, format=path.suffix.lower().lstrip("."))
    atomic_write_bytes(path, data, durable=False)
    return probe(path)


def read_audio(path: str | Path) -> tuple[Any, int]:
    """(samples as float32 (samples, channels), sample rate)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return data, int(rate)


def resample(waveform: Any, source_rate: int, target_rate: int) -> Any:
    """(channels, samples) from one sample rate to another (polyphase filtering, as audio tools do)."""
    from math import gcd

    import numpy as np
    from scipy.signal import resample_poly

    if hasattr(waveform, "detach"):
        waveform = waveform.detach().to("cpu").float().numpy()
    if source_rate == target_rate:
        return np.asarray(waveform, dtype=np.float32)
    g = gcd(int(source_rate), int(target_rate))
    return resample_poly(waveform, target_rate // g, source_rate // g, axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- probe
def probe(path: str | Path) -> MediaInfo:
    """What a media file holds, read from the file (its header; a video's frames are counted by decoding)."""
    path = Path(path)
    kind = kind_of(path)
    mime = media_type(path)
    if kind == "image":
        from PIL import Image

        with Image.open(path) as picture:
            frames = getattr(picture, "n_frames", 1)
            return MediaInfo("image", mime, picture.width, picture.height, frames if frames > 1 else None)
    if kind == "video":
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(video=0))
            fps = float(stream.average_rate or stream.base_rate or 0) or None
            width, height = stream.codec_context.width, stream.codec_context.height
        return MediaInfo("video", mime, width, height, frames, fps, round(frames / fps, 6) if fps else None)
    if kind == "audio":
        import soundfile

        info = soundfile.info(str(path))
        return MediaInfo(
            "audio",
            mime,
            duration=round(info.frames / info.samplerate, 6),
            sample_rate=int(info.samplerate),
            channels=int(info.channels),
        )
    raise ValueError(f"{path}: not a media file worldgen knows (suffixes: {', '.join(MEDIA_TYPES)})")


def read_media(path: str | Path) -> Media:
    """A media file read back as the artifact it would be written from (an image, a clip with its fps, a sound
    with its sample rate)."""
    info = probe(path)
    if info.kind == "image":
        from PIL import Image

        with Image.open(path) as picture:
            return Media("image", picture.convert("RGB"))
    if info.kind == "video":
        return Media("video", read_frames(path), fps=info.fps or 16.0, format=Path(path).suffix.lower()[1:])
    samples, rate = read_audio(path)
    return Media("audio", samples.T, sample_rate=rate, format=Path(path).suffix.lower()[1:])


def _check_fps(fps: float) -> None:
    if not 0 < float(fps) <= MAX_FPS:
        raise ValueError(f"fps {fps}: expected more than 0 and at most {MAX_FPS:g}")


def _rate(fps: float) -> Any:
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def _evenly(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included (all of them when fewer)."""
    if count >= total:
        return list(range(total))
    if count <= 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})
