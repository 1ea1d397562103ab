"""The world's prompt templates (rendered by worldgen.prompts) show every artifact of an episode: block 3's
images, videos and sounds with their kinds and measures beside block 4's description of each, for the Author
(the LLM's author.j2 and the default world's offline/author.j2) and World update."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from worldgen.media import probe, write_audio, write_video
from worldgen.prompts import render_prompt
from worldgen.registry import create_block
from worldgen.state import ArtifactRef, WorldContent, WorldState
from worldgen.world import stage_context

CONTENT = WorldContent(title="The Harbor", story="The fog came in.")


@pytest.fixture
def episode(tmp_path) -> WorldState:
    """Blocks 1, 3 and 4 of an episode that made a picture, a clip and a sound: block 3 typed as the Creator
    records it (probed from the files), block 4 what the default world's Philosopher says of them."""
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    clip = np.zeros((9, 3, 48, 64), dtype=np.float32)
    for t in range(9):
        clip[t, :, 18:30, 40 - 3 * t : 52 - 3 * t] = 1.0  # a square sliding left
    write_video(tmp_path / "b.mp4", clip, fps=8)
    write_audio(
        tmp_path / "c.wav", 0.8 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440)[None], sample_rate=16000
    )
    refs = [ArtifactRef(path=n, **probe(tmp_path / n).fields()) for n in ("a.png", "b.mp4", "c.wav")]
    description = create_block("vlm/image_stats")(images=[str(tmp_path / r.path) for r in refs])["text"]
    return WorldState(happening="A ship slides out of the fog.", artifacts=refs, description=description)


def _context(role: str, state: WorldState) -> dict:
    return stage_context(role, state, CONTENT, action=None, step=1, pipelines=[], defaults={}, seed=0)


def test_the_authors_prompt_shows_the_clip_and_the_sound(episode):
    prompt = render_prompt("file:author.j2", _context("author", episode))
    assert "- Image 1\n- Video 2: 9 frames at 8 fps, 1.1 s\n- Audio 3: 0.5 s, 16000 Hz, mono" in prompt
    video, audio = episode.description.splitlines()[1:]
    assert video.startswith("Video 2: 9 frames, 8 fps, 1.1 s; motion") and "to the left" in video
    assert audio.startswith("Audio 3: 0.50 s, 16000 Hz, mono; loudness") and "(loud)" in audio
    assert video in prompt and audio in prompt  # block 4's word on each, beside block 3's list
    assert render_prompt("file:author.j2", _context("author", episode)) == prompt


def test_the_offline_author_names_each_witness_and_keeps_each_entry(episode):
    long = episode.model_copy(
        update={
            "description": "Image 1: " + "red " * 120 + "\n" + "\n".join(episode.description.splitlines()[1:])
        }
    )
    outcome = render_prompt("file:offline/author.j2", _context("author", long))
    assert outcome.startswith(
        "In The Harbor, as 1 picture, a clip (9 frames at 8 fps, 1.1 s) and a sound (0.5 s) bear witness: Image 1: red"
    )
    # a long picture entry no longer crowds out the clip's and the sound's
    assert "…\nVideo 2: 9 frames, 8 fps" in outcome and "\nAudio 3: 0.50 s" in outcome
    assert len(outcome.splitlines()[0]) < 250  # the picture's entry cut to its third of the 300 characters
    assert outcome.endswith("It had been foretold: A ship slides out of the fog.")
    assert render_prompt("file:offline/author.j2", _context("author", long)) == outcome


def test_an_image_only_episode_reads_as_before(episode):
    """The default world (pictures only) keeps its texts: one picture, its description cut at 300."""
    pictures = episode.model_copy(
        update={"artifacts": episode.artifacts[:1], "description": "Image 1: " + "x" * 400}
    )
    outcome = render_prompt("file:offline/author.j2", _context("author", pictures))
    assert (
        outcome
        == "In The Harbor, as 1 picture bears witness: Image 1: "
        + "x" * 290
        + "… It had been foretold: A ship slides out of the fog."
    )
    two = pictures.model_copy(
        update={"artifacts": episode.artifacts[:1] * 2, "description": "Image 1: red.\nImage 2: blue."}
    )
    assert render_prompt("file:offline/author.j2", _context("author", two)) == (
        "In The Harbor, as 2 pictures bear witness: Image 1: red.\nImage 2: blue. It had been foretold: A ship "
        "slides out of the fog."
    )


def test_world_update_sees_the_artifacts_too(episode):
    done = episode.model_copy(update={"outcome": "The ship left a humming wake."})
    prompt = render_prompt("file:world_update.j2", _context("world_update", done))
    assert "What really happened in the latest episode:\nThe ship left a humming wake." in prompt
    assert "- Video 2: 9 frames at 8 fps, 1.1 s\n" in prompt and "- Audio 3: 0.5 s" in prompt
    assert episode.description in prompt
