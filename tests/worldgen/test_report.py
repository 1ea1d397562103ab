"""worldgen.report: the world's report rendered from models alone (no file is read or written here)."""

from __future__ import annotations

from worldgen.report import episode_markdown, report_html, report_markdown
from worldgen.state import ArtifactRef, EpisodeMeta, GenerationConfig, WorldContent, WorldState

STATE = WorldState(
    id="s1",
    happening="A <ship> arrives",
    generation=GenerationConfig(prompt="a ship", width=64, height=64),
    artifacts=[
        ArtifactRef(path="episodes/000001/000.png", width=64, height=64),
        ArtifactRef(path="gone.png"),
    ],
    description="Sails",
    outcome="It was a kite",
)
META = EpisodeMeta(episode=1, state_id="s1", step=2, action="wave", time="2026-01-02T03:04:05+00:00")


def link(ref: ArtifactRef) -> str | None:
    """The storage's role: a link for the artifacts that exist, None for the others."""
    return None if ref.path == "gone.png" else ref.path


def test_an_episode_as_markdown_shows_its_meta_blocks_and_links():
    md = episode_markdown(1, STATE, META, link=link)
    assert md.startswith("# Episode 1\n\n_step 2 · 2026-01-02 03:04 UTC_")
    assert "**Action:** wave" in md and "A <ship> arrives" in md and "prompt: a ship" in md
    assert "![episode 1, image 1](episodes/000001/000.png)" in md and "_missing artifact: gone.png_" in md
    unknown = episode_markdown(1, STATE, EpisodeMeta(), link=link)  # a hand-written episode: nothing recorded
    assert "_step ?_" in unknown and "Action" not in unknown


def test_the_report_escapes_text_and_links_images():
    content = WorldContent(title="Harbor <Tales>", story="By the sea.", glossary={"tide": "water"})
    page = report_html(content, [(1, STATE, META)], link=link)
    assert "Harbor &lt;Tales&gt;" in page and "A &lt;ship&gt; arrives" in page and "<ship>" not in page
    assert '<img src="episodes/000001/000.png"' in page and "missing artifact: gone.png" in page
    assert '<a href="#episode-1">1</a>' in page and "2026-01-02 03:04 UTC" in page
    md = report_markdown(content, [(1, STATE, META)], link=link)
    assert md.startswith("# Harbor <Tales>") and "## Episode 1" in md and "- **tide**: water" in md
    assert "No episodes yet" in report_html(content, [], link=link) and "No episodes yet" in report_markdown(
        content, [], link=link
    )


# ---- video and audio (issue 14) ----------------------------------------------------------------------------
MOVING = WorldState(
    id="s2",
    happening="A beam sweeps",
    generation=GenerationConfig(prompt="a lighthouse", width=64, height=48),
    artifacts=[
        ArtifactRef(
            path="episodes/000002/000.mp4",
            kind="video",
            width=64,
            height=48,
            frames=16,
            fps=8,
            duration=2,
            preview="episodes/000002/000.preview.webp",
        ),
        ArtifactRef(path="episodes/000002/001.wav", kind="audio", duration=1, sample_rate=16000, channels=2),
        ArtifactRef(path="episodes/000002/002.webm", kind="video"),  # no preview, nothing measured
    ],
    description="Light",
    outcome="Seen",
)


def test_the_report_embeds_players_for_videos_and_sounds():
    page = report_html(WorldContent(), [(2, MOVING, META)], link=link)
    assert (
        '<video controls preload="metadata" poster="episodes/000002/000.preview.webp" width="64" height="48"'
        in page
    )
    assert '<source src="episodes/000002/000.mp4" type="video/mp4">' in page
    assert "2 s, 16 frames at 8 fps" in page
    assert '<audio controls preload="metadata"' in page
    assert '<source src="episodes/000002/001.wav" type="audio/wav">' in page and "16000 Hz stereo" in page
    assert '<source src="episodes/000002/002.webm" type="video/webm">' in page
    assert page.count("<video ") == 2 and page.count("poster=") == 1  # a clip without a preview has no poster


def test_the_markdown_links_videos_through_their_previews_and_sounds():
    md = episode_markdown(2, MOVING, META, link=link)
    assert (
        "[![episode 2, video 1](episodes/000002/000.preview.webp)](episodes/000002/000.mp4) "
        "[video 1, 2 s, 16 frames at 8 fps](episodes/000002/000.mp4)" in md
    )
    assert "[audio 2, 1 s, 16000 Hz stereo](episodes/000002/001.wav)" in md
    assert "\n[video 3](episodes/000002/002.webm)" in md


def test_chromium_loads_the_reports_video_and_sound(tmp_path):
    """A world directory holding a video and a sound episode (made by hand): the report's players find them."""
    import os
    import shutil

    import pytest

    from tests.media_episode import FPS, FRAMES, save_media_episode
    from worldgen.storage import WorldStorage

    chromium = shutil.which("chromium")
    if chromium is None:
        message = "chromium is not installed (`make setup` installs Debian's when run as root with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    store = WorldStorage(tmp_path / "world")
    store.create({"kind": "world", "name": "lighthouse"})
    save_media_episode(store)
    report = store.write_report()
    assert "[video 1" in (store.root / "report.md").read_text()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.goto(report.as_uri())
            ready = "s => document.querySelector(s).readyState >= 1"
            for selector in ("#episode-1 video", "#episode-1 audio"):
                page.wait_for_function(f"() => ({ready})('{selector}')", timeout=15_000)
            video = page.eval_on_selector("#episode-1 video", "v => [v.duration, v.currentSrc, v.videoWidth]")
            assert video[0] == pytest.approx(FRAMES / FPS, abs=0.2) and video[1].endswith("/000.mp4")
            assert video[2] == 64
            audio = page.eval_on_selector("#episode-1 audio", "a => [a.duration, a.currentSrc]")
            assert audio[0] == pytest.approx(1.0, abs=0.05) and audio[1].endswith("/001.wav")
        finally:
            browser.close()
