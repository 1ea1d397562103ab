"""The world that moves (configs/worlds/moving.yaml, small): each episode a picture, then a Wan image-to-video
clip from it. On the local executor its block 3 ends with a PNG and an MP4 that decodes to the frames asked for,
and its report plays the clip; on Ray (executor: ray) it makes the very same episode, files byte for byte, with
each clip's denoising loop fused on the Wan transformer's model host (one host call per clip)."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import av
import pytest

from worldgen.templates import build_template
from worldgen.world import World

SIDE, FRAMES, STEPS = (
    32,
    5,
    2,
)  # Wan makes 4k+1 frames; 2 denoising steps tell a fused loop from an unfused one


def small_moving_config(executor: str = "local") -> dict:
    """configs/worlds/moving.yaml (the `moving_world` template) at 32x32, 5 frames, 2 denoising steps."""
    return build_template("moving_world", size=SIDE, frames=FRAMES, steps=STEPS, executor=executor)


@pytest.fixture(scope="module")
def local_world(tmp_path_factory) -> World:
    """Two steps of the small moving world on the local executor: step 2 saves episode 1."""
    world = World.from_config(small_moving_config(), directory=tmp_path_factory.mktemp("moving") / "local")
    world.run(2)
    return world


class _Players(HTMLParser):
    """Each <video> of a page with the <source>s inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.videos: list[list[dict[str, str | None]]] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "video":
            self.videos.append([])
            self._inside = True
        elif tag == "source" and self._inside:
            self.videos[-1].append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "video":
            self._inside = False


def test_block_3_ends_with_the_picture_and_the_clip_the_report_plays(local_world):
    state, meta = local_world.storage.load_episode(1)
    assert [(r.kind, r.pipeline) for r in state.generation] == [
        ("image", "text_to_image"),
        ("video", "image_to_video"),
    ]
    clip = state.generation[1]
    assert (clip.frames, clip.width, clip.height, clip.source.request) == (FRAMES, SIDE, SIDE, 0)

    image, video = state.artifacts
    assert (image.kind, image.path, image.width, image.height) == (
        "image",
        "episodes/000001/000.png",
        SIDE,
        SIDE,
    )
    assert (video.kind, video.mime, video.path) == ("video", "video/mp4", "episodes/000001/001.mp4")
    assert (video.frames, video.width, video.height, video.request) == (FRAMES, SIDE, SIDE, 1)
    assert video.source.request == 0 and video.preview == "episodes/000001/001.preview.webp"

    # the MP4 itself: H.264, the frames asked for at the size asked for
    with av.open(str(local_world.directory / video.path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and {f.shape for f in frames} == {(SIDE, SIDE, 3)}

    # report.html (written by run) plays it: a <video> whose <source> is the MP4, beside the report
    page = _Players()
    page.feed((local_world.directory / "report.html").read_text())
    sources = [s for video_sources in page.videos for s in video_sources]
    assert {"src": video.path, "type": "video/mp4"} in sources, page.videos
    assert (local_world.directory / video.path).is_file()


def test_on_ray_the_same_episode_with_the_video_loop_fused_on_its_host(local_world, clean_hosts, tmp_path):
    from actors.model_host import list_hosts

    world = World.from_config(small_moving_config(executor="ray"), directory=tmp_path / "on-ray")
    started = time.monotonic()
    reports = world.run(2)
    print(f"the small moving world, 2 steps on Ray: {time.monotonic() - started:.1f} s")
    assert [r.episode for r in reports] == [None, 1]

    # the same episode: equal frames (within 1e-5 before encoding) quantise to equal uint8 pictures, which encode
    # to equal PNG and H.264 bytes; so equal files, and the Philosopher's measures of them equal too
    local, remote = (w.storage.load_episode(1)[0].model_dump(exclude={"id"}) for w in (local_world, world))
    assert remote == local
    for ref in local["artifacts"]:
        assert (world.directory / ref["path"]).read_bytes() == (
            local_world.directory / ref["path"]
        ).read_bytes(), ref["path"]

    # each step drew one clip; fused, each clip's whole denoising loop is one call on the transformer's host
    # (unfused it would be one call per denoising step: 2 x STEPS)
    (host,) = [h for h in list_hosts() if h["class"].endswith(":WanTransformer3DModel")]
    assert host["calls"] == 2 and host["loads"] == 1
