"""What a clip's motion and a sound's loudness measure, in numbers and in words (for the `vlm` blocks).

Video: `clip_motion` takes a clip's frames and gives the mean absolute frame-to-frame change of their luma and,
when the change is steady enough to follow, where it goes (the summed shifts that phase correlation finds between
consecutive frame *differences*: a static background cancels out of a difference, so an object moving over it and
a camera pan both show as a shift). Audio: `sound_measures` gives RMS and peak level in dBFS, the share of silent
50 ms windows and the spectral centroid. Both are deterministic numpy, a few milliseconds for a short clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# ---- video: motion -------------------------------------------------------------------------------------
MOTION_SIDE = 64  # frames are box-filtered to at most this many pixels a side before measuring motion
MAX_MOTION_FRAMES = 64  # longer clips are measured on this many evenly spaced frames
# a pair's shift counts only when its phase-correlation peak stands out: on noise, the highest of 64 × 64
# values of a normalised correlation sits near 0.07
_PEAK_MIN = 0.2
_DIRECTION_MIN = 0.05  # the summed shift must cross 5 % of the frame to name a direction

# (upper limit, word) pairs for the mean absolute luma change between consecutive frames (0..1)
_MOTION_WORDS = (((0.004, "still"), (0.02, "slight motion"), (0.06, "moderate motion")), "strong motion")
# 8 compass sectors, counter-clockwise from "to the right", in image terms (up is the frame's top)
_DIRECTIONS = (
    "to the right",
    "up and to the right",
    "upward",
    "up and to the left",
    "to the left",
    "down and to the left",
    "downward",
    "down and to the right",
)


def word_for(value: float, scale: Sequence[tuple[float, str]], last: str) -> str:
    """The word of the first (limit, word) whose limit `value` is under; `last` above them all."""
    for limit, word in scale:
        if value < limit:
            return word
    return last


def luma_frames(frames: Sequence[Any], side: int = MOTION_SIDE) -> Any:
    """(F, h, w) float32 Rec. 709 luma in [0, 1] of PIL frames, each box-filtered to at most `side` pixels."""
    import numpy as np
    from PIL import Image

    out = []
    for frame in frames:
        if max(frame.size) > side:
            scale = side / max(frame.size)
            size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
            frame = frame.resize(size, Image.Resampling.BOX)
        rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0
        out.append(rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32))
    return np.stack(out)


def _phase_shift(a: Any, b: Any) -> tuple[float, float, float]:
    """(dy, dx, peak): the translation taking `a` to `b` by phase correlation, and how clearly it stands out
    (1.0 for a pure circular shift, near 0 for unrelated images)."""
    import numpy as np

    a, b = a - a.mean(), b - b.mean()
    cross = np.fft.fft2(b) * np.conj(np.fft.fft2(a))
    cross /= np.abs(cross) + 1e-9
    surface = np.fft.ifft2(cross).real
    iy, ix = np.unravel_index(int(surface.argmax()), surface.shape)
    h, w = surface.shape
    dy = iy - h if iy > h // 2 else iy  # wrap to signed shifts
    dx = ix - w if ix > w // 2 else ix
    return float(dy), float(dx), float(surface[iy, ix])


def clip_motion(frames: Sequence[Any]) -> dict[str, Any]:
    """Motion of a clip given as PIL frames (all of them, in order; at most MAX_MOTION_FRAMES are used).

    change: mean absolute luma change between consecutive frames (0 still, 1 black/white flicker);
    shift: (dx, dy), the summed shift over the clip as fractions of the frame's width and height (x to the
    right, y down); direction: the shift in words, None when it is under 5 % of the frame or the clip is still.
    """
    import numpy as np

    if len(frames) > MAX_MOTION_FRAMES:
        picks = np.linspace(0, len(frames) - 1, MAX_MOTION_FRAMES).round().astype(int)
        frames = [frames[i] for i in picks]
    luma = luma_frames(frames)
    if len(luma) < 2:
        return {"change": 0.0, "shift": (0.0, 0.0), "direction": None, "word": "still"}
    change = float(np.abs(np.diff(luma, axis=0)).mean())
    # differences of consecutive frames (their shift is the motion); a 2-frame clip: the frames themselves
    tracked = np.diff(luma, axis=0) if len(luma) >= 3 else luma
    dy = dx = 0.0
    for a, b in zip(tracked[:-1], tracked[1:], strict=True):
        if float(np.abs(a).max()) < 1e-3 or float(np.abs(b).max()) < 1e-3:
            continue  # nothing changed in this pair: nothing to follow
        sy, sx, peak = _phase_shift(a, b)
        if peak >= _PEAK_MIN:
            dy, dx = dy + sy, dx + sx
    h, w = luma.shape[1:]
    shift = (dx / w, dy / h)
    word = word_for(change, *_MOTION_WORDS)
    direction = None
    if word != "still" and float(np.hypot(*shift)) >= _DIRECTION_MIN:
        angle = float(np.degrees(np.arctan2(-shift[1], shift[0])))  # counter-clockwise, up positive
        direction = _DIRECTIONS[round(angle / 45.0) % 8]
    return {"change": change, "shift": shift, "direction": direction, "word": word}


def describe_motion(motion: dict[str, Any]) -> str:
    """'motion 0.031 (moderate motion to the left)'."""
    words = motion["word"] + (f" {motion['direction']}" if motion["direction"] else "")
    return f"motion {motion['change']:.3f} ({words})"


# ---- audio: loudness, silence, brightness --------------------------------------------------------------
FLOOR_DBFS = -120.0  # what digital silence reads as (log of zero)
SILENCE_DBFS = -60.0  # a 50 ms window under this RMS level counts as silent
_WINDOW_S = 0.05
_FFT_SIZE = 2048
_LOUDNESS_WORDS = (((-60.0, "silent"), (-35.0, "quiet"), (-18.0, "moderate")), "loud")
_CENTROID_WORDS = (((300.0, "low, bass-heavy"), (1500.0, "mid"), (4000.0, "bright")), "very bright, hissy")


def dbfs(level: float) -> float:
    """An amplitude (1.0 = full scale) in dB relative to full scale, floored at FLOOR_DBFS."""
    import math

    return max(FLOOR_DBFS, 20.0 * math.log10(level)) if level > 0 else FLOOR_DBFS


def sound_measures(samples: Any, rate: int) -> dict[str, Any]:
    """Measures of one sound given as (samples, channels) floats in [-1, 1] at `rate` Hz.

    rms_dbfs / peak_dbfs: level over all channels relative to full scale; silence: share of 50 ms windows of
    the mono mix under -60 dBFS RMS; centroid: the spectral centroid in Hz (magnitude-weighted mean frequency
    of the non-silent windows' spectra, Hann-windowed), None when the sound is all silence.
    """
    import numpy as np

    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    count, channels = data.shape
    measures: dict[str, Any] = {
        "duration": count / rate,
        "sample_rate": int(rate),
        "channels": int(channels),
        "rms_dbfs": dbfs(float(np.sqrt((data**2).mean()))) if count else FLOOR_DBFS,
        "peak_dbfs": dbfs(float(np.abs(data).max())) if count else FLOOR_DBFS,
    }
    mono = data.mean(axis=1)
    hop = max(1, round(rate * _WINDOW_S))
    windows = [mono[i : i + hop] for i in range(0, count, hop)] or [np.zeros(1)]
    levels = np.array([dbfs(float(np.sqrt((w**2).mean()))) for w in windows])
    measures["silence"] = float((levels < SILENCE_DBFS).mean())
    measures["centroid"] = _spectral_centroid(mono, rate)
    return measures


def _spectral_centroid(mono: Any, rate: int) -> float | None:
    import numpy as np

    size = _FFT_SIZE
    padded = np.pad(mono, (0, max(0, size - len(mono))))
    starts = range(0, len(padded) - size + 1, size // 2)
    window = np.hanning(size)
    total = np.zeros(size // 2 + 1)
    for start in starts:
        chunk = padded[start : start + size]
        if dbfs(float(np.sqrt((chunk**2).mean()))) < SILENCE_DBFS:
            continue  # silence carries no colour; its noise floor would pull the centroid up
        total += np.abs(np.fft.rfft(chunk * window))
    if total.sum() <= 0:
        return None
    return float((np.fft.rfftfreq(size, 1.0 / rate) * total).sum() / total.sum())


def describe_sound(measures: dict[str, Any]) -> str:
    """One sentence of a sound's measures: length, rate, channels, loudness, silence, brightness."""
    channels = {1: "mono", 2: "stereo"}.get(measures["channels"], f"{measures['channels']} channels")
    rms, peak = measures["rms_dbfs"], measures["peak_dbfs"]
    parts = [
        f"{measures['duration']:.2f} s, {measures['sample_rate']} Hz, {channels}",
        f"loudness RMS {rms:.1f} dBFS, peak {peak:.1f} dBFS ({word_for(rms, *_LOUDNESS_WORDS)})",
        f"silent {measures['silence']:.0%} of the time",
    ]
    centroid = measures["centroid"]
    if centroid is None:
        parts.append("no spectrum (all silence)")
    else:
        parts.append(f"spectral centroid {centroid:.0f} Hz ({word_for(centroid, *_CENTROID_WORDS)})")
    return "; ".join(parts) + "."
