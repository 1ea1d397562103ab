"""WorldStorage: one world's directory — config, content, progress, artifacts, exactly-once episodes, report."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from worldgen.errors import ConfigError
from worldgen.state import ArtifactRef, EpisodeMeta, GenerationConfig, Progress, WorldContent, WorldState
from worldgen.storage import (
    EpisodeFolder,
    StorageError,
    UnsafePathError,
    WorldDamagedError,
    WorldExistsError,
    WorldStorage,
)

CONFIG = {
    "kind": "world",
    "schema_version": 1,
    "name": "harbor",
    "llm": {"api_key": "${env:OPENAI_API_KEY}", "model": "gpt-x"},
    "stages": ["philosopher", "author"],
}


@pytest.fixture
def store(tmp_path) -> WorldStorage:
    storage = WorldStorage(tmp_path / "world")
    storage.create(CONFIG)
    return storage


def complete_state(store: WorldStorage, state_id: str, *, images: int = 2, text: str = "") -> WorldState:
    """A state with all five blocks, its images saved as in-flight artifacts."""
    batch = torch.rand(images, 3, 16, 24, generator=torch.Generator().manual_seed(len(state_id)))
    refs = store.save_artifacts(state_id, batch)
    return WorldState(
        id=state_id,
        happening=f"The tide goes out {text}",
        generation=GenerationConfig(prompt=f"a harbor at low tide {text}", width=64, height=64, steps=4),
        artifacts=refs,
        description=f"Boats resting on mud {text}",
        outcome=f"The fishermen wait for the water {text}",
    )


# ---------------------------------------------------------------- config, content, progress


def test_create_and_config_round_trip(store):
    assert store.exists()
    assert store.load_config() == CONFIG
    assert "${env:OPENAI_API_KEY}" in store.config_path.read_text()  # secrets stay references
    for folder in ("artifacts", "episodes", "checkpoints"):
        assert (store.root / folder).is_dir()
    store.create(CONFIG)  # the same world again (a resume) is fine
    store.create({**CONFIG, "stages": tuple(CONFIG["stages"])})  # as YAML stores it (a list): the same world
    with pytest.raises(StorageError, match="different world"):
        store.create({**CONFIG, "name": "other"})
    store.create({**CONFIG, "name": "other"}, overwrite=True)
    assert store.load_config()["name"] == "other"


def test_missing_world(tmp_path):
    store = WorldStorage(tmp_path / "nowhere")
    assert not store.exists()
    assert store.load_content() is None and store.load_progress() is None
    assert store.episodes() == [] and store.find_episode("abc") is None
    with pytest.raises(StorageError, match="world.yaml is missing"):
        store.load_config()


def test_worlds_are_found_by_asking_the_storage(tmp_path, store):
    assert WorldStorage.is_world(store.root) and not WorldStorage.is_world(tmp_path / "nowhere")
    (tmp_path / "not-a-world").mkdir()
    (tmp_path / "a-file").write_text("x")
    WorldStorage(tmp_path / "another").create(CONFIG)
    assert WorldStorage.world_dirs(tmp_path) == [tmp_path / "another", store.root]
    assert WorldStorage.world_dirs(tmp_path / "nowhere") == []
    assert store.write_report() == store.report_path and store.report_markdown_path.is_file()


def test_one_same_world_check(tmp_path, store):
    assert store.check_same_world({**CONFIG, "stages": tuple(CONFIG["stages"])})  # as YAML stores it
    assert not WorldStorage(tmp_path / "empty").check_same_world(CONFIG)  # no world there yet
    assert not (tmp_path / "empty").exists()  # asking writes nothing
    with pytest.raises(WorldExistsError, match="already holds a different world") as err:
        store.check_same_world({**CONFIG, "name": "other"})
    assert err.value.file == str(store.config_path)
    assert store.load_config() == CONFIG


def test_episode_meta_is_written_and_read_as_one_model(store):
    store.save_content(WorldContent(title="Harbor"))
    store.save_episode(complete_state(store, "state-a", images=1), step=3, action="wait", ran=["author"])
    files = store.episode_folder(1)
    assert files == EpisodeFolder(store.episode_dir(1))
    assert files.state_path.is_file() and files.page_path.is_file()
    recorded = json.loads(files.meta_path.read_text())
    meta = files.read_meta()
    assert isinstance(meta, EpisodeMeta) and meta == EpisodeMeta.model_validate(recorded)
    given = {"episode": 1, "state_id": "state-a", "step": 3, "action": "wait", "ran": ["author"]}
    assert meta.time and recorded == {**given, "time": meta.time}  # World.history()'s shape
    # as recorded: the keys the file holds, no defaults added
    assert store.load_episode(1)[1] == recorded == meta.recorded()
    assert EpisodeFolder(store.root / "nowhere").read_meta() is None

    files.meta_path.write_text(json.dumps({**recorded, "step": 0}))  # valid JSON, not a valid EpisodeMeta
    (damage,) = store.check()
    assert str(damage).startswith(
        "episode 1: episodes/000001/meta.json is unreadable: not a valid EpisodeMeta"
    )
    with pytest.raises(WorldDamagedError, match="meta.json is unreadable"):
        store.load_episode(1)


def test_content_and_progress_round_trip(store):
    content = WorldContent(title="Harbor", story="Once.", history=["a", "b"], glossary={"tide": "water"})
    store.save_content(content)
    assert store.load_content() == content
    state = WorldState(happening="The tide turns")
    progress = Progress(
        step=3, stage_index=2, action="wait", state=state, ran=["philosopher"], skipped=["author"]
    )
    store.save_progress(progress)
    assert store.load_progress() == progress
    assert not list(store.root.glob(".*.tmp"))  # no temp files left behind


def test_progress_is_a_journal_whose_last_whole_line_is_the_resume_point(store, monkeypatch):
    import worldgen.storage as storage_module

    for step in range(3):
        store.save_progress(Progress(step=step, stage_index=1))
    assert len(store.progress_path.read_text().splitlines()) == 3  # appended, not rewritten
    assert store.load_progress().step == 2
    with open(store.progress_path, "a") as fh:
        fh.write('{"step": 3, "stage_in')  # the process died mid-append
    assert WorldStorage(store.root).load_progress().step == 2
    restarted = WorldStorage(store.root)
    resumed = Progress(step=3)
    restarted.save_progress(resumed)  # a cut line is never appended to: the file is rewritten
    assert store.progress_path.read_text().splitlines() == [resumed.model_dump_json()]
    monkeypatch.setattr(
        storage_module, "_PROGRESS_LOG_LIMIT", 2 * len(Progress(step=4).model_dump_json()) + 2
    )
    for step in range(4, 8):
        restarted.save_progress(Progress(step=step))
        assert len(store.progress_path.read_text().splitlines()) <= 2  # compacted when it grows
    assert restarted.load_progress().step == 7


def test_corrupt_content_names_file_and_field(store):
    store.save_content(WorldContent(title="Harbor"))
    store.content_path.write_text('{"title": "Harbor", "history": "not a list"}')
    with pytest.raises(ConfigError, match=r"content\.json.*history") as err:
        store.load_content()
    assert err.value.file == str(store.content_path)
    store.content_path.write_text('{"title": "Harb')
    with pytest.raises(ConfigError, match=r"content\.json.*malformed JSON"):
        store.load_content()
    store.progress_path.write_text('{"step": -1}\n')
    with pytest.raises(ConfigError, match=r"progress\.jsonl, at line 1: .*step"):
        store.load_progress()


# ---------------------------------------------------------------- artifacts


def test_save_artifacts_writes_pngs(store):
    batch = torch.rand(2, 3, 16, 24)
    refs = store.save_artifacts("s1", batch)
    assert [r.path for r in refs] == ["artifacts/s1/000.png", "artifacts/s1/001.png"]
    for ref in refs:
        assert not Path(ref.path).is_absolute()
        path = store.root / ref.path
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size == (24, 16) == (ref.width, ref.height)
        assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert store.artifact_path(ref) == path.resolve()
    # PIL images are accepted too; a repeated call replaces the state's files
    refs = store.save_artifacts("s1", [Image.new("RGB", (8, 8), "red")])
    assert [r.path for r in refs] == ["artifacts/s1/000.png"]
    assert sorted(p.name for p in (store.root / "artifacts/s1").iterdir()) == ["000.png"]
    store.discard_artifacts("s1")
    assert not (store.root / "artifacts/s1").exists()


@pytest.mark.parametrize("bad", ["../x", "artifacts/../../x", "/etc/passwd", "C:\\x.png", "..\\x", ""])
def test_artifact_path_rejects_escapes(store, bad):
    with pytest.raises(UnsafePathError):
        store.artifact_path(ArtifactRef(path=bad))


def test_artifact_path_rejects_symlink_escape(store, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (store.root / "artifacts").mkdir(exist_ok=True)
    os.symlink(outside, store.root / "artifacts" / "link.png")
    os.symlink(tmp_path, store.root / "artdir")
    with pytest.raises(UnsafePathError, match="outside"):
        store.artifact_path("artifacts/link.png")
    with pytest.raises(UnsafePathError, match="outside"):
        store.artifact_path("artdir/secret.txt")


def test_bad_state_ids_are_refused(store):
    for bad in ("../x", ".tmp-x", "a/b", ""):
        with pytest.raises(UnsafePathError):
            store.save_artifacts(bad, torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------- episodes


def test_save_episode_exactly_once_and_numbers_increase(store):
    first = complete_state(store, "state-a")
    assert store.save_episode(first, step=2, action=None, ran=["philosopher", "author", "world_update"]) == 1
    assert not (store.root / "artifacts/state-a").exists()  # moved into the episode
    assert store.save_episode(first, step=2, action=None, ran=[]) == 1  # same state id: nothing written
    assert store.episodes() == [1]
    second = complete_state(store, "state-b")
    assert store.save_episode(second, step=3, action="open the gates", ran=["world_update"]) == 2
    assert store.episodes() == [1, 2]
    assert store.find_episode("state-a") == 1 and store.find_episode("state-b") == 2
    assert store.find_episode("nope") is None
    lines = [json.loads(line) for line in store.index_path.read_text().splitlines()]
    assert lines == [{"episode": 1, "state_id": "state-a"}, {"episode": 2, "state_id": "state-b"}]


def test_load_episode_returns_the_five_blocks(store):
    state = complete_state(store, "state-a", images=2)
    store.save_episode(state, step=4, action="wait", ran=["world_update"])
    loaded, meta = store.load_episode(1)
    assert loaded.id == "state-a"
    assert loaded.filled() == {1, 2, 3, 4, 5}
    for n in (1, 2, 4, 5):
        assert loaded.block(n) == state.block(n)
    assert [r.path for r in loaded.artifacts] == ["episodes/000001/000.png", "episodes/000001/001.png"]
    for new, old in zip(loaded.artifacts, state.artifacts, strict=True):
        assert new.sha256 == old.sha256 and (new.width, new.height) == (old.width, old.height)
        assert store.artifact_path(new).is_file()
    assert meta["step"] == 4 and meta["action"] == "wait" and meta["ran"] == ["world_update"]
    assert meta["state_id"] == "state-a" and meta["episode"] == 1 and meta["time"]
    md = (store.episode_dir(1) / "episode.md").read_text()
    assert "The tide goes out" in md and "](000.png)" in md
    with pytest.raises(StorageError, match="no episode 7"):
        store.load_episode(7)


def test_incomplete_state_is_not_an_episode(store):
    with pytest.raises(StorageError, match="not complete"):
        store.save_episode(WorldState(happening="x"), step=1, action=None, ran=[])
    assert store.episodes() == []


def test_unsafe_artifact_in_state_writes_nothing(store):
    state = complete_state(store, "state-a").model_copy(
        update={"artifacts": [ArtifactRef(path="../evil.png")]}
    )
    with pytest.raises(UnsafePathError):
        store.save_episode(state, step=1, action=None, ran=[])
    assert store.episodes() == [] and not list(store.episodes_dir.iterdir())


def test_crash_during_rename_leaves_no_partial_episode(store, monkeypatch):
    store.save_episode(complete_state(store, "state-a"), step=1, action=None, ran=[])
    state = complete_state(store, "state-b")
    real_replace = os.replace

    def crash_on_episode_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_episode_rename)
    with pytest.raises(OSError, match="simulated crash"):
        store.save_episode(state, step=2, action=None, ran=[])
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.episodes() == [1]
    assert store.find_episode("state-b") is None
    assert (store.root / "artifacts/state-b").is_dir()  # the in-flight artifacts survive for the retry
    assert store.save_episode(state, step=2, action=None, ran=[]) == 2
    assert store.load_episode(2)[0].id == "state-b"


def test_leftover_tmp_from_a_killed_process_is_cleaned(store):
    store.save_episode(complete_state(store, "state-a"), step=1, action=None, ran=[])
    leftover = store.episodes_dir / ".tmp-state-b"
    leftover.mkdir()
    (leftover / "000.png").write_bytes(b"\x89PNG half")  # a process killed mid-assembly
    assert store.episodes() == [1]
    assert store.save_episode(complete_state(store, "state-b"), step=2, action=None, ran=[]) == 2
    assert not leftover.exists()
    assert len(store.load_episode(2)[0].artifacts) == 2


def test_crash_before_index_write_keeps_exactly_once(store, monkeypatch):
    import worldgen.storage as storage_module

    state = complete_state(store, "state-a")
    real_fsync_dir = storage_module._fsync_dir

    def crash_after_rename(path):
        real_fsync_dir(path)
        if path == store.episodes_dir:  # the episode is renamed into place; the index line is not written yet
            raise OSError("simulated crash after the rename")

    monkeypatch.setattr(storage_module, "_fsync_dir", crash_after_rename)
    with pytest.raises(OSError, match="after the rename"):
        store.save_episode(state, step=1, action=None, ran=[])
    monkeypatch.setattr(storage_module, "_fsync_dir", real_fsync_dir)
    assert (
        store.episodes() == [1] and not store.index_path.exists()
    )  # the episode is complete; only the index is behind
    fresh = WorldStorage(store.root)  # as after a restart
    assert fresh.find_episode("state-a") == 1
    assert fresh.save_episode(state, step=1, action=None, ran=[]) == 1
    assert fresh.episodes() == [1]


def test_missing_index_is_rebuilt(store):
    for i, name in enumerate(("s-a", "s-b", "s-c"), 1):
        assert store.save_episode(complete_state(store, name, images=1), step=i, action=None, ran=[]) == i
    store.index_path.unlink()
    fresh = WorldStorage(store.root)  # another process: nothing cached
    assert fresh.find_episode("s-b") == 2
    lines = [json.loads(line) for line in store.index_path.read_text().splitlines()]
    assert {line["state_id"]: line["episode"] for line in lines} == {"s-a": 1, "s-b": 2, "s-c": 3}
    store.index_path.write_text('{"episode": 1, "state_id": "s-a"}\n{"episo')  # a line cut short by a crash
    assert WorldStorage(store.root).find_episode("s-c") == 3
    assert store.save_episode(complete_state(store, "s-d", images=1), step=4, action=None, ran=[]) == 4


def test_an_episode_written_by_another_process_is_seen(store):
    assert store.save_episode(complete_state(store, "s-a", images=1), step=1, action=None, ran=[]) == 1
    other = WorldStorage(store.root)
    assert other.save_episode(complete_state(other, "s-b", images=1), step=2, action=None, ran=[]) == 2
    # the first instance's cached index is stale: it notices the new folder and numbers after it
    assert store.find_episode("s-b") == 2
    assert store.save_episode(complete_state(store, "s-c", images=1), step=3, action=None, ran=[]) == 3


def test_episode_artifacts_are_their_own_files(store):
    state = complete_state(store, "s-a", images=1)
    source = store.artifact_path(state.artifacts[0])
    data = source.read_bytes()
    store.save_episode(state, step=1, action=None, ran=[])
    saved, _ = store.load_episode(1)
    episode_png = store.artifact_path(saved.artifacts[0])
    assert not source.exists() and episode_png.read_bytes() == data
    assert saved.artifacts[0].sha256 == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- report


def test_report_has_every_episode_and_its_images(store):
    store.save_content(WorldContent(title="Harbor <Tales>", story="The town by the sea.\n\nIt rains."))
    store.save_episode(complete_state(store, "state-a", text="one"), step=2, action=None, ran=[])
    store.save_episode(
        complete_state(store, "state-b", text="<two> & 'more'"), step=3, action="ring the <bell>", ran=[]
    )
    html_path = store.write_report()
    assert html_path == store.root / "report.html"
    page = html_path.read_text()
    md = (store.root / "report.md").read_text()

    assert "Harbor &lt;Tales&gt;" in page and "<Tales>" not in page
    assert "The town by the sea." in page and "The town by the sea." in md
    assert "&lt;two&gt; &amp; &#x27;more&#x27;" in page and "<two>" not in page
    assert "ring the &lt;bell&gt;" in page
    for n in (1, 2):
        state, _ = store.load_episode(n)
        assert f"Episode {n}" in page and f"Episode {n}" in md
        for text in (state.happening, state.description, state.outcome, state.generation[0].prompt):
            assert text in md
        for ref in state.artifacts:
            assert f"]({ref.path})" in md
    assert page.index("Episode 1") < page.index("Episode 2")  # newest last
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 4
    for src in sources:
        assert not src.startswith("/") and (store.root / src).is_file()
    assert "<style>" in page and not re.search(r'(src|href)="(https?:)?//', page)  # self-contained


def test_report_of_an_empty_world(store):
    path = store.write_report()
    assert "No episodes yet" in path.read_text()
    assert "No episodes yet" in (store.root / "report.md").read_text()


def test_report_renders_in_chromium(store):
    """The report as a browser shows it: its title, every episode's heading and text, its images loaded."""
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "chromium is not installed (`make setup` installs Debian's when run as root with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI's set-up installs it: the browser test must not go quietly missing
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    store.save_content(WorldContent(title="Harbor <Tales>", story="The town by the sea."))
    states = [complete_state(store, "state-a", text="one"), complete_state(store, "state-b", text="two")]
    for step, state in enumerate(states, 2):
        store.save_episode(state, step=step, action=f"look {step}", ran=[])
    report = store.write_report()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.goto(report.as_uri())
            assert page.title() == "Harbor <Tales>"
            assert page.locator("h1").inner_text() == "Harbor <Tales>"
            assert "The town by the sea." in page.locator("section.story").inner_text()
            assert page.locator("article.episode > h2").all_inner_texts() == ["Episode 1", "Episode 2"]
            for number, state in enumerate(states, 1):
                shown = page.locator(f"#episode-{number}").inner_text()
                for text in (state.happening, state.description, state.outcome, f"look {number + 1}"):
                    assert text in shown, (number, text)
                images = page.locator(f"#episode-{number} img")
                assert images.count() == 2
                for i in range(images.count()):
                    images.nth(i).scroll_into_view_if_needed()  # they load lazily
            page.wait_for_function("() => [...document.images].every(img => img.complete)", timeout=15_000)
            sizes = page.eval_on_selector_all(
                "article.episode img", "imgs => imgs.map(img => [img.naturalWidth, img.naturalHeight])"
            )
            assert sizes == [[24, 16]] * 4  # each PNG decoded at its own size (a broken image is 0 x 0)
        finally:
            browser.close()


