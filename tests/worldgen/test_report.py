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
