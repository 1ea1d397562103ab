"""Block 2 as typed requests (image, video, audio) planned and run by the Creator (worldgen/creation.py): a world
whose block 2 asks for a picture, a clip from it and a sound ends with all three in block 3 as files people can
open; every bad request is refused before any model runs and leaves the world's files as they were; a world saved
before requests had kinds loads unchanged and goes on."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

import tests.toy_blocks  # noqa: F401  (registers toy/pan_clip, toy/tone)
import worldgen as wg
from worldgen.config import load_config_file
from worldgen.errors import ConfigError
from worldgen.limits import LimitExceeded, Limits
from worldgen.state import WorldState
from worldgen.world import World

ROOT = Path(__file__).parents[2]
DEFAULT = ROOT / "configs" / "worlds" / "default.yaml"
V1_WORLD = ROOT / "tests" / "data" / "worlds" / "v1_keeps_its_look"  # written by worldgen before this change
SIDE = 32


def moving_config() -> dict:
    """The default world whose Creator also has a clip pipeline (a pan over a picture) and a sound pipeline."""
    config = load_config_file(DEFAULT)
    config["generation_defaults"] = {
        "width": SIDE,
        "height": SIDE,
        "steps": 2,
        "guidance": 7.5,
        "frames": 6,
        "fps": 12,
        "duration": 0.5,
    }
    config["stages"]["creator"] = {
        "pipelines": {
            "text_to_image": {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}},
            "pan": {
                "name": "pan",
                "nodes": {"clip": {"type": "toy/pan_clip"}},
                "inputs": {"image": "clip.image", "frames": "clip.frames", "prompt": "clip.prompt"},
                "outputs": {"video": "clip.video"},
            },
            "tone": {
                "name": "tone",
                "nodes": {"tone": {"type": "toy/tone"}},
                "inputs": {"duration": "tone.duration", "prompt": "tone.prompt"},
                "outputs": {"audio": "tone.audio", "sample_rate": "tone.sample_rate"},
            },
        }
    }
    return config


def requests(**video) -> list[dict]:
    clip = {
        "kind": "video",
        "pipeline": "pan",
        "prompt": "the harbor, panning",
        "width": SIDE,
        "height": SIDE,
    }
    return [
        {"prompt": "a harbor at dusk", "width": SIDE, "height": SIDE, "steps": 2},
        clip | {"frames": 6, "fps": 12, "source": {"request": 0}} | video,
        {"kind": "audio", "pipeline": "tone", "prompt": "waves", "duration": 0.5},
    ]


def files_of(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> World:
    """Two steps of the moving world: the offline Architect asks for a picture, a clip from it and a sound."""
    world = World.from_config(moving_config(), directory=tmp_path_factory.mktemp("moving"))
    world.run(2)
    return world


def test_the_offline_architect_asks_each_pipeline_for_what_it_makes(moved):
    state, _ = moved.storage.load_episode(1)
    kinds = [(r.kind, r.pipeline) for r in state.generation]
    assert kinds == [("image", "text_to_image"), ("video", "pan"), ("audio", "tone")]
    assert state.generation[1].source.request == 0 and state.generation[1].frames == 6


def test_block_3_holds_a_picture_a_clip_from_it_and_a_sound(moved):
    state, _ = moved.storage.load_episode(1)
    image, video, audio = state.artifacts
    assert (image.kind, image.mime, image.width, image.height) == ("image", "image/png", SIDE, SIDE)
    assert (video.kind, video.mime, video.frames, video.fps) == ("video", "video/mp4", 6, 12.0)
    assert (video.width, video.height, video.duration, video.request) == (SIDE, SIDE, 0.5, 1)
    assert video.source.request == 0 and video.preview.endswith("001.preview.webp")
    assert (audio.kind, audio.mime, audio.sample_rate, audio.channels) == ("audio", "audio/wav", 8000, 2)
    assert audio.duration == pytest.approx(0.5)
    folder = moved.storage.episode_dir(1)
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".json") == [
        "000.png",
        "001.mp4",
        "001.preview.webp",
        "002.wav",
        "episode.md",
    ]
    assert not any(moved.storage.artifacts_dir.glob(f"{state.id}/*"))  # the in-flight copies are gone

    # the MP4 decodes to the clip asked for: 6 frames of 32x32, each the picture panned 2 px further
    with av.open(str(folder / "001.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (SIDE, SIDE, 3)
    from PIL import Image

    picture = np.asarray(Image.open(folder / "000.png").convert("RGB"), dtype=np.float32)
    for f, frame in enumerate(
        frames
    ):  # H.264 is lossy (and a tiny model's picture is noise): nearest its own pan
        error = [np.abs(frame - np.roll(picture, 2 * shift, axis=1)).mean() for shift in range(6)]
        assert int(np.argmin(error)) == f and error[f] < 30, error

    samples, rate = soundfile.read(folder / "002.wav", always_2d=True)
    assert rate == 8000 and samples.shape == (4000, 2)
    spectrum = np.abs(np.fft.rfft(samples[:, 0]))
    assert np.argmax(spectrum) * rate / len(samples) == pytest.approx(440, abs=4)


def test_the_philosopher_is_given_every_artifact(moved):
    state, _ = moved.storage.load_episode(1)
    description = state.description or ""
    lines = [line.split(":")[0] for line in description.splitlines()]
    assert lines == ["Image 1", "Video 2", "Audio 3"], description  # vlm/image_stats measured all three
    assert "6 frames, 12 fps" in description and "dBFS" in description


def test_a_bad_request_is_refused_before_any_model_runs_and_nothing_changes(moved, tmp_path):
    world = World.load(
        shutil.copytree(moved.directory, tmp_path / "copy"), limits=Limits(max_request_bytes=5 * 10**6)
    )
    before = files_of(world.directory)
    big = {"kind": "video", "pipeline": "pan", "prompt": "x", "width": 512, "height": 512, "frames": 40}
    cases = [
        (
            requests(frames=0),
            ConfigError,
            r"generation\.1\.frames: Input should be greater than or equal to 1",
        ),
        (requests(frames=-3), ConfigError, r"generation\.1\.frames"),
        (requests(fps=1000), ConfigError, r"generation\.1\.fps: Input should be less than or equal to 120"),
        (
            requests(frames=80),
            ConfigError,
            r"generation\.1\.frames: pipeline 'pan' cannot run request 1: .*frames 80: this model makes 1 to 64",
        ),
        (
            requests(source={"episode": 7}),
            ConfigError,
            r"generation\.1\.source\.episode: episode 7 does not exist \(the world has episodes 1 to 1\)",
        ),
        (
            requests(source={"episode": 1, "image": 3}),
            ConfigError,
            r"generation\.1\.source\.image: episode 1 has 1",
        ),
        (requests(source={"request": 0, "image": 2}), ConfigError, r"source\.image 2, but request 0 makes 1"),
        (requests(source={"request": 2}), ConfigError, r"source\.request 2 is not an earlier request"),
        (
            requests(source=None),
            ConfigError,
            r"generation\.1\.source: pipeline 'pan' makes a clip from an image",
        ),
        (requests(pipeline="text_to_image"), ConfigError, r"'text_to_image' makes images, not videos.*: pan"),
        (
            [*requests()[:2], {"kind": "audio", "pipeline": "tone", "prompt": "waves", "duration": 9}],
            ConfigError,
            r"generation\.2\.duration: pipeline .tone. cannot run request 2: .*duration 9(\.0)? s is over this model's maximum of 4 s",
        ),
        (
            [big],
            LimitExceeded,
            r"generation\.0: 1 clip\(s\) of 40 frames at 512x512 need 120 MiB as float32, over 5 MiB",
        ),
    ]
    for blocks, error, message in cases:
        with pytest.raises(error, match=message):
            world.step(state={1: "The fog lifts.", 2: blocks})
    assert files_of(world.directory) == before


def test_a_clip_from_an_earlier_episodes_picture(tmp_path):
    """An Architect that asks, once the world has an episode, for a clip of the previous episode's picture."""
    config = moving_config()
    clip = {"kind": "video", "pipeline": "pan", "prompt": "again", "width": SIDE, "height": SIDE, "frames": 3}
    template = (
        '{% if content.history %}{"requests": ['
        + json.dumps(clip)[:-1]
        + ', "source": {"episode": "previous"}}]}'
        '{% else %}{"prompt": "the harbor", "width": 32, "height": 32, "steps": 2}{% endif %}'
    )
    config["stages"]["architect"]["nodes"]["llm"]["config"]["template"] = template
    world = World.from_config(config, directory=tmp_path / "world")
    first, second = world.run(2)
    assert [a.kind for a in first.state.artifacts] == ["image"]
    (made,) = second.state.artifacts  # step 2 saved episode 1, then drew a clip from its picture
    assert second.episode == 1 and made.kind == "video" and made.frames == 3
    assert made.source.episode == 1 and made.source.request is None and made.source.image == 0


