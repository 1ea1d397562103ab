"""World templates (worldgen/templates/worlds.py): the offline worlds, built with your parameters."""

from __future__ import annotations

import av

from worldgen.world import World


def test_the_moving_world_draws_a_picture_then_a_clip_from_it(tmp_path):
    world = World.from_template(
        "moving_world", title="The Drowned Pier", size=32, frames=5, fps=10, steps=2, directory=tmp_path / "w"
    )
    assert world.content.title == "The Drowned Pier"
    reports = world.run(2)
    assert reports[-1].episode == 1
    state, _ = world.storage.load_episode(1)
    assert [(r.kind, r.pipeline) for r in state.generation] == [
        ("image", "text_to_image"),
        ("video", "image_to_video"),
    ]
    picture, clip = state.artifacts
    assert (picture.kind, picture.width) == ("image", 32)
    assert (clip.kind, clip.frames, clip.fps, clip.width, clip.source.request) == ("video", 5, 10.0, 32, 0)
    with av.open(str(world.directory / clip.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    assert "Video 2: 5 frames, 10 fps" in state.description  # the Philosopher measured the clip
