"""The readable report of a world: every episode as Markdown (the world's report and each episode's own page) and
as one self-contained HTML page, images inline through relative links, videos and sounds as players (`<video>`
with the clip's animated preview as its poster, `<audio>`) that load only their metadata until played.

Rendering only: the storage (worldgen/storage.py) decides where the files go, gives each artifact its link and
writes the text this module returns (atomically). Nothing here reads or writes a file.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import yaml

from worldgen.state import ArtifactRef, EpisodeMeta, ReferenceUse, WorldContent, WorldState

__all__ = ["Link", "episode_markdown", "report_html", "report_markdown"]

Link = Callable[[ArtifactRef], str | None]
"""An artifact's relative link from the page being rendered (None: the artifact is missing or unsafe)."""

Episodes = Sequence[tuple[int, WorldState, EpisodeMeta]]

_BLOCK_TITLES = {
    1: "What was supposed to happen",
    2: "Generation",
    3: "Artifacts",
    4: "Description",
    5: "What really happened",
}
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: the Python emitter is slow


def report_markdown(content: WorldContent, episodes: Episodes, *, link: Link) -> str:
    """The whole world as Markdown: title, story, glossary, then every episode (oldest first)."""
    parts = [f"# {content.title}\n"]
    if content.story.strip():
        parts.append(f"## Story so far\n\n{content.story.strip()}\n")
    if content.glossary:
        parts.append("## Glossary\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in content.glossary.items()))
    if not episodes:
        parts.append("_No episodes yet._\n")
    for number, state, meta in episodes:
        parts.append(episode_markdown(number, state, meta, link=link, level=2))
    return "\n".join(parts)


def report_html(content: WorldContent, episodes: Episodes, *, link: Link) -> str:
    """The whole world as one HTML page (inline CSS, light and dark), episodes linked from the header."""
    e = html.escape
    body = [f"<header><h1>{e(content.title)}</h1>"]
    if episodes:
        links = " ".join(f'<a href="#episode-{n}">{n}</a>' for n, _, _ in episodes)
        body.append(f'<nav><span class="label">Episodes</span> {links}</nav>')
    body.append("</header>")
    if content.story.strip():
        body.append(f'<section class="story"><h2>Story so far</h2>{_paragraphs(content.story)}</section>')
    if content.glossary:
        items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in content.glossary.items())
        body.append(f'<section class="glossary"><h2>Glossary</h2><dl>{items}</dl></section>')
    if not episodes:
        body.append('<p class="empty">No episodes yet.</p>')
    for number, state, meta in episodes:
        body.append(_episode_html(number, state, meta, link))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(content.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _episode_html(number: int, state: WorldState, meta: EpisodeMeta, link: Link) -> str:
    e = html.escape
    facts = [f"step {e(_step(meta))}", e(_when(meta))]
    out = [f'<article class="episode" id="episode-{number}">', f"<h2>Episode {number}</h2>"]
    out.append(f'<p class="meta">{" · ".join(f for f in facts if f)}</p>')
    if meta.action:
        out.append(f'<p class="action"><span class="label">Action</span> {e(meta.action)}</p>')
    out.append(_block_html(1, _paragraphs(state.happening)))
    if state.generation:
        requests = _generation(state)
        tables = "".join(
            '<table class="generation">'
            + (f"<caption>request {i} · {e(request['kind'])}</caption>" if len(requests) > 1 else "")
            + "".join(f"<tr><th>{e(k)}</th><td>{e(_scalar(v))}</td></tr>" for k, v in request.items())
            + "</table>"
            for i, request in enumerate(requests)
        )
        used = "".join(f"<li>{e(_reference(use))}</li>" for use in meta.references)
        used = f'<p class="label">References</p><ul class="references">{used}</ul>' if used else ""
        out.append(_block_html(2, f"{tables}{used}"))
    figures = _shown_artifacts(
        state,
        link,
        missing=lambda ref: f'<p class="missing">missing artifact: {e(ref.path)}</p>',
        image=lambda i, ref, target, _: _figure_html(number, i, ref, target),
        video=lambda i, ref, target, preview: _video_html(number, i, ref, target, preview),
        audio=lambda i, ref, target, _: _audio_html(number, i, ref, target),
    )
    out.append(_block_html(3, f'<div class="images">{"".join(figures)}</div>'))
    out.append(_block_html(4, _paragraphs(state.description)))
    out.append(_block_html(5, _paragraphs(state.outcome)))
    out.append("</article>")
    return "\n".join(out)


def episode_markdown(
    number: int,
    state: WorldState,
    meta: EpisodeMeta,
    *,
    link: Link,
    level: int = 1,
) -> str:
    """One episode as Markdown; `link(ref)` gives each artifact's relative link (None: missing)."""
    h = "#" * level
    facts = [f"step {_step(meta)}", _when(meta)]
    lines = [f"{h} Episode {number}", "", f"_{' · '.join(f for f in facts if f)}_", ""]
    if meta.action:
        lines += [f"**Action:** {meta.action}", ""]

    def block(n: int, body: str) -> None:
        lines.extend([f"{h}# {n}. {_BLOCK_TITLES[n]}", "", body.rstrip(), ""])

    block(1, (state.happening or "").strip() or "—")
    if state.generation:
        requests = _generation(state)
        dumped = yaml.dump(
            requests[0] if len(requests) == 1 else requests,
            Dumper=_DUMPER,
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )
        fence = _fence(dumped)
        used = "".join(f"\n- **Reference:** {_reference(use)}" for use in meta.references)
        block(2, f"{fence}yaml\n{dumped}{fence}{chr(10) if used else ''}{used}")
    shown = _shown_artifacts(
        state,
        link,
        missing=lambda ref: f"_missing artifact: {ref.path}_",
        image=lambda i, ref, target, _: f"![episode {number}, image {i}]({target})",
        # a video: its animated preview, linked to the clip (Markdown has no player), or a plain link
        video=lambda i, ref, target, preview: (
            (f"[![episode {number}, video {i}]({preview})]({target})" if preview else "")
            + f"{' ' if preview else ''}[video {i}{_measures(ref)}]({target})"
        ),
        audio=lambda i, ref, target, _: f"[audio {i}{_measures(ref)}]({target})",
    )
    block(3, "\n".join(shown) or "—")
    block(4, (state.description or "").strip() or "—")
    block(5, (state.outcome or "").strip() or "—")
    return "\n".join(lines)


Shown = Callable[[int, ArtifactRef, str, str | None], str]
"""One artifact as a format shows it: (number from 1, ref, its link, its preview's link or None) -> text."""


def _shown_artifacts(
    state: WorldState,
    link: Link,
    *,
    missing: Callable[[ArtifactRef], str],
    image: Shown,
    video: Shown,
    audio: Shown,
) -> list[str]:
    """Block 3, one entry per artifact (numbered from 1): `missing(ref)` for one without a link, else the
    renderer of its kind. The two formats differ only in these."""
    shown = []
    for i, ref in enumerate(state.artifacts or [], 1):
        target = link(ref)
        if target is None:
            shown.append(missing(ref))
            continue
        preview = link(ArtifactRef(path=ref.preview, kind="image")) if ref.preview else None
        render = {"video": video, "audio": audio}.get(ref.kind, image)
        shown.append(render(i, ref, target, preview))
    return shown


def _measures(ref: ArtifactRef) -> str:
    """What a clip or sound holds, for its caption: ', 2 s, 16 frames at 8 fps' ('' when nothing is known)."""
    facts = [f"{ref.duration:g} s" if ref.duration else ""]
    if ref.kind == "video" and ref.frames:
        facts.append(f"{ref.frames} frames" + (f" at {ref.fps:g} fps" if ref.fps else ""))
    if ref.kind == "audio" and ref.sample_rate:
        facts.append(f"{ref.sample_rate} Hz" + {1: " mono", 2: " stereo"}.get(ref.channels or 0, ""))
    text = ", ".join(f for f in facts if f)
    return f", {text}" if text else ""


def _figure_html(number: int, i: int, ref: ArtifactRef, target: str) -> str:
    e = html.escape
    small = ' class="small"' if (ref.width or 999) < 128 else ""
    size = f' width="{ref.width}" height="{ref.height}"' if ref.width and ref.height else ""
    return (
        f'<figure><a href="{e(target)}"><img src="{e(target)}" alt="episode {number}, image {i}"'
        f'{size}{small} loading="lazy"></a><figcaption>{i}</figcaption></figure>'
    )


def _video_html(number: int, i: int, ref: ArtifactRef, target: str, preview: str | None) -> str:
    """A player that fetches only the clip's header until played; the animated preview is its poster."""
    e = html.escape
    poster = f' poster="{e(preview)}"' if preview else ""
    size = f' width="{ref.width}" height="{ref.height}"' if ref.width and ref.height else ""
    return (
        f'<figure class="video"><video controls preload="metadata"{poster}{size} '
        f'aria-label="episode {number}, video {i}"><source src="{e(target)}" type="{e(ref.mime or "")}">'
        f'<a href="{e(target)}">video {i}</a></video>'
        f'<figcaption><a href="{e(target)}">{i}</a>{e(_measures(ref))}</figcaption></figure>'
    )


def _audio_html(number: int, i: int, ref: ArtifactRef, target: str) -> str:
    e = html.escape
    return (
        f'<figure class="audio"><audio controls preload="metadata" aria-label="episode {number}, audio {i}">'
        f'<source src="{e(target)}" type="{e(ref.mime or "")}"><a href="{e(target)}">audio {i}</a></audio>'
        f'<figcaption><a href="{e(target)}">{i}</a>{e(_measures(ref))}</figcaption></figure>'
    )


def _generation(state: WorldState) -> list[dict[str, Any]]:
    """Block 2's requests as shown: fields left at nothing (an empty `reference`, no `source`) are left out."""
    return [
        {k: v for k, v in request.model_dump(mode="json", exclude_none=True).items() if v != []}
        for request in state.generation or []
    ]


def _reference(use: ReferenceUse) -> str:
    """What the Creator fed for one of block 2's references, in a line."""
    if use.episode is None:
        return f"{use.control}: {use.note or 'nothing fed'}"
    settings = ", ".join(f"{k} {v}" for k, v in use.inputs.items() if v != use.artifact)
    return f"{use.control} from episode {use.episode}, image {use.image}" + (
        f" ({settings})" if settings else ""
    )


def _step(meta: EpisodeMeta) -> str:
    return "?" if meta.step is None else str(meta.step)


def _when(meta: EpisodeMeta) -> str:
    """The episode's save time as 'YYYY-MM-DD HH:MM UTC' ('' when unknown; as recorded when not ISO 8601)."""
    if not meta.time:
        return ""
    try:
        return datetime.fromisoformat(meta.time).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return meta.time


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):  # a request's `source`, `reference`: as JSON, what the request holds
        return json.dumps(value, ensure_ascii=False)
    return "—" if value is None or value == "" else str(value)


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _paragraphs(text: str | None) -> str:
    """Plain text as escaped HTML paragraphs (blank line: new paragraph; newline: line break)."""
    if not text or not text.strip():
        return '<p class="empty">—</p>'
    chunks = [c.strip() for c in re.split(r"\n\s*\n", text.strip()) if c.strip()]
    return "".join(f"<p>{html.escape(c).replace(chr(10), '<br>')}</p>" for c in chunks)


