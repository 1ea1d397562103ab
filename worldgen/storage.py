"""One world's directory on disk (DESIGN.md §5): config, content, the resume point, episodes, a readable report.

```
<root>/
  world.yaml            the world config, `ref:` includes inlined (no secrets: `${env:NAME}` references stay)
  content.json          WorldContent: title, story, history, glossary, style, rules
  progress.jsonl        Progress: the state in flight and where the cycle stands (the resume point is the last
                        line; appended after every stage, compacted to one line when it grows past 64 KiB)
  artifacts/<state_id>/ images of the state in flight (block 3): 000.png, 001.png, ...
  episodes/000001/      state.json (WorldState: five blocks + id), meta.json (EpisodeMeta), the artifacts (000.png,
                        ...), episode.md
  episodes/index.jsonl  one line per episode: {"episode": n, "state_id": ...} (appended; rebuilt when stale)
  report.md/.html       every episode, newest last, images inline (relative links; rendered by worldgen.report)
  checkpoints/          reserved (checkpoints and adapters)
```

This module is the only one that knows these names: others ask `WorldStorage` (`is_world`, `world_dirs`,
`config_path`, `report_path`, `episode_folder`, ...) or `EpisodeFolder` (an episode folder's files).

Every file is written atomically (temp file + fsync + rename); an episode is assembled in `episodes/.tmp-<id>/` and
renamed into place, so a crash leaves either no episode or a complete one. Episodes are saved exactly once per state
id. One writer per world directory is assumed (the world driver); readers may look at any time.

A root may also be a URI every node of a cluster reaches (`s3://bucket/worlds/harbor`, `gs://...`; see
worldgen/stores.py). The store then holds the same layout and is the truth; the writer works in a local cache
(`cache_root()`: models and the Philosopher read files) and publishes each file as one whole object, so nothing
on the store is renamed or appended:
- `progress.jsonl` holds one line, the resume point, rewritten whole after every stage;
- an episode's files are uploaded to `episodes/NNNNNN/`, then made visible by one commit object
  `commits/NNNNNN.<state id>.json` (listing its files and sizes): readers list `commits/` and ignore episode files
  without one, and the commits are the episode index (no index.jsonl);
- in-flight artifacts are uploaded as they are made, so a driver restarted on another node resumes the step;
- readers read the store (artifacts in byte ranges), never the cache of another process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from worldgen.config import dump_config, load_config_file
from worldgen.errors import ConfigError, WorldgenError, format_validation_error
from worldgen.images import png_bytes, to_pil
from worldgen.media import Media, MediaInfo, media_type, write_audio, write_preview, write_video
from worldgen.report import episode_markdown, report_html, report_markdown
from worldgen.state import ArtifactRef, EpisodeMeta, Progress, ReferenceUse, WorldContent, WorldState
from worldgen.storage_io import atomic_write_bytes, atomic_write_text
from worldgen.stores import Store, StoreError, child_uri, is_uri, local_path, open_store

__all__ = [
    "Damage",
    "EpisodeFolder",
    "StorageError",
    "StoreError",
    "UnsafePathError",
    "WorldDamagedError",
    "WorldExistsError",
    "WorldStorage",
]

_M = TypeVar("_M", bound=BaseModel)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_EPISODE_DIR = re.compile(r"^\d{6,}$")
_TMP_PREFIX = ".tmp-"
_PROGRESS_LOG_LIMIT = 64 * 1024
_CONFIG_FILE = "world.yaml"
_COMMITS = "commits"  # on a store: one commit object per visible episode
_COMMIT = re.compile(r"^(\d{6,})\.([A-Za-z0-9][A-Za-z0-9_.-]{0,127})\.json$")


def cache_root() -> Path:
    """Where worlds stored on a URI keep their local working copies: WORLDGEN_CACHE_DIR, else the user's cache
    folder. Only a cache: the store is the truth, and a new process (a driver restarted on another node)
    fetches what it needs."""
    explicit = os.environ.get("WORLDGEN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "worldgen"


def world_location(directory: str | os.PathLike[str]) -> str:
    """A world's location as one string: the URI as given (without a trailing '/'), or the resolved local path.
    Names that must be equal on every node (a world's driver) are made from it."""
    text = os.fspath(directory)
    if is_uri(text):
        return text.rstrip("/")
    return str(local_path(text).expanduser().resolve())


class _Layout:
    """One entry of a folder's layout: a path under the `root` of the object it is read on (a class attribute,
    so each layout reads as a table of names)."""

    def __init__(self, *parts: str, doc: str = ""):
        self.parts, self.__doc__ = parts, doc

    def __get__(self, folder: Any, owner: type | None = None) -> Path:
        if folder is None:  # looked up on the class (help(), docs): the entry itself
            return self  # type: ignore[return-value]
        return folder.root.joinpath(*self.parts)


class StorageError(WorldgenError):
    """A world directory is missing, holds a different world, or lacks a requested episode."""


class UnsafePathError(ConfigError, ValueError):
    """An artifact path or state id would point outside the world directory."""


class WorldExistsError(StorageError, ConfigError):
    """The directory already holds a different world (creates are exclusive: see `WorldStorage.create`); a
    ConfigError too, naming the world.yaml the config was compared with."""


@dataclass(frozen=True)
class Damage:
    """One thing wrong in a world directory: the file (relative to the root), what is wrong with it, the episode
    it belongs to, and whether `WorldStorage.repair` can rebuild it from the rest of the world."""

    file: str
    problem: str
    episode: int | None = None
    repairable: bool = False

    def __str__(self) -> str:
        return f"{'' if self.episode is None else f'episode {self.episode}: '}{self.file} {self.problem}"


class WorldDamagedError(StorageError):
    """Files a world needs are missing or unreadable; `damage` lists them (`worldgen check DIR` shows all)."""

    def __init__(self, root: Path, damage: list[Damage]):
        self.root, self.damage = root, damage
        shown = "; ".join(map(str, damage[:5])) + (f"; and {len(damage) - 5} more" if len(damage) > 5 else "")
        super().__init__(f"world damaged: {shown} (in {root}; `worldgen check {root}` lists the damage)")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt from its fields where it crosses processes (Ray)
        return type(self), (self.root, self.damage)


@dataclass(frozen=True)
class EpisodeFolder:
    """The files of one episode folder: a world's (`WorldStorage.episode_folder`) or one written by hand, which
    training reads the same way (worldgen/training/episodes.py)."""

    root: Path

    state_path = _Layout("state.json", doc="the five blocks and the state's id (a WorldState as JSON)")
    meta_path = _Layout("meta.json", doc="what the world recorded when it saved the episode (an EpisodeMeta)")
    page_path = _Layout(
        "episode.md", doc="the episode as Markdown (derived from the other two: `repair` rebuilds it)"
    )

    def read_meta(self) -> EpisodeMeta | None:
        """The episode's metadata, or None when the folder has none; a bad file raises ConfigError naming the
        file and the field."""
        return _read_model(self.meta_path, EpisodeMeta)


class WorldStorage:
    """The directory of one world: everything a person may want to open is a plain file (see the module doc)."""

    def __init__(self, root: str | Path, *, setting: str = "the world root"):
        """`root`: a local directory, or a store URI (`s3://...`); `setting` names where it came from in errors
        (a store that cannot be used raises StoreError naming it, at the first operation that needs it)."""
        self.store: Store | None = None
        if is_uri(root):
            self.uri = os.fspath(root).rstrip("/")
            self.store = Store(self.uri, setting=setting)
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:16]
            self.root = cache_root() / "worlds" / f"{Path(self.store.base).name or 'world'}-{digest}"
        else:
            self.uri = None
            self.root = local_path(root)
        self._fresh: set[str] = set()  # (store roots) keys whose cached file is known to equal the store's
        self._root_resolved: Path | None = None
        self._progress_size: int | None = None  # bytes in progress.jsonl when it ends with a whole line
        # (signature, state id -> episode number, last number), valid while the episodes folder is unchanged since
        # it was read (a step then costs no listing of a folder that grows with every episode)
        self._index_cache: tuple[tuple[int, int], dict[str, int], int] | None = None

    # ---------------------------------------------------------------- layout

    @staticmethod
    def is_world(path: str | Path) -> bool:
        """True when a world lives in the directory (or under the URI) `path` (its config is there)."""
        if is_uri(path):
            return Store(os.fspath(path)).exists(_CONFIG_FILE)
        return (local_path(path) / _CONFIG_FILE).is_file()

    @classmethod
    def world_dirs(cls, root: str | Path, *, setting: str = "the worlds root") -> list[Path] | list[str]:
        """The world directories directly under `root`, sorted ([] when `root` is not a folder); under a store
        URI, the worlds' URIs."""
        if is_uri(root):
            store = open_store(os.fspath(root), setting=setting)
            names = [key.rstrip("/") for key in store.list() if key.endswith("/")]
            return [child_uri(store.uri, n) for n in names if store.exists(f"{n}/{_CONFIG_FILE}")]
        root = local_path(root)
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if cls.is_world(p))

    @property
    def location(self) -> str:
        """Where the world lives: its URI, or its local directory (see `world_location`)."""
        return self.uri or str(self.root)

    config_path = _Layout(_CONFIG_FILE)
    content_path = _Layout("content.json")
    progress_path = _Layout("progress.jsonl")
    artifacts_dir = _Layout("artifacts")
    episodes_dir = _Layout("episodes")
    checkpoints_dir = _Layout("checkpoints")
    index_path = _Layout("episodes", "index.jsonl")
    report_path = _Layout(
        "report.html", doc="the HTML report (`write_report` writes it and report_markdown_path)"
    )
    report_markdown_path = _Layout("report.md")

    def _resolved_root(self) -> Path:
        if self._root_resolved is None:  # resolving walks every parent folder: once per instance
            self._root_resolved = self.root.resolve()
        return self._root_resolved

    def episode_dir(self, number: int) -> Path:
        """The folder of episode `number` (whether or not it exists)."""
        return self.episodes_dir / f"{int(number):06d}"

    def episode_folder(self, number: int) -> EpisodeFolder:
        """The files of episode `number` (whether or not they exist)."""
        return EpisodeFolder(self.episode_dir(number))

    def __repr__(self) -> str:
        return f"WorldStorage({self.location!r})"

    # ---------------------------------------------------------------- the store (URI roots)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _publish(self, *paths: Path | None) -> None:
        """Upload local files to the same keys on the store, each as one whole object (URI roots only)."""
        if self.store is None:
            return
        for path in paths:
            if path is not None:
                key = self._key(path)
                self.store.put(key, path.read_bytes())
                self._fresh.add(key)

    def _fetch(self, path: Path) -> bool:
        """Make the local copy of a store file current (URI roots; a no-op locally); False when the store has
        no such file (the local copy, if any, is then removed: it is not the world's)."""
        if self.store is None:
            return path.exists()
        key = self._key(path)
        if key in self._fresh and path.is_file():
            return True
        data = self.store.get(key)
        if data is None:
            path.unlink(missing_ok=True)
            return False
        atomic_write_bytes(path, data, durable=False)
        self._fresh.add(key)
        return True

    def publish_tree(self, folder: Path) -> None:
        """Upload every file under a local `folder` of the world (its weights after `save_weights`); URI roots
        only."""
        if self.store is not None and folder.is_dir():
            self._publish(*(p for p in sorted(folder.rglob("*")) if p.is_file()))

    def fetch_tree(self, folder: Path) -> Path:
        """`folder` of the world with the store's files in it (URI roots: a world's prompts, its weights); a
        local folder as it is."""
        if self.store is not None:
            for key in self.store.list(self._key(folder), recursive=True):
                self._fetch(self.root / key)
        return folder

    def _read(self, path: Path) -> bytes | None:
        """A file of the world: from the store for URI roots (the truth), else from disk; None when missing."""
        if self.store is not None:
            return self.store.get(self._key(path))
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ConfigError(f"cannot read: {err}", file=str(path)) from None

    def _label(self, path: Path) -> str:
        """A file's name in messages: its URI on a store, else its path."""
        return child_uri(self.uri, self._key(path)) if self.uri else str(path)

    def _commits(self) -> list[tuple[int, str]]:
        """(episode, state id) of every committed episode on the store, ascending."""
        assert self.store is not None
        found = []
        for key in self.store.list(_COMMITS):
            match = _COMMIT.match(key.rpartition("/")[2])
            if match:
                found.append((int(match.group(1)), match.group(2)))
        return sorted(found)

    # ---------------------------------------------------------------- config

    def exists(self) -> bool:
        """True when a world lives here (its world.yaml is there)."""
        if self.store is not None:
            return self.store.exists(_CONFIG_FILE)
        return self.is_world(self.root)

    def check_same_world(self, config: Mapping[str, Any]) -> bool:
        """Whether the world `config` describes lives here: True when it does, False when no world lives here
        yet, WorldExistsError when a *different* one does. `config` is compared as world.yaml stores it (give it
        as the world stores it: `worldgen.world.stored_config`). The one "same world?" check: creates, world
        drivers and their callers all ask it."""
        if not self.exists():
            return False
        if _normalize_config(self.load_config()) != _normalize_config(config):
            raise WorldExistsError(
                f"{self.root} already holds a different world (its {self.config_path.name} differs from the "
                "config given); continue that world as it is, without a config, or choose another directory",
                file=str(self.config_path),
            )
        return True

    def create(self, config: Mapping[str, Any], *, overwrite: bool = False) -> bool:
        """Claim the directory for the world `config` describes and make its layout; True when this call created
        the world, False when the same world is there already (a resume). A directory holding a *different* world
        raises WorldExistsError unless `overwrite=True`.

        The claim is atomic across processes and hosts sharing the directory: world.yaml is written to a temp
        file and hard-linked into place, which fails when the name exists, so of several concurrent creates
        exactly one returns True and the others compare their config with the one that won."""
        if overwrite:
            self.save_config(config)
        elif not self._claim(config):
            self.check_same_world(config)
            return False
        for folder in (self.artifacts_dir, self.episodes_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return True

    def _claim(self, config: Mapping[str, Any]) -> bool:
        """Write world.yaml only if there is none: True when this call wrote it. On a store the check and the
        write are two requests (pyarrow has no conditional PUT): one driver per world (named from its URI)
        makes concurrent creates of one world there unlikely, not impossible."""
        if self.store is not None:
            if self.store.exists(_CONFIG_FILE):
                return False
            self.save_config(config)
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{self.config_path.name}"
        dump_config(_plain(config), tmp)  # whole and fsynced before it gets its name: readers never see half
        try:
            os.link(tmp, self.config_path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL still makes the claim exclusive
            try:
                fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(tmp.read_bytes())
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)
        return True

    def remove(self) -> None:
        """Delete the whole world: its directory, or (on a store) every object under its URI and the local
        cache. Its driver must be stopped first."""
        if self.store is not None:
            self.store.delete_prefix("")
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def join(root: str | Path, name: str) -> Path | str:
        """The location of the world `name` under a root of worlds: a subdirectory, or a URI one level down."""
        return child_uri(os.fspath(root), name) if is_uri(root) else local_path(root) / name

    @staticmethod
    def name_of(location: str | Path) -> str:
        """The last part of a world's location (its directory's name; the last segment of a URI's path)."""
        text = os.fspath(location)
        return PurePosixPath(urlsplit(text).path).name if is_uri(text) else local_path(text).name

    def save_config(self, config: Mapping[str, Any]) -> None:
        """Write world.yaml atomically, as given (never pass a config with resolved secrets)."""
        dump_config(_plain(config), self.config_path)
        self._publish(self.config_path)

    def load_config(self) -> dict[str, Any]:
        """Read world.yaml; a missing or malformed file raises an error naming it."""
        if not (self._fetch(self.config_path) if self.store else self.exists()):
            raise StorageError(f"no world at {self.location} (world.yaml is missing)")
        return load_config_file(self.config_path)

    # ---------------------------------------------------------------- content and progress

    def save_content(self, content: WorldContent) -> None:
        """Write content.json atomically."""
        _write_model(self.content_path, content)
        self._publish(self.content_path)

    def load_content(self) -> WorldContent | None:
        """The world's content, or None when none was saved yet."""
        return self._read_model(self.content_path, WorldContent)

    def _read_model(self, path: Path, cls: type[_M]) -> _M | None:
        """A JSON file of the world parsed into `cls` (from the store for URI roots); None when missing."""
        if self.store is None:
            return _read_model(path, cls)
        data = self._read(path)
        return None if data is None else _parse_model(data, cls, self._label(path))

    def save_progress(self, progress: Progress) -> None:
        """Record the resume point: one JSON line appended to progress.jsonl (an append, unlike a rename over an
        existing file, costs no flush), or the file rewritten atomically with just this line when it has grown
        past 64 KiB or does not end with a whole line. Not fsynced: after an OS crash an older resume point only
        means a stage runs again, and episodes and content are applied exactly once by state id. On a store the
        object holds just this line, written whole (a store has no append)."""
        line = (progress.model_dump_json() + "\n").encode()
        if self.store is not None:  # the store's copy is the one read (`load_progress`): no local journal
            self.store.put(self._key(self.progress_path), line)
            return
        if self._progress_size is None and self.progress_path.is_file():
            with open(self.progress_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(size - 1, 0))
                whole = fh.read(1) == b"\n"
            self._progress_size = size if whole else None
        if self._progress_size is not None and self._progress_size + len(line) <= _PROGRESS_LOG_LIMIT:
            with open(self.progress_path, "ab") as fh:
                fh.write(line)
            self._progress_size += len(line)
        else:
            atomic_write_bytes(self.progress_path, line, durable=False)
            self._progress_size = len(line)

    def load_progress(self) -> Progress | None:
        """The resume point (the last whole line of progress.jsonl), or None when the world never ran."""
        data = self._read(self.progress_path)
        if data is None:
            return None
        lines = data.splitlines()
        for number in range(len(lines), 0, -1):
            try:
                data = json.loads(lines[number - 1])
            except ValueError:
                continue  # a line cut short by a crash: the one before it is the resume point
            try:
                return Progress.model_validate(data)
            except ValidationError as err:
                raise ConfigError(
                    f"not a valid Progress: {format_validation_error(err)}",
                    file=self._label(self.progress_path),
                    path=f"line {number}",
                ) from None
        if any(line.strip() for line in lines):
            raise ConfigError("malformed JSON: no whole line", file=self._label(self.progress_path))
        return None

    # ---------------------------------------------------------------- artifacts

    def save_artifacts(
        self, state_id: str, items: Any, *, after: list[ArtifactRef] | None = None
    ) -> list[ArtifactRef]:
        """Write block 3's files as `artifacts/<state_id>/000.png`, `001.mp4` (+ `001.preview.webp`), `002.wav`,
        ... (each atomically); returns their typed refs (paths relative to the root, what each holds, sha256).
        `items`: `Media` values, or images (a tensor/array (B, C, H, W) or (C, H, W) in [0, 1], a PIL image, or a
        list of them). A repeated call for the same state replaces its files, except those of `after` (what an
        earlier call of this state wrote, kept: the new files are numbered after them)."""
        folder = self.artifacts_dir / _check_id(state_id)
        refs = list(after or [])
        made = [self._save_medium(folder, len(refs) + i, medium) for i, medium in enumerate(_media(items))]
        refs += made
        keep = {PurePosixPath(name).name for r in refs for name in (r.path, r.preview) if name}
        for stale in folder.iterdir() if folder.is_dir() else ():
            if stale.name not in keep and not stale.name.startswith("."):
                stale.unlink(missing_ok=True)
        if self.store is not None:  # a driver resumed on another node reads them from the store
            prefix = self._key(folder)
            for key in self.store.list(prefix, recursive=True):
                if PurePosixPath(key).name not in keep:
                    self.store.delete(key)
            self._publish(*(self.root / name for r in made for name in (r.path, r.preview) if name))
        return refs

    def _save_medium(self, folder: Path, index: int, medium: Media) -> ArtifactRef:
        """One artifact written (in flight: the episode's copy is the durable one) and described."""
        target = folder / f"{index:03d}.{medium.suffix}"
        preview = None
        if medium.kind == "image":
            picture = _pictures(medium.data)[0]
            atomic_write_bytes(target, png_bytes(picture), durable=False)
            info = MediaInfo("image", media_type(target), picture.width, picture.height)
        elif medium.kind == "video":  # the writers say what they wrote: the file is not read back again
            info = write_video(target, medium.data, fps=medium.fps or 16.0)
            preview = folder / f"{index:03d}.preview.webp"
            write_preview(preview, medium.data, fps=medium.fps or 16.0)
        else:
            info = write_audio(target, medium.data, sample_rate=medium.sample_rate or 44_100)
        return ArtifactRef(
            path=self._rel(target),
            sha256=hashlib.sha256(target.read_bytes()).hexdigest(),
            preview=self._rel(preview) if preview else None,
            request=medium.request,
            source=medium.source,
            **info.fields(),
        )

    def artifact_path(self, ref: ArtifactRef | str) -> Path:
        """The file a ref points at, guaranteed inside the root: absolute paths, `..` parts and symlinks that
        leave the root raise UnsafePathError. The file need not exist."""
        raw = ref.path if isinstance(ref, ArtifactRef) else str(ref)
        if not raw or "\x00" in raw:
            raise UnsafePathError(f"artifact path {raw!r}: expected a non-empty path relative to {self.root}")
        posix, windows = PurePosixPath(raw), PureWindowsPath(raw)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or raw.startswith(("\\", "/")):
            raise UnsafePathError(
                f"artifact path {raw!r} is absolute; expected a path relative to {self.root}"
            )
        if ".." in posix.parts or ".." in windows.parts:
            raise UnsafePathError(f"artifact path {raw!r} contains '..'; expected a path inside {self.root}")
        root = self._resolved_root()
        target = (root / posix).resolve()
        if not target.is_relative_to(root):
            raise UnsafePathError(f"artifact path {raw!r} leads outside {self.root} (through a symlink)")
        return target

    def local_artifact(self, ref: ArtifactRef | str) -> Path:
        """`artifact_path`, with the file there: for a world on a store, fetched into the local cache first (the
        Philosopher and the Creator read artifacts as files)."""
        target = self.artifact_path(ref)
        if self.store is not None:
            self._fetch(target)
        return target

    def read_artifact(self, path: str, start: int = 0, stop: int | None = None) -> bytes:
        """The bytes of one of the world's artifacts (a file under episodes/ or artifacts/). Only a regular file
        inside the world whose every name is the world's own is read: a path leaving the root (see
        `artifact_path`), anything but a regular file, or a file hard-linked from outside the world raises
        UnsafePathError; a missing file raises FileNotFoundError. `start`/`stop`: only bytes [start, stop) are
        read (a player seeking in a long clip asks for a slice, not the whole file). On a store the slice is
        one ranged read of the object, and only committed episodes' files and in-flight artifacts are served."""
        if self.store is not None:
            data = self.store.get(self._store_artifact_key(path), start, stop)
            if data is None:
                raise FileNotFoundError(path)
            return data
        with self._open_artifact(path) as fh:
            fh.seek(max(0, start))
            return fh.read(-1 if stop is None else max(0, stop - max(0, start)))

    def artifact_size(self, path: str) -> int:
        """The size in bytes of one of the world's artifacts (checked as `read_artifact` checks it)."""
        if self.store is not None:
            size = self.store.size(self._store_artifact_key(path))
            if size is None:
                raise FileNotFoundError(path)
            return size
        with self._open_artifact(path) as fh:
            return os.fstat(fh.fileno()).st_size

    def _open_artifact(self, path: str) -> io.BufferedReader:
        """The artifact opened for reading, once it is known to be the world's own regular file."""
        if PurePosixPath(path.replace("\\", "/")).parts[:1] not in (("episodes",), ("artifacts",)):
            raise UnsafePathError(f"artifact path {path!r}: expected a file under episodes/ or artifacts/")
        target = self.artifact_path(path)
        # checked on the open file (not the name), so the file read is the file checked; O_NONBLOCK keeps a
        # FIFO from blocking the reader, O_NOFOLLOW a symlink swapped in since `artifact_path` resolved it
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        fh = os.fdopen(fd, "rb")
        problem = self._file_problem(target, os.fstat(fd))
        if problem:
            fh.close()
            raise UnsafePathError(f"artifact {path!r} {problem}")
        return fh

    def _store_artifact_key(self, path: str) -> str:
        """The store key of an artifact path, checked as on disk (inside the world, under episodes/ or
        artifacts/); an episode's file only once its episode is committed."""
        parts = PurePosixPath(path.replace("\\", "/")).parts
        if parts[:1] not in (("episodes",), ("artifacts",)):
            raise UnsafePathError(f"artifact path {path!r}: expected a file under episodes/ or artifacts/")
        key = self._key(self.artifact_path(path))
        if parts[0] == "episodes" and (len(parts) < 3 or not parts[1].isdigit()):
            raise FileNotFoundError(path)
        if parts[0] == "episodes" and int(parts[1]) not in {n for n, _ in self._commits()}:
            raise FileNotFoundError(path)  # written, not committed: not the world's yet
        return key

    def _file_problem(self, target: Path, info: os.stat_result) -> str | None:
        """Why the world would not serve `target` (a resolved path inside the root), or None."""
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_nlink > self._own_links(target, info):
            return "is hard-linked to a file outside the world"
        return None

    def _own_links(self, target: Path, info: os.stat_result) -> int:
        """How many names the world itself gives the file `target`: 1, or 2 while an episode's image and the
        in-flight artifact it was hard-linked from (`save_episode`) both exist. A file with more names than
        this shares its data with a file outside the world."""
        if info.st_nlink == 1:
            return 1
        area = target.relative_to(self._resolved_root()).parts[0]
        twins = (self.artifacts_dir if area == "episodes" else self.episodes_dir).glob(f"*/{target.name}")
        return 1 + sum(1 for twin in twins if _same_file(twin, info))

    def discard_artifacts(self, state_id: str) -> None:
        """Remove the in-flight artifacts of a state (one that was dropped, or whose episode is saved)."""
        folder = self.artifacts_dir / _check_id(state_id)
        shutil.rmtree(folder, ignore_errors=True)
        if self.store is not None:
            self.store.delete_prefix(self._key(folder))

    # ---------------------------------------------------------------- episodes

    def save_episode(
        self,
        state: WorldState,
        *,
        step: int,
        action: str | None,
        ran: list[str],
        references: list[ReferenceUse] | None = None,
    ) -> int:
        """Save a complete state as the next episode, exactly once per `state.id`: when an episode of this state
        exists already, return its number and write nothing. `references`: what the Creator fed for block 2's
        references (recorded in meta.json). The episode is assembled in `episodes/.tmp-<id>/` and
        renamed into place; the state's in-flight artifacts are then removed. Returns the episode number."""
        state_id = _check_id(state.id)
        missing = sorted({1, 2, 3, 4, 5} - state.filled())
        if missing:
            raise StorageError(
                f"state {state_id} is not complete (blocks {', '.join(map(str, missing))} empty): "
                "only a state with all five blocks becomes an episode"
            )
        if not self._index_is_cached():  # a fresh start: a crash may have left a half-assembled episode
            self._clean_tmp()
        index = self._index()
        existing = index.get(state_id)
        if existing is not None:
            self.discard_artifacts(state_id)
            return existing
        number = self._index_cache[2] + 1
        final = self.episode_dir(number)
        tmp = self.episodes_dir / f"{_TMP_PREFIX}{state_id}"
        # every artifact path is checked before anything is written
        sources = [self.local_artifact(ref) for ref in state.artifacts or []]
        try:
            tmp.mkdir(parents=True)
            saved = self._assemble(
                tmp,
                final,
                state,
                sources,
                step=step,
                action=action,
                ran=ran,
                number=number,
                references=references or [],
            )
            _fsync_dir(tmp)
            if self.store is not None:  # a local leftover of an attempt that was never committed
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.episodes_dir)
        if self.store is not None:
            self._commit(number, saved.id, final)
        else:
            # a crash before this line is repaired by _index (it rebuilds an index that disagrees with the folders)
            with open(self.index_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"episode": number, "state_id": saved.id}) + "\n")
        index[saved.id] = number
        self._index_cache = (self._episodes_signature(), index, number)
        self.discard_artifacts(state_id)
        return number

    def _commit(self, number: int, state_id: str, folder: Path) -> None:
        """Publish an assembled episode on the store: its files first, then the one commit object that makes it
        visible (a crash in between leaves files no reader looks at; the next attempt overwrites them)."""
        assert self.store is not None
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        self._publish(*files)
        listing = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
        commit = {"episode": number, "state_id": state_id, "files": listing}
        self.store.put(f"{_COMMITS}/{number:06d}.{state_id}.json", json.dumps(commit, indent=1).encode())

    def episodes(self) -> list[int]:
        """Numbers of the saved episodes, ascending (on a store: the committed ones)."""
        if self.store is not None:
            return [n for n, _ in self._commits()]
        if not self.episodes_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.episodes_dir.iterdir() if p.is_dir() and _EPISODE_DIR.match(p.name)
        )

    def load_episode(self, number: int) -> tuple[WorldState, dict[str, Any]]:
        """The state of episode `number` (artifact paths point at its own copies) and its meta as recorded
        (`EpisodeMeta.recorded()`: episode, state_id, step, action, ran, time)."""
        state, meta = self._load_episode(number)
        return state, meta.recorded()

    def _load_episode(self, number: int) -> tuple[WorldState, EpisodeMeta]:
        present = number in self.episodes() if self.store is not None else self.episode_dir(number).is_dir()
        if not present:
            raise StorageError(f"no episode {number} in {self.episodes_dir}")
        state, meta, damage = self._read_episode(number)
        if damage:
            raise WorldDamagedError(self.root, damage)
        assert state is not None and meta is not None  # no damage: both files were read
        return state, meta

    def find_episode(self, state_id: str) -> int | None:
        """The number of the episode saved from state `state_id`, or None."""
        return self._index().get(state_id)

    # ---------------------------------------------------------------- damage

    def check(self) -> list[Damage]:
        """Everything wrong in the directory, read-only: a bad content.json, bad lines in the progress journal (a
        line cut short at the end by a crash is normal, not damage), missing or unreadable episode files, gaps in
        the episode numbering, missing artifacts (or ones that are not the world's own regular files), missing
        episode.md files and an index.jsonl out of step with the episode folders. On a store (where files are
        published whole and episodes committed last) it reads no episode: it checks the content, the resume
        point, gaps in the numbering and that each committed episode's state.json and meta.json are there."""
        damage = self._content_damage() + self._progress_damage()
        if self.store is not None:
            return damage + self._store_damage()
        numbers = self.episodes()
        present = set(numbers)
        for n in range(1, numbers[-1] if numbers else 0):
            if n not in present:
                damage.append(
                    Damage(f"{self._rel(self.episode_dir(n))}/", "is missing (a gap in the numbering)", n)
                )
        states: dict[str, int] = {}
        for n in numbers:
            state, meta, found = self._read_episode(n)
            damage += found
            if state is None:
                continue
            states[state.id] = n
            damage += [Damage(path, problem, n) for path, problem in self._artifact_damage(state)]
            page = self.episode_folder(n).page_path
            if meta is not None and not page.is_file():
                damage.append(Damage(self._rel(page), "is missing", n, True))
        if (numbers or self.index_path.exists()) and self._read_index() != states:
            damage.append(
                Damage(self._rel(self.index_path), "is out of step with the episode folders", None, True)
            )
        return damage

    def _store_damage(self) -> list[Damage]:
        assert self.store is not None
        numbers = self.episodes()
        damage = [
            Damage(f"{self._rel(self.episode_dir(n))}/", "is missing (a gap in the numbering)", n)
            for n in sorted(set(range(1, numbers[-1] if numbers else 0)) - set(numbers))
        ]
        keys = set(self.store.list(self._key(self.episodes_dir), recursive=True))
        for n in numbers:
            files = self.episode_folder(n)
            for path in (files.state_path, files.meta_path):
                if self._key(path) not in keys:
                    damage.append(Damage(self._rel(path), "is missing", n))
        return damage

    def repair(self) -> tuple[list[Damage], list[Damage]]:
        """Rebuild what the rest of the world determines: episodes/index.jsonl, missing episode.md files, a progress
        journal with bad lines (rewritten as its resume point) and, when every episode is readable, report.md and
        report.html. Never deletes an episode. Returns (what was repaired, the damage that remains). A world on a
        store has nothing repairable (its files are published whole)."""
        if self.store is not None:
            return [], self.check()
        repaired = [d for d in self.check() if d.repairable]
        for d in repaired:
            if d.file == self._rel(self.index_path):
                self._write_index({state.id: n for n in self.episodes() if (state := self._read_state(n))})
            elif d.file == self._rel(self.progress_path):
                atomic_write_bytes(
                    self.progress_path, (self.load_progress().model_dump_json() + "\n").encode()
                )
                self._progress_size = None
            elif d.episode is not None:  # episode.md, from the episode's state.json and meta.json
                state, meta, _ = self._read_episode(d.episode)
                atomic_write_text(
                    self.episode_folder(d.episode).page_path, _episode_page(d.episode, state, meta)
                )
        self._index_cache = None
        remaining = self.check()
        if not any(d.episode is not None for d in remaining) and self.exists():
            self.write_report()
        return repaired, remaining

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _read_state(self, number: int) -> WorldState | None:
        """An episode's state, or None when its state.json is missing or unreadable (`check` says which)."""
        try:
            return self._read_model(self.episode_folder(number).state_path, WorldState)
        except ConfigError:
            return None

    def _read_episode(self, number: int) -> tuple[WorldState | None, EpisodeMeta | None, list[Damage]]:
        """An episode's state and meta as far as they are readable, and what is wrong with those two files."""
        files = self.episode_folder(number)
        damage: list[Damage] = []
        state = meta = None
        try:
            state = self._read_model(files.state_path, WorldState)
        except ConfigError as err:
            damage.append(Damage(self._rel(files.state_path), f"is unreadable: {err.detail}", number))
        else:
            if state is None:
                damage.append(Damage(self._rel(files.state_path), "is missing", number))
        try:
            meta = self._read_model(files.meta_path, EpisodeMeta)
        except ConfigError as err:
            damage.append(Damage(self._rel(files.meta_path), f"is unreadable: {err.detail}", number))
        else:
            if meta is None:
                damage.append(Damage(self._rel(files.meta_path), "is missing", number))
        return state, meta, damage

    def _artifact_damage(self, state: WorldState) -> Iterator[tuple[str, str]]:
        """(path, problem) for each artifact of a saved state the world would not serve."""
        for ref in state.artifacts or []:
            try:
                target = self.artifact_path(ref)
            except UnsafePathError:
                yield ref.path, "points outside the world"
                continue
            try:
                problem = self._file_problem(target, os.stat(target))
            except FileNotFoundError:
                problem = "is missing"
            except OSError as err:
                problem = f"is unreadable: {err.strerror}"
            if problem:
                yield ref.path, problem

    def _content_damage(self) -> list[Damage]:
        try:
            content = self.load_content()
        except ConfigError as err:
            return [Damage(self._rel(self.content_path), f"is unreadable: {err.detail}")]
        if content is None and self.episodes():
            return [
                Damage(self._rel(self.content_path), "is missing (the story and history of the episodes)")
            ]
        return []

    def _progress_damage(self) -> list[Damage]:
        """Bad lines of the progress journal; repairable when the resume point (its last good line) is readable."""
        try:
            data = self._read(self.progress_path)
        except ConfigError as err:
            return [Damage(self._rel(self.progress_path), f"is unreadable: {err.detail}")]
        if data is None:
            return []
        lines = data.split(b"\n")
        bad = []
        for number, line in enumerate(lines[:-1], 1):  # lines[-1] is b"" or a line cut short by a crash
            try:
                Progress.model_validate_json(line)
            except ValidationError:
                bad.append(str(number))
        if not bad:
            return []
        try:
            repairable = self.load_progress() is not None
        except ConfigError:
            repairable = False
        problem = f"has bad line(s) {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}"
        return [Damage(self._rel(self.progress_path), problem, None, repairable)]

    # ---------------------------------------------------------------- report

    def write_report(self) -> Path:
        """Write report.md and report.html (atomically) from the content and every episode, newest last, images
        inline through relative links; returns the path of the HTML report."""
        content = self.load_content() or WorldContent()
        episodes = [(n, *self._load_episode(n)) for n in self.episodes()]
        atomic_write_text(self.report_markdown_path, report_markdown(content, episodes, link=self._link))
        atomic_write_text(self.report_path, report_html(content, episodes, link=self._link))
        self._publish(self.report_markdown_path, self.report_path)
        return self.report_path

    # ---------------------------------------------------------------- internals

    def _assemble(
        self,
        folder: Path,
        final: Path,
        state: WorldState,
        sources: list[Path],
        *,
        step: int,
        action: str | None,
        ran: list[str],
        number: int,
        references: list[ReferenceUse],
    ) -> WorldState:
        """Write one episode's files into `folder` (to be renamed to `final`); returns the state as saved."""
        refs = []
        for i, (ref, source) in enumerate(zip(state.artifacts or [], sources, strict=True)):
            if not source.is_file():
                raise StorageError(
                    f"artifact {ref.path} of state {state.id} does not exist (looked at {source})"
                )
            name = f"{i:03d}{source.suffix.lower()}"
            update: dict[str, Any] = {"path": (final / name).relative_to(self.root).as_posix()}
            if ref.sha256 and (ref.kind != "image" or None not in (ref.width, ref.height)):
                _link_synced(
                    source, folder / name
                )  # refs written by save_artifacts: no need to read the file
            else:  # a file adopted from elsewhere: measured here
                data = source.read_bytes()
                _write_synced(folder / name, data)
                update["sha256"] = hashlib.sha256(data).hexdigest()
                if ref.kind == "image" and (ref.width is None or ref.height is None):
                    update["width"], update["height"] = _image_size(data)
            preview = self.artifact_path(ref.preview) if ref.preview else None
            if preview is not None and preview.is_file():  # a video's thumbnail goes with it
                _link_synced(preview, folder / f"{i:03d}.preview{preview.suffix.lower()}")
                update["preview"] = (
                    (final / f"{i:03d}.preview{preview.suffix.lower()}").relative_to(self.root).as_posix()
                )
            else:
                update["preview"] = None
            refs.append(ref.model_copy(update=update))
        saved = state.model_copy(update={"artifacts": refs})
        meta = EpisodeMeta(
            episode=number,
            state_id=state.id,
            step=step,
            action=action,
            ran=list(ran),
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **({"references": list(references)} if references else {}),  # recorded only when there are some
        )
        files = EpisodeFolder(folder)
        _write_synced(files.state_path, (saved.model_dump_json(indent=2) + "\n").encode())
        _write_synced(
            files.meta_path, (json.dumps(meta.recorded(), indent=2, ensure_ascii=False) + "\n").encode()
        )
        # episode.md is derived from state.json and meta.json (`repair` rebuilds it): no fsync needed
        files.page_path.write_bytes(_episode_page(number, saved, meta).encode())
        return saved

    def _clean_tmp(self) -> None:
        """Remove half-assembled episodes left by a crash."""
        if self.episodes_dir.is_dir():
            for leftover in self.episodes_dir.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def _episodes_signature(self) -> tuple[int, int]:
        """Changes whenever an entry of the episodes folder is added, removed or renamed."""
        try:
            info = os.stat(self.episodes_dir)
        except FileNotFoundError:
            return (0, 0)
        return (info.st_mtime_ns, info.st_nlink)

    def _index_is_cached(self) -> bool:
        if self.store is not None:  # the one writer keeps its own: built once per process from the commits
            return self._index_cache is not None
        return self._index_cache is not None and self._index_cache[0] == self._episodes_signature()

    def _index(self) -> dict[str, int]:
        """state id -> episode number: from memory while the episodes folder is unchanged, else from
        index.jsonl when it agrees with the folders, else rebuilt from the episodes' state.json and rewritten."""
        if self.store is not None:
            if self._index_cache is None:
                commits = self._commits()
                index = {state_id: n for n, state_id in commits}
                self._index_cache = ((0, 0), index, commits[-1][0] if commits else 0)
            return dict(self._index_cache[1])
        signature = self._episodes_signature()
        if self._index_cache is not None and self._index_cache[0] == signature:
            return dict(self._index_cache[1])
        numbers = self.episodes()
        index = self._read_index()
        if sorted(index.values()) != numbers:
            index = {}
            for n in numbers:
                state = _read_model(self.episode_folder(n).state_path, WorldState)
                if state is not None:
                    index[state.id] = n
            if numbers or self.index_path.exists():
                self._write_index(index)
            signature = self._episodes_signature()
        self._index_cache = (signature, index, numbers[-1] if numbers else 0)
        return dict(index)

    def _read_index(self) -> dict[str, int]:
        """state id -> episode number as index.jsonl says (a line cut short by a crash is skipped)."""
        index: dict[str, int] = {}
        try:
            lines = self.index_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return index
        for line in lines:
            try:
                entry = json.loads(line)
                index[str(entry["state_id"])] = int(entry["episode"])
            except (ValueError, KeyError, TypeError):
                continue
        return index

    def _write_index(self, index: Mapping[str, int]) -> None:
        lines = "".join(json.dumps({"episode": n, "state_id": k}) + "\n" for k, n in index.items())
        atomic_write_text(self.index_path, lines, durable=False)

    def _link(self, ref: ArtifactRef) -> str | None:
        """A URL-quoted link from the root to an existing artifact, or None when it is unsafe or missing."""
        try:
            target = self.artifact_path(ref)
        except UnsafePathError:
            return None
        if self.store is not None:  # the report links committed episodes' files, which the commit says exist
            return quote(self._key(target))
        if not target.is_file():
            return None
        return quote(target.relative_to(self._resolved_root()).as_posix())