def test_a_world_saved_before_requests_had_kinds_loads_unchanged_and_goes_on(tmp_path):
    directory = shutil.copytree(V1_WORLD, tmp_path / "v1")
    (directory / "checkpoints").mkdir(exist_ok=True)  # git keeps no empty folder
    before = files_of(directory)
    world = World.load(directory)
    assert world.storage.check() == []
    states = [world.storage.load_episode(n)[0] for n in world.storage.episodes()]
    for state in states:  # block 2 read as one image request, block 3 as typed images
        (request,) = state.generation
        assert request.kind == "image" and request.pipeline in ("text_to_image", "keep_the_look")
        assert [(a.kind, a.mime) for a in state.artifacts] == [("image", "image/png")]
    assert [r.control for r in states[1].generation[0].reference] == ["controlnet", "ip_adapter"]
    assert world.state.filled() == {1, 2, 3}  # the state in flight, from the resume journal
    assert [h["episode"] for h in world.history()] == [1, 2]
    assert files_of(directory) == before  # reading changed nothing

    report = world.step()  # and it goes on: the in-flight state becomes episode 3
    assert report.episode == 3
    saved = (directory / "episodes" / "000003" / "state.json").read_text()
    assert '"schema_version": 2' in saved and '"kind": "image"' in saved
    for name, digest in before.items():  # what was saved before is untouched
        if name.startswith("episodes/00000") or name == "world.yaml":
            assert files_of(directory)[name] == digest, name


