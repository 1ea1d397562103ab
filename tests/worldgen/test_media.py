"""worldgen.media: clips and sounds written as files people open (MP4, WebM, animated WebP, WAV/FLAC/OGG), read
back with the libraries a player uses (PyAV, soundfile, PIL), and refused when they could not be written."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from PIL import Image

from worldgen import media


def clip(frames: int = 5, height: int = 16, width: int = 24, channels: int = 3) -> torch.Tensor:
    """(F, C, H, W) in [0, 1]: a gradient that moves, so every frame differs."""
    ramp = torch.linspace(0, 1, width).expand(height, width)
    return torch.stack([((ramp + f / frames) % 1.0).expand(channels, height, width) for f in range(frames)])


def tone(seconds: float = 0.5, rate: int = 16_000, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * math.pi * 440 * (c + 1) * t) for c in range(channels)]).astype(
        np.float32
    )


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize(("suffix", "codec"), [("mp4", "h264"), ("webm", "vp9")])
def test_a_clip_round_trips_through_its_container(tmp_path, suffix, codec):
    frames = clip(frames=6)
    info = media.write_video(tmp_path / f"clip.{suffix}", frames, fps=8)
    pictures = decoded(tmp_path / f"clip.{suffix}")
    assert [p.shape for p in pictures] == [(16, 24, 3)] * 6
    with av.open(str(tmp_path / f"clip.{suffix}")) as container:
        assert container.streams.video[0].codec_context.name == codec
    assert (info.kind, info.mime, info.width, info.height, info.frames) == (
        "video",
        f"video/{suffix}",
        24,
        16,
        6,
    )
    assert info.fps == 8 and info.duration == pytest.approx(0.75)
    # lossy, but the picture is the one written (a gradient: a wrong channel order or layout is far off)
    expected = media.video_array(frames).astype(np.float32)
    assert np.abs(np.stack(pictures).astype(np.float32) - expected).mean() < 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"clip.{suffix}"]  # no temp file left


def test_an_mp4_holds_its_index_first_so_a_browser_plays_it_before_it_has_it_all(tmp_path):
    media.write_video(tmp_path / "clip.mp4", clip(), fps=16)
    data = (tmp_path / "clip.mp4").read_bytes()
    assert 0 < data.index(b"moov") < data.index(b"mdat")  # +faststart


def test_odd_sides_are_padded_to_even_ones_h264_can_hold(tmp_path):
    info = media.write_video(tmp_path / "odd.mp4", clip(frames=3, height=15, width=21), fps=16)
    assert (info.width, info.height, info.frames) == (22, 16, 3)
    gray = media.write_video(tmp_path / "gray.webm", clip(frames=2, channels=1), fps=16)  # one channel: gray
    assert (gray.width, gray.height, gray.frames) == (24, 16, 2)


def test_encode_video_gives_the_bytes_write_video_writes(tmp_path):
    data = media.encode_video(clip(), fps=16, format="webm")
    (tmp_path / "clip.webm").write_bytes(data)
    assert media.probe(tmp_path / "clip.webm").frames == 5


def test_a_preview_is_a_small_animated_webp(tmp_path):
    frames = clip(frames=60, height=90, width=320)
    path = media.write_preview(tmp_path / "clip.preview.webp", frames, fps=24, max_side=160)
    with Image.open(path) as picture:
        assert picture.format == "WEBP" and picture.is_animated
        assert picture.size == (160, 45) and picture.n_frames == 48  # at most 48 frames, at most 160 pixels
    assert media.probe(path).frames == 48 and media.kind_of(path) == "image"
    # the preview lasts as long as the clip: 60 frames at 24 fps = 2.5 s
    with Image.open(path) as picture:
        durations = []
        for i in range(picture.n_frames):
            picture.seek(i)
            picture.load()  # a frame's duration is known once it is read
            durations.append(picture.info["duration"])
    assert sum(durations) == pytest.approx(2500, rel=0.05)


def test_read_frames_gives_all_frames_or_evenly_spaced_ones(tmp_path):
    media.write_video(tmp_path / "clip.mp4", clip(frames=9), fps=16)
    assert len(media.read_frames(tmp_path / "clip.mp4")) == 9
    picks = media.read_frames(tmp_path / "clip.mp4", count=3)
    assert len(picks) == 3 and picks[0].size == (24, 16)


@pytest.mark.parametrize(
    ("suffix", "mime"), [("wav", "audio/wav"), ("flac", "audio/flac"), ("ogg", "audio/ogg")]
)
def test_a_sound_round_trips(tmp_path, suffix, mime):
    sound = tone(seconds=0.5, rate=16_000, channels=2)
    info = media.write_audio(tmp_path / f"sound.{suffix}", torch.from_numpy(sound), sample_rate=16_000)
    assert (info.kind, info.mime, info.sample_rate, info.channels) == ("audio", mime, 16_000, 2)
    assert info.duration == pytest.approx(0.5, abs=0.01)
    samples, rate = media.read_audio(tmp_path / f"sound.{suffix}")
    assert rate == 16_000 and samples.shape[1] == 2 and abs(len(samples) - 8000) <= 10
    if suffix != "ogg":  # lossless up to 16-bit PCM
        assert np.abs(samples.T - sound).max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sound.{suffix}"]


def test_a_mono_sound_may_be_one_dimensional_and_is_clipped_to_its_range(tmp_path):
    info = media.write_audio(tmp_path / "mono.wav", np.full(1000, 3.0, dtype=np.float32), sample_rate=8000)
    assert info.channels == 1 and info.duration == pytest.approx(0.125)
    samples, _ = media.read_audio(tmp_path / "mono.wav")
    assert samples.max() == pytest.approx(1.0, abs=1e-4)


def test_resample_changes_the_length_by_the_rates(tmp_path):
    sound = tone(seconds=1.0, rate=44_100, channels=2)
    out = media.resample(torch.from_numpy(sound), 44_100, 16_000)
    assert out.shape == (2, 16_000) and out.dtype == np.float32
    assert np.abs(out).max() == pytest.approx(0.5, abs=0.05)  # the tone survives
    assert media.resample(sound, 16_000, 16_000).shape == sound.shape


def test_mime_types_and_kinds_by_suffix():
    assert media.media_type("a/B.MP4") == "video/mp4" and media.media_type("x.webm") == "video/webm"
    assert (
        media.media_type("x.wav") == "audio/wav" and media.media_type("x.bin") == "application/octet-stream"
    )
    assert [media.kind_of(p) for p in ("x.png", "x.mp4", "x.ogg", "x.json")] == [
        "image",
        "video",
        "audio",
        None,
    ]
    with pytest.raises(ValueError, match="not a media file"):
        media.probe("config.json")


@pytest.mark.parametrize(
    ("name", "frames", "fps", "message"),
    [
        ("clip.avi", clip(), 16, "video format 'avi'"),
        ("clip.mp4", clip(), 0, "fps 0"),
        ("clip.mp4", clip(), -5, "fps -5"),
        ("clip.mp4", clip(), media.MAX_FPS + 1, "at most 120"),
        ("clip.mp4", clip(), float("nan"), "fps nan"),
        ("clip.mp4", torch.rand(2, 5, 3, 8, 8), 16, r"shape \(frames, C, H, W\)"),  # a batch, not a clip
        ("clip.mp4", torch.rand(5, 4, 8, 8), 16, "C in 1, 3"),  # four channels
        ("clip.webm", torch.rand(0, 3, 8, 8), 16, "shape"),  # no frames
    ],
)
def test_a_clip_that_cannot_be_written_leaves_no_file(tmp_path, name, frames, fps, message):
    with pytest.raises(ValueError, match=message):
        media.write_video(tmp_path / name, frames, fps=fps)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


@pytest.mark.parametrize("fps", [0, media.MAX_FPS * 2])
def test_a_preview_refuses_a_bad_fps(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        media.write_preview(tmp_path / "p.webp", clip(), fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "sound", "rate", "message"),
    [
        ("sound.mp3", tone(), 16_000, "audio format 'mp3'"),
        ("sound.wav", tone(), 0, "sample rate 0"),
        ("sound.wav", tone(), 1_000_000, "sample rate"),
        ("sound.wav", tone().T, 16_000, r"\(channels, samples\)"),  # (samples, channels): transposed
        ("sound.wav", np.zeros((1, 2, 100)), 16_000, r"\(channels, samples\)"),  # a batch
        ("sound.flac", np.zeros((2, 0)), 16_000, r"\(channels, samples\)"),  # no samples
    ],
)
def test_a_sound_that_cannot_be_written_leaves_no_file(tmp_path, name, sound, rate, message):
    with pytest.raises(ValueError, match=message):
        media.write_audio(tmp_path / name, sound, sample_rate=rate)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_encoder_leaves_neither_the_file_nor_its_temp_file(tmp_path, monkeypatch):
    """A crash in the middle of encoding (here: the third frame) leaves the folder as it was."""
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing(array, format):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(OSError, match="disk full"):
        media.write_video(tmp_path / "clip.mp4", clip(), fps=16)
    assert list(tmp_path.iterdir()) == []
