"""A world episode holding a video (MP4 + its animated WebP preview) and a sound (WAV), made by hand: the files
written with worldgen.media into `artifacts/<state_id>/` as the Creator would, block 3 typed. The gateway and
report tests serve and embed it without running a model."""

from __future__ import annotations

import math

import torch

from worldgen import media
from worldgen.state import ArtifactRef, GenerationConfig, WorldState
from worldgen.storage import WorldStorage

FRAMES, FPS, WIDTH, HEIGHT = 16, 8, 64, 48  # a 2-second clip
SAMPLE_RATE, SECONDS = 16_000, 1.0


def clip() -> torch.Tensor:
    """(F, C, H, W) in [0, 1]: a bright bar sweeping right, so every frame differs."""
    frames = torch.zeros(FRAMES, 3, HEIGHT, WIDTH)
    for f in range(FRAMES):
        x = f * WIDTH // FRAMES
        frames[f, :, :, x : x + 8] = 1.0
        frames[f, 2] += 0.3
    return frames.clamp(0, 1)


def sound() -> torch.Tensor:
    """(channels, samples): a stereo 440 Hz tone."""
    t = torch.arange(int(SAMPLE_RATE * SECONDS)) / SAMPLE_RATE
    return torch.stack([0.4 * torch.sin(2 * math.pi * 440 * t)] * 2)


def media_state(store: WorldStorage, state_id: str) -> WorldState:
    """A complete state whose block 3 is a video (with its preview) and a sound, written as in-flight files."""
    folder = store.artifacts_dir / state_id
    video = media.write_video(folder / "000.mp4", clip(), fps=FPS)
    media.write_preview(folder / "000.preview.webp", clip(), fps=FPS)
    audio = media.write_audio(folder / "001.wav", sound(), sample_rate=SAMPLE_RATE)
    rel = f"artifacts/{state_id}"
    refs = [
        ArtifactRef(path=f"{rel}/000.mp4", preview=f"{rel}/000.preview.webp", **video.fields()),
        ArtifactRef(path=f"{rel}/001.wav", **audio.fields()),
    ]
    return WorldState(
        id=state_id,
        happening="A lighthouse beam sweeps the bay",
        generation=GenerationConfig(prompt="a lighthouse at night", width=WIDTH, height=HEIGHT, steps=2),
        artifacts=refs,
        description="A bar of light crosses the water; a horn sounds",
        outcome="The ship turns away from the rocks",
    )


def save_media_episode(store: WorldStorage, state_id: str = "moving") -> int:
    """Save `media_state` as the world's next episode; its number."""
    return store.save_episode(media_state(store, state_id), step=1, action="watch the bay", ran=[])