def test_a_state_from_a_newer_worldgen_is_refused_clearly():
    with pytest.raises(ValueError, match="schema_version 3: this worldgen reads states of versions 1 to 2"):
        WorldState.model_validate({"schema_version": 3})


def test_one_request_given_as_a_mapping_is_a_list_of_one():
    state = wg.WorldState.from_blocks({2: {"prompt": "a lighthouse"}})
    assert [r.kind for r in state.generation] == ["image"]


def test_generation_defaults_over_a_servers_limits_are_refused_before_the_world_is_built():
    with pytest.raises(
        LimitExceeded, match=r"generation_defaults\.frames: frames 6 is over 5 \(limit 'max_video_frames'\)"
    ):
        World.check(moving_config(), limits=Limits(max_video_frames=5))
    with pytest.raises(LimitExceeded, match=r"generation_defaults\.duration: duration 0\.5 is over 0\.25"):
        World.check(moving_config(), limits=Limits(max_audio_seconds=0.25))


def test_a_world_that_sounds_with_stable_audio(tmp_path):
    """A Creator with Stable Audio Open (the tiny preset makes 16 Hz audio: the request asks for 8 kHz)."""
    config = moving_config()
    config["stages"]["creator"] = {
        "template": "text_to_audio",
        "params": {"preset": "stable-audio-tiny", "steps": 2},
    }
    sound = {"kind": "audio", "pipeline": "text_to_audio", "prompt": "gulls", "duration": 1.0, "steps": 2}
    architect = config["stages"]["architect"]["nodes"]["llm"]["config"]
    architect["template"] = json.dumps(sound | {"sample_rate": 8000, "format": "flac"})
    world = World.from_config(config, directory=tmp_path / "sounds")
    (made,) = world.step().state.artifacts
    assert (made.kind, made.mime, made.sample_rate, made.channels) == ("audio", "audio/flac", 8000, 2)
    assert made.duration == pytest.approx(1.0)
    samples, rate = soundfile.read(world.directory / made.path, always_2d=True)
    assert rate == 8000 and samples.shape == (8000, 2) and np.abs(samples).max() > 0

    architect["template"] = json.dumps(sound)  # the model's own 16 Hz: no file holds it
    world = World.from_config(config, directory=tmp_path / "too_slow")
    with pytest.raises(
        ConfigError, match=r"generation\.0\.sample_rate: pipeline 'text_to_audio' makes 16 Hz audio"
    ):
        world.step()


def test_each_creator_pipeline_must_make_an_image_a_video_or_a_sound():
    config = moving_config()
    assert World.check(config).validate() == []  # image, video and audio pipelines
    config["stages"]["creator"]["pipelines"]["words"] = {
        "name": "words",
        "nodes": {"say": {"type": "toy/text"}},
        "inputs": {"prompt": "say.text"},
        "outputs": {"text": "say.text"},
    }
    (problem,) = World.check(config).validate()
    assert problem.where == "stages.creator.pipelines.words"
    assert problem.message.startswith("must expose an output 'image' or 'video' or 'audio'")
