"""Motion and loudness measures (worldgen.nodes.media_measures) on clips and sounds written as real files (MP4
through PyAV, WAV through soundfile) and read back, as the Philosopher gets them."""

from __future__ import annotations

import numpy as np
import pytest

from worldgen.media import read_audio, read_frames, write_audio, write_video
from worldgen.nodes.media_measures import (
    FLOOR_DBFS,
    clip_motion,
    describe_motion,
    describe_sound,
    sound_measures,
)

RATE = 16_000


def moving_square(dx: int, dy: int, frames: int = 9, background: np.ndarray | None = None) -> np.ndarray:
    """(F, 3, 48, 64): a white 12-pixel square moving (dx, dy) pixels a frame over `background` (black)."""
    clip = np.zeros((frames, 3, 48, 64), dtype=np.float32)
    if background is not None:
        clip[:] = background
    for t in range(frames):
        x, y = 26 + dx * t, 18 + dy * t
        clip[t, :, y : y + 12, x : x + 12] = 1.0
    return clip


def _through_mp4(tmp_path, name: str, clip: np.ndarray) -> list:
    path = tmp_path / f"{name}.mp4"
    write_video(path, clip, fps=8)
    return read_frames(path)


def test_a_still_clip_is_still(tmp_path):
    texture = np.random.default_rng(0).random((1, 3, 48, 64)).astype(np.float32)
    motion = clip_motion(_through_mp4(tmp_path, "still", np.repeat(texture, 9, axis=0)))
    assert motion["word"] == "still" and motion["direction"] is None
    assert motion["change"] < 0.004  # H.264's own flicker stays under the threshold
    assert describe_motion(motion).endswith("(still)")


@pytest.mark.parametrize(
    ("dx", "dy", "direction"),
    [(-2, 0, "to the left"), (2, 0, "to the right"), (0, -2, "upward"), (2, 2, "down and to the right")],
)
def test_a_moving_square_moves_and_says_where(tmp_path, dx, dy, direction):
    motion = clip_motion(_through_mp4(tmp_path, "square", moving_square(dx, dy)))
    assert motion["word"] != "still" and "motion" in motion["word"]
    assert motion["direction"] == direction, motion
    # 8 frame differences, 7 shifts of 2 pixels between them: 14 pixels of a 64 × 48 frame
    assert motion["shift"][0] == pytest.approx(dx * 7 / 64, abs=0.03)
    assert motion["shift"][1] == pytest.approx(dy * 7 / 48, abs=0.03)
    assert describe_motion(motion).endswith(f"motion {direction})")


def test_motion_over_a_textured_background_and_on_noise(tmp_path):
    rng = np.random.default_rng(1)
    background = 0.5 * rng.random((3, 48, 64)).astype(np.float32)
    # the background is the same in every frame: it cancels out of the frame differences
    over = clip_motion(_through_mp4(tmp_path, "over", moving_square(-3, 0, background=background)))
    assert over["direction"] == "to the left"
    noise = clip_motion(_through_mp4(tmp_path, "noise", rng.random((9, 3, 48, 64)).astype(np.float32)))
    assert noise["word"] == "strong motion" and noise["direction"] is None  # no shift stands out of noise
    single = clip_motion(_through_mp4(tmp_path, "one", moving_square(0, 0, frames=1)))
    assert single == {"change": 0.0, "shift": (0.0, 0.0), "direction": None, "word": "still"}


def test_a_silent_wav_is_silent(tmp_path):
    write_audio(tmp_path / "silence.wav", np.zeros((2, RATE // 2)), sample_rate=RATE)
    measures = sound_measures(*read_audio(tmp_path / "silence.wav"))
    assert measures["rms_dbfs"] == measures["peak_dbfs"] == FLOOR_DBFS
    assert measures["silence"] == 1.0 and measures["centroid"] is None
    assert measures["channels"] == 2 and measures["duration"] == pytest.approx(0.5)
    text = describe_sound(measures)
    assert text.startswith("0.50 s, 16000 Hz, stereo;")
    assert "(silent)" in text and "silent 100% of the time" in text and "all silence" in text


def test_a_loud_sine_is_loud_with_its_centroid_at_its_frequency(tmp_path):
    t = np.arange(RATE) / RATE
    write_audio(tmp_path / "sine.wav", 0.8 * np.sin(2 * np.pi * 1000 * t)[None], sample_rate=RATE)
    measures = sound_measures(*read_audio(tmp_path / "sine.wav"))
    assert measures["rms_dbfs"] == pytest.approx(20 * np.log10(0.8 / np.sqrt(2)), abs=0.1)
    assert measures["peak_dbfs"] == pytest.approx(20 * np.log10(0.8), abs=0.1)
    assert measures["silence"] == 0.0
    assert measures["centroid"] == pytest.approx(1000, abs=25)
    text = describe_sound(measures)
    assert "mono" in text and "(loud)" in text and "silent 0% of the time" in text
    assert "spectral centroid 1000 Hz" in text


def test_silence_share_and_a_brighter_tone(tmp_path):
    t = np.arange(RATE) / RATE
    tone = 0.1 * np.sin(2 * np.pi * 5000 * t)
    tone[: RATE // 4] = 0.0  # the first quarter silent
    measures = sound_measures(tone[:, None], RATE)
    assert measures["silence"] == pytest.approx(0.25, abs=0.03)
    assert measures["centroid"] == pytest.approx(5000, abs=50)  # the silent quarter does not pull it down
    assert "very bright" in describe_sound(measures) and "(moderate)" in describe_sound(measures)
    assert sound_measures(tone[:, None], RATE) == measures  # deterministic
