"""What a vlm block is given, read into pictures, clips and sounds (worldgen.nodes.vlm_media): block 3's files
of every kind, artifact references, tensors; clips sampled to `frames` evenly spaced frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worldgen.errors import ConfigError
from worldgen.media import write_audio, write_video
from worldgen.nodes.vlm_media import MAX_FRAMES, Clip, Picture, Sound, evenly_spaced, read_media
from worldgen.state import ArtifactRef


def _ramp(frames: int = 9) -> np.ndarray:
    """(F, 3, 32, 48): frame t a flat grey of brightness t / (F - 1) (which frame is which, after decoding)."""
    levels = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    return np.broadcast_to(levels[:, None, None, None], (frames, 3, 32, 48)).copy()


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    write_video(tmp_path / "b.mp4", _ramp(), fps=8)
    write_video(tmp_path / "c.webm", _ramp(5), fps=4)
    write_audio(tmp_path / "d.wav", np.zeros((2, 8000)), sample_rate=16000)
    write_audio(tmp_path / "e.flac", np.zeros((1, 4000)), sample_rate=8000)
    return tmp_path


def test_every_kind_is_read_in_order(files):
    paths = [files / n for n in ("a.png", "b.mp4", "c.webm", "d.wav", "e.flac")]
    items = read_media(
        [str(paths[0]), paths[1], {"path": str(paths[2])}, ArtifactRef(path=str(paths[3])), paths[4]]
    )
    assert [type(i) for i in items] == [Picture, Clip, Clip, Sound, Sound]
    assert items[0].image.size == (40, 30) and items[0].image.mode == "RGB"
    clip = items[1]
    assert (clip.total, clip.fps, clip.picked) == (9, 8.0, [0, 3, 5, 8])
    assert len(clip.frames) == 4 and len(clip.all_frames) == 9
    # the sampled frames are the ones named: brightness t / 8 for frame t
    assert [round(np.asarray(f).mean() / 255 * 8) for f in clip.frames] == [0, 3, 5, 8]
    assert clip.label(2) == "Video 2: frames 1, 4, 6, 9 of 9, 8 fps, 1.1 s"
    assert clip.timing() == "9 frames, 8 fps, 1.1 s"
    assert items[2].total == 5 and items[2].picked == [0, 1, 3, 4]  # WebM too
    assert (items[3].rate, items[3].samples.shape) == (16000, (8000, 2))
    assert (items[4].rate, items[4].samples.shape) == (8000, (4000, 1))


def test_frames_says_how_many_are_sampled(files):
    assert read_media(files / "b.mp4", frames=1)[0].picked == [0]
    assert read_media(files / "b.mp4", frames=2)[0].label(1) == "Video 1: frames 1, 9 of 9, 8 fps, 1.1 s"
    assert read_media(files / "b.mp4", frames=MAX_FRAMES)[0].picked == list(range(9))  # all, when fewer
    assert evenly_spaced(81, 4) == [0, 27, 53, 80]
    for bad in (0, -1, MAX_FRAMES + 1, 2.5, True):
        with pytest.raises(ConfigError, match=f"frames per clip must be an integer from 1 to {MAX_FRAMES}"):
            read_media(files / "b.mp4", frames=bad)


def test_tensors_images_and_clips():
    images = read_media(torch.zeros(2, 3, 8, 8))
    assert [type(i) for i in images] == [Picture, Picture]
    (clip,) = read_media(torch.rand(1, 6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), frames=3)
    assert (clip.total, clip.fps, clip.picked) == (6, None, [0, 2, 5])  # a VIDEO port's clip: no frame rate
    assert clip.label(1) == "Video 1: frames 1, 3, 6 of 6" and clip.timing() == "6 frames"


def test_bad_inputs_name_the_file_and_the_port(files, tmp_path):
    with pytest.raises(ConfigError, match="'.*missing.mp4' does not exist") as info:
        read_media(str(tmp_path / "missing.mp4"))
    assert info.value.path == "images"
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ConfigError, match="cannot read video file '.*broken.mp4'"):
        read_media(tmp_path / "broken.mp4")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....")
    with pytest.raises(ConfigError, match="cannot read audio file"):
        read_media(tmp_path / "broken.wav")
    with pytest.raises(ConfigError, match="cannot read an artifact from a int"):
        read_media([3])
    with pytest.raises(ConfigError, match="empty"):
        read_media([])
    with pytest.raises(ConfigError, match="shape"):
        read_media(torch.zeros(1, 2, 2, 8, 8, 1))
