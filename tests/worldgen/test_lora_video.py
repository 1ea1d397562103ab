"""LoRA worlds that move: a world that draws a picture and then a Wan image-to-video clip from it trains the Wan
transformer's adapters on its own clips (worldgen/lora.py, worldgen/training/), and the saved adapters make a
custom world whose clips differ from the base's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worldgen.config import load_config_file
from worldgen.errors import ConfigError
from worldgen.lora import LoraSettings, attach_adapters, save_adapters, trainable_parameters
from worldgen.media import probe, read_frames
from worldgen.state import WorldState
from worldgen.training import ImageExample, VideoExample, batch_loss, build_examples, read_episodes
from worldgen.world import World

MOVING = Path(__file__).parents[2] / "configs" / "worlds" / "moving.yaml"
WAN = "creator.image_to_video.wan"

# training attaches adapters to pooled models: they leave the pool with this module
pytestmark = pytest.mark.usefixtures("own_model_pool")


def small_moving_config() -> dict:
    """configs/worlds/moving.yaml at 32x32, 5 frames, 2 denoising steps (the tiny presets)."""
    config = load_config_file(MOVING)
    config["generation_defaults"] = {
        "width": 32,
        "height": 32,
        "steps": 2,
        "guidance": 5.0,
        "frames": 5,
        "fps": 8,
    }
    pipelines = config["stages"]["creator"]["pipelines"]
    pipelines["text_to_image"]["params"] = {"preset": "tiny", "steps": 2}
    pipelines["image_to_video"]["params"] = {"preset": "wan-i2v-tiny", "steps": 2}
    return config


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> World:
    """Two steps of the small moving world: episode 1 holds a picture and a 5-frame clip made from it."""
    world = World.from_config(small_moving_config(), tmp_path_factory.mktemp("moving") / "harbor")
    world.run(2)
    return world


def clip_frames(world: World, state: WorldState) -> np.ndarray:
    (clip,) = [a for a in state.artifacts if a.kind == "video"]
    return np.stack([np.asarray(f) for f in read_frames(world.storage.artifact_path(clip))]).astype(int)


def test_a_clip_is_an_example_with_its_request_and_the_image_it_started_from(moved):
    (episode,) = read_episodes(moved.storage.root)
    (clip,) = episode.videos
    assert clip.shape == (1, 5, 3, 32, 32) and clip.min() >= 0 and clip.max() <= 1
    assert probe(episode.video_paths[0]).frames == 5
    picture, video = build_examples(moved, [episode], ["creator"])
    assert isinstance(picture, ImageExample) and isinstance(video, VideoExample)
    request = episode.state.generation[1]
    assert (video.pipeline, video.prompt, video.negative_prompt) == (
        "image_to_video",
        request.prompt,
        request.negative_prompt,
    )
    assert (video.width, video.height, video.frames, video.guidance) == (32, 32, 5, request.guidance)
    assert torch.equal(video.video, clip)
    # the clip's source is request 0's picture: the i2v condition is built from it, not from the clip
    assert episode.state.artifacts[1].source.request == 0
    assert torch.equal(video.image, episode.images[0])


def test_training_steps_move_only_lora_weights_and_the_adapters_load_back(moved, tmp_path):
    examples = [
        x for x in build_examples(moved, read_episodes(moved.storage.root)) if isinstance(x, VideoExample)
    ]
    settings = LoraSettings(rank=4, alpha=8)
    targets = attach_adapters(moved, settings)
    wan = next(t for t in targets if t.key == WAN)
    assert [p for p, _ in wan.blocks] == [WAN]
    before = {(t.key, n): p.detach().clone() for t in targets for n, p in t.model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(targets), lr=1e-2)
    losses = []
    for step in range(2):
        loss = batch_loss(moved, examples, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)), losses
    moved_names = {
        (t.key, n)
        for t in targets
        for n, p in t.model.named_parameters()
        if not torch.equal(p, before[t.key, n])
    }
    wan_lora = {n for k, n in moved_names if k == WAN}
    assert wan_lora and all("lora_" in n for _, n in moved_names), sorted(moved_names)[:5]
    assert any(".to_q.lora_B." in n for n in wan_lora) and any(
        ".ffn.net.0.proj.lora_B." in n for n in wan_lora
    )

    folder = save_adapters(targets, tmp_path / "adapters", settings)
    assert (folder / WAN / "adapter_model.safetensors").is_file()
    custom_dir = tmp_path / "custom"
    custom_dir.mkdir()
    (custom_dir / "world.yaml").write_text(
        f"schema_version: 1\nkind: world\nbase: {moved.storage.root}\nadapters: {folder}\nname: moving-lora\n"
    )
    custom = World.load(custom_dir)
    block = dict(custom.named_blocks())[WAN]
    assert block.config.adapter is not None and block.config.adapter.path == str((folder / WAN).resolve())
    (step,) = custom.run(1)  # its first step makes what the base's first episode holds, with the adapters
    assert block.config.adapter.name in block.model.__dict__["_worldgen_adapters"]  # loaded when it ran
    base, _ = moved.storage.load_episode(1)
    assert not np.array_equal(
        clip_frames(custom, step.state), clip_frames(moved, base)
    )  # same seed, other weights


def test_a_missing_or_unreadable_clip_names_the_file_and_the_field(moved, tmp_path):
    episode = tmp_path / "episodes" / "000001"
    shutil.copytree(moved.storage.episode_dir(1), episode)
    clip = episode / "001.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    with pytest.raises(ConfigError, match="cannot read video") as err:
        read_episodes(tmp_path)
    assert (err.value.file, err.value.path) == (str(clip), "artifacts.1.path")
    clip.unlink()
    with pytest.raises(ConfigError, match="video 'episodes/000001/001.mp4' not found") as err:
        read_episodes(tmp_path)
    assert (err.value.file, err.value.path) == (str(episode / "state.json"), "artifacts.1.path")


def test_a_clip_made_from_an_earlier_episodes_picture_takes_that_picture(moved, tmp_path):
    """Episode 2 (written by hand) holds only a clip whose source is episode 1's picture: the example's image is
    that picture, whether episode 1 is among the episodes given or only beside episode 2 on disk."""
    first = tmp_path / "episodes" / "000001"
    shutil.copytree(moved.storage.episode_dir(1), first)
    state = json.loads((first / "state.json").read_text())
    clip = state["generation"][1]
    clip["source"] = {"episode": 1}
    video = {**state["artifacts"][1], "path": "episodes/000002/000.mp4", "request": 0}
    second = tmp_path / "episodes" / "000002"
    second.mkdir()
    shutil.copy(first / "001.mp4", second / "000.mp4")

    def write(source: dict) -> None:
        blocks = {**state, "id": "by-hand", "generation": [clip], "artifacts": [{**video, "source": source}]}
        (second / "state.json").write_text(json.dumps(blocks))

    write({"episode": 1, "image": 0})
    episodes = read_episodes(tmp_path)
    picture = episodes[0].images[0]
    (example,) = [x for x in build_examples(moved, episodes, ["creator"]) if x.episode == 2]
    assert isinstance(example, VideoExample) and torch.equal(example.image, picture)
    (alone,) = build_examples(moved, read_episodes(tmp_path, numbers=[2]), ["creator"])
    assert torch.equal(alone.image, picture)  # read from the episode folder beside it
    write({"episode": 7, "image": 0})
    with pytest.raises(ConfigError, match="episode 7, which is not here") as err:
        build_examples(moved, read_episodes(tmp_path, numbers=[2]), ["creator"])
    assert (err.value.file, err.value.path) == (str(second / "state.json"), "artifacts.0.source.episode")