# ---------------------------------------------------------------- helpers


def _check_id(state_id: str) -> str:
    """A state id usable as a folder name (letters, digits, `_.-`; no leading dot)."""
    if not isinstance(state_id, str) or not _SAFE_ID.match(state_id):
        raise UnsafePathError(
            f"state id {state_id!r}: expected 1-128 letters, digits, '_', '.' or '-' (first a letter or digit)"
        )
    return state_id


def _same_file(path: Path, info: os.stat_result) -> bool:
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino)


def _plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts and lists (what YAML can dump)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normalize_config(config: Mapping[str, Any]) -> Any:
    """A config as world.yaml stores it and reads it back (tuples as lists, keys as strings), for telling whether
    two configs describe the same world."""
    return yaml.safe_load(yaml.safe_dump(_plain(config), sort_keys=True))


def _episode_page(number: int, state: WorldState, meta: EpisodeMeta) -> str:
    """An episode's own Markdown page: its artifacts sit beside it, so each link is the file's name."""
    return episode_markdown(number, state, meta, link=lambda ref: PurePosixPath(ref.path).name)


def _write_model(path: Path, model: BaseModel) -> None:
    atomic_write_text(path, model.model_dump_json(indent=2) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed JSON: {err.msg}", file=str(path), path=f"line {err.lineno}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", file=str(path)) from None


def _read_model(path: Path, cls: type[_M]) -> _M | None:
    """Parse a JSON file into `cls`; None when missing; a bad file raises ConfigError naming file and field."""
    if not path.is_file():
        return None
    return _validate(_read_json(path), cls, str(path))


def _parse_model(data: bytes, cls: type[_M], label: str) -> _M:
    """Parse JSON bytes (a file read from a store, `label` its URI) into `cls`."""
    try:
        value = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed JSON: {err.msg}", file=label, path=f"line {err.lineno}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read: {err}", file=label) from None
    return _validate(value, cls, label)


def _validate(data: Any, cls: type[_M], label: str) -> _M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"not a valid {cls.__name__}: {format_validation_error(err)}", file=label) from None


def _media(items: Any) -> list[Media]:
    """Media values from Media values, images (see `_pictures`), or a list of either."""
    if isinstance(items, Media):
        return [items]
    if isinstance(items, (list, tuple)) and any(isinstance(item, Media) for item in items):
        return [m for item in items for m in _media(item)]
    return [Media("image", picture) for picture in _pictures(items)]


def _pictures(images: Any) -> list[Any]:
    """PIL images from a tensor/array batch, a PIL image, or a list of either."""
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return [p for item in images for p in _pictures(item)]
    return to_pil(images)


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.width, picture.height
    except Exception:  # not an image PIL knows: the size stays unknown
        return None, None


def _link_synced(source: Path, target: Path) -> None:
    """Give the episode its own name for an in-flight file (a hard link: no copy; the in-flight name is removed
    afterwards) and make its data durable; a copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