def _block_html(number: int, body: str) -> str:
    return (
        f'<section class="block block-{number}"><h3><span class="num">{number}</span>'
        f"{html.escape(_BLOCK_TITLES[number])}</h3>{body}</section>"
    )


_CSS = """
:root { color-scheme: light dark; --fg: #22211f; --muted: #6f6b64; --bg: #f6f4ef; --card: #ffffff;
  --line: #e3dfd6; --accent: #8a5a2b; --chip: #efe7dc; }
@media (prefers-color-scheme: dark) { :root { --fg: #e9e6e1; --muted: #a29d95; --bg: #1b1a18; --card: #252320;
  --line: #3a3733; --accent: #d9a46c; --chip: #3a3128; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 17px/1.6 Charter, "Iowan Old Style", Georgia, Cambria, serif; }
main { max-width: 50rem; margin: 0 auto; padding: 2.5rem 1.25rem 4rem; }
h1, h2, h3, nav, .meta, .label, table, figcaption { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
h1 { font-size: 2.1rem; line-height: 1.2; margin: 0 0 .75rem; }
h2 { font-size: 1.35rem; margin: 0 0 .25rem; }
nav { font-size: .9rem; color: var(--muted); margin-bottom: 1.5rem; line-height: 2; }
nav a { display: inline-block; min-width: 2rem; text-align: center; padding: 0 .35rem; margin-right: .2rem;
  border-radius: 4px; background: var(--chip); color: var(--fg); text-decoration: none; }
.label { font-size: .75rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin-right: .5rem; }
.story, .glossary { margin: 0 0 2rem; }
.story h2, .glossary h2 { font-size: 1.1rem; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
dt { font-weight: bold; } dd { margin: 0 0 .5rem 1.25rem; }
article.episode { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 1.5rem 1.75rem 1rem; margin: 2rem 0; box-shadow: 0 1px 3px rgba(0,0,0,.05); }
.meta { color: var(--muted); font-size: .85rem; margin: 0 0 1rem; }
.action { border-left: 3px solid var(--accent); padding: .25rem 0 .25rem .75rem; margin: 0 0 1rem; }
section.block { margin: 1.25rem 0; }
h3 { font-size: .8rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 .4rem;
  display: flex; align-items: center; gap: .5rem; }
h3 .num { display: inline-flex; align-items: center; justify-content: center; width: 1.4rem; height: 1.4rem;
  border-radius: 50%; background: var(--accent); color: var(--card); font-size: .75rem; letter-spacing: 0; }
p { margin: 0 0 .75rem; }
.empty, .missing { color: var(--muted); font-style: italic; }
table.generation { border-collapse: collapse; font-size: .85rem; width: 100%; margin-bottom: .6rem; }
table.generation caption { text-align: left; font-weight: 600; padding: .2rem 0; }
table.generation th { text-align: left; font-weight: 600; color: var(--muted); width: 9rem; vertical-align: top; }
table.generation th, table.generation td { padding: .2rem .5rem .2rem 0; border-bottom: 1px solid var(--line); }
.images { display: grid; grid-template-columns: repeat(auto-fill, minmax(14rem, 1fr)); gap: .75rem; }
figure { margin: 0; }
figure img { display: block; width: 100%; height: auto; border-radius: 8px; border: 1px solid var(--line); }
figure img.small { image-rendering: pixelated; }
figure video { display: block; width: 100%; height: auto; border-radius: 8px; border: 1px solid var(--line);
  background: #000; }
figure audio { display: block; width: 100%; }
figcaption { font-size: .75rem; color: var(--muted); text-align: center; margin-top: .2rem; }
"""