# ---------------------------------------------------------------- exclusive creates, damage, served files


@pytest.mark.parametrize("same", [False, True], ids=["different-configs", "same-config"])
def test_concurrent_creates_claim_the_directory_once(tmp_path, same):
    """Of concurrent creates in one directory exactly one creates the world; with another config the others
    are refused (never told the world is theirs), with the same config they find it (a resume)."""
    configs = [CONFIG if same else {**CONFIG, "seed": i} for i in range(8)]
    barrier = threading.Barrier(len(configs))
    outcomes: dict[int, object] = {}

    def create(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = WorldStorage(tmp_path / "world").create(configs[i])
        except WorldExistsError:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [i for i, outcome in outcomes.items() if outcome is True]
    assert sorted(map(str, outcomes.values())) == sorted(["True"] + ["False" if same else "refused"] * 7)
    assert WorldStorage(tmp_path / "world").load_config() == configs[winner]
    assert [p.name for p in (tmp_path / "world").iterdir() if p.name.startswith(".")] == []  # no temp left


def saved_episodes(store: WorldStorage, count: int) -> list[WorldState]:
    store.save_content(WorldContent(title="Harbor"))
    states = [complete_state(store, f"state-{n}", text=str(n)) for n in range(1, count + 1)]
    for n, state in enumerate(states, 1):
        assert store.save_episode(state, step=n + 1, action=None, ran=["world_update"]) == n
    return states


def test_check_names_the_damage_and_repair_rebuilds_what_is_derivable(store):
    saved_episodes(store, 5)
    store.save_progress(Progress(step=6))
    assert store.check() == []
    with open(store.progress_path, "ab") as fh:
        fh.write(b"{garbage\n")
    store.save_progress(Progress(step=7))

    ep = store.episode_dir
    shutil.rmtree(ep(2))  # a gap
    (ep(3) / "state.json").unlink()
    (ep(4) / "meta.json").write_text("garbage")
    (ep(5) / "episode.md").unlink()
    (ep(1) / "001.png").unlink()
    found = {str(d): d.repairable for d in store.check()}
    assert found == {
        "progress.jsonl has bad line(s) 2": True,
        "episode 2: episodes/000002/ is missing (a gap in the numbering)": False,
        "episode 1: episodes/000001/001.png is missing": False,
        "episode 3: episodes/000003/state.json is missing": False,
        "episode 4: episodes/000004/meta.json is unreadable: malformed JSON: Expecting value": False,
        "episode 5: episodes/000005/episode.md is missing": True,
        "episodes/index.jsonl is out of step with the episode folders": True,
    }
    with pytest.raises(WorldDamagedError, match=r"episode 3: episodes/000003/state.json is missing"):
        store.load_episode(3)

    repaired, remaining = store.repair()
    assert {str(d) for d in repaired} == {k for k, v in found.items() if v}
    assert {str(d) for d in remaining} == {k for k, v in found.items() if not v}
    assert store.episodes() == [1, 3, 4, 5]  # no episode deleted
    assert store._read_index() == {"state-1": 1, "state-4": 4, "state-5": 5}
    assert (ep(5) / "episode.md").read_text().startswith("# Episode 5")
    assert store.progress_path.read_bytes().count(b"\n") == 1 and store.load_progress().step == 7
    assert not (store.root / "report.html").exists()  # not every episode is readable: no report

    (store.root / "content.json").write_text("{}}")
    assert any(str(d).startswith("content.json is unreadable: malformed JSON") for d in store.check())


def test_repair_of_derivable_damage_leaves_none_and_writes_the_report(store):
    saved_episodes(store, 2)
    store.index_path.write_text('{"episode": 1, "state_id": "state-2"}\n')  # wrong, same numbers
    (store.episode_dir(1) / "episode.md").unlink()
    repaired, remaining = store.repair()
    assert len(repaired) == 2 and remaining == [] and store.check() == []
    assert store.find_episode("state-2") == 2
    assert "Episode 2" in (store.root / "report.html").read_text()


def test_only_the_worlds_own_regular_files_are_served(store, tmp_path, monkeypatch):
    state = complete_state(store, "state-a")
    # the episode's images are hard links to the in-flight ones: keep those to see both names pass
    monkeypatch.setattr(WorldStorage, "discard_artifacts", lambda self, state_id: None)
    store.save_episode(state, step=2, action=None, ran=[])
    episode_png, in_flight_png = "episodes/000001/000.png", "artifacts/state-a/000.png"
    assert os.stat(store.root / episode_png).st_nlink == 2
    data = store.read_artifact(episode_png)
    assert data.startswith(b"\x89PNG") and store.read_artifact(in_flight_png) == data

    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not the world's")
    (store.root / "episodes/000001/001.png").unlink()
    os.link(outside, store.root / "episodes/000001/001.png")
    with pytest.raises(UnsafePathError, match="hard-linked to a file outside the world"):
        store.read_artifact("episodes/000001/001.png")
    assert "episode 1: episodes/000001/001.png is hard-linked to a file outside the world" in map(
        str, store.check()
    )
    os.link(store.root / episode_png, tmp_path / "copy.png")  # one more name, outside: no longer served
    with pytest.raises(UnsafePathError, match="hard-linked"):
        store.read_artifact(episode_png)

    os.mkfifo(store.root / "episodes/000001/pipe.png")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        store.read_artifact("episodes/000001/pipe.png")
    with pytest.raises(UnsafePathError, match="under episodes/ or artifacts/"):
        store.read_artifact("content.json")
    with pytest.raises(FileNotFoundError):
        store.read_artifact("episodes/000001/404.png")
