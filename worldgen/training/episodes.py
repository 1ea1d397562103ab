"""Episodes as training data: a world's own recorded episodes, or a folder a person writes by hand.

`read_episodes(path)` accepts three layouts, all holding one folder per episode named by its number:

```
<world>/episodes/000001/...    a world directory (what `worldgen run` writes)
<folder>/episodes/000001/...   any folder with an `episodes/` inside
<folder>/000001/...            a folder of episode folders (e.g. written by hand)
```

One episode folder holds:

- `state.json` (required): the five blocks, either as the world writes them (`WorldState`:
  `{"happening": "...", "generation": {...}, "artifacts": [{"path": "000.png"}], "description": "...",
  "outcome": "..."}`) or numbered the way `World.step(state=...)` takes them:
  `{"1": "what is supposed to happen", "2": {"prompt": "...", "width": 512, "height": 512},
  "3": ["000.png"], "4": "what the pictures show", "5": "what really happened"}`.
  Any block may be missing: an episode then trains only the roles whose blocks it has. Without an `id` the
  episode gets a stable one derived from the file's bytes.
- `meta.json` (optional): what the world recorded when it saved the episode — `step` (the step in which
  World update saved it), `action` (the visitor's action Development was given) and `ran`; a hand-written
  one may add `content` (the world's content — title, story, history, glossary, style, rules — as the
  episode's stages saw it), which makes the rebuilt prompts exact (see `worldgen.training.examples`).
- the artifact files block 3 names (PNG or any image PIL reads; clips as MP4 or WebM, decoded with PyAV). A
  path is looked up relative to the episode folder, then relative to the world root (the folder holding
  `episodes/`, as the world writes them: `episodes/000001/000.png`), then as a file of the same name in the
  episode folder (so episode folders copied out of a world keep working). Absolute paths are taken as they are.

Images come back as float tensors (1, 3, H, W) in [0, 1], one per image artifact; clips as (1, F, 3, H, W) in
[0, 1], one per video artifact (sounds are not read: nothing trains on them yet). A bad `state.json` or
`meta.json`, or a missing or unreadable image or clip, raises a ConfigError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import ValidationError

from worldgen.errors import ConfigError, format_validation_error
from worldgen.state import ArtifactRef, EpisodeMeta, WorldState
from worldgen.storage import EpisodeFolder, WorldStorage

__all__ = ["Episode", "episode_folders", "read_episode", "read_episodes", "load_image", "load_video"]

_NUMBER = re.compile(r"^\d+$")
_STATE_FIELDS = set(WorldState.model_fields)


@dataclass(frozen=True)
class Episode:
    """One episode read back: its number, five blocks, meta, its images (one per image artifact) and its clips
    (one per video artifact), each in block 3's order."""

    number: int
    state: WorldState
    meta: EpisodeMeta
    folder: Path
    images: list[torch.Tensor] = field(default_factory=list)  # (1, 3, H, W) float32 in [0, 1]
    image_paths: list[Path] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)  # (1, F, 3, H, W) float32 in [0, 1]
    video_paths: list[Path] = field(default_factory=list)

    @property
    def filled(self) -> set[int]:
        return self.state.filled()

    @property
    def state_path(self) -> Path:
        """The file the five blocks were read from (errors about them name it)."""
        return EpisodeFolder(self.folder).state_path


def episode_folders(path: str | Path) -> tuple[Path, list[tuple[int, Path]]]:
    """(world root, [(number, episode folder)] ascending) for any of the accepted layouts."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            "no such folder (expected a world directory or a folder of episodes)", file=str(path)
        )
    episodes = WorldStorage(path).episodes_dir  # where a world keeps them
    folder, root = (episodes, path) if episodes.is_dir() else (path, path.parent)
    found: dict[int, Path] = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and _NUMBER.match(child.name):
            number = int(child.name)
            if number in found:
                raise ConfigError(
                    f"two folders for episode {number}: '{found[number].name}' and '{child.name}'",
                    file=str(folder),
                )
            found[number] = child
    if not found:
        raise ConfigError(
            "no episodes here: expected numbered episode folders (000001/state.json, ...), directly or in "
            "an episodes/ folder",
            file=str(path),
        )
    return root, sorted(found.items())


def read_episodes(path: str | Path, *, numbers: list[int] | None = None) -> list[Episode]:
    """Every episode under `path` (a world directory or a folder of episodes), oldest first; `numbers`
    picks some. Each is read completely (images included) or the call fails naming the file."""
    root, folders = episode_folders(path)
    wanted = None if numbers is None else set(numbers)
    if wanted is not None and (missing := wanted - {n for n, _ in folders}):
        raise ConfigError(f"no episode(s) {sorted(missing)} here", file=str(path))
    return [
        read_episode(folder, number, root=root)
        for number, folder in folders
        if wanted is None or number in wanted
    ]


def read_episode(folder: str | Path, number: int | None = None, *, root: str | Path | None = None) -> Episode:
    """One episode folder; `number` defaults to the folder's name, `root` (where world-relative artifact paths
    start) to the folder's grandparent, as in a world directory."""
    folder = Path(folder)
    number = int(folder.name) if number is None else int(number)
    root = Path(root) if root is not None else folder.parent.parent
    files = EpisodeFolder(folder)
    state = _read_state(files.state_path)
    meta = files.read_meta() or EpisodeMeta()
    images, paths, videos, video_paths = [], [], [], []
    for i, ref in enumerate(state.artifacts or []):
        if ref.kind not in ("image", "video"):
            continue
        where = f"artifacts.{i}.path"
        path = _find_artifact(ref, folder, root, where=(files.state_path, where))
        if ref.kind == "image":
            images.append(load_image(path))
            paths.append(path)
        else:
            videos.append(load_video(path, field=where))
            video_paths.append(path)
    return Episode(number, state, meta, folder, images, paths, videos, video_paths)


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a float tensor (1, 3, H, W) in [0, 1] (RGB)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise ConfigError(f"cannot read image: {err}", file=str(path)) from None
    return torch.from_numpy(array / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_video(path: str | Path, *, field: str | None = None) -> torch.Tensor:
    """A clip file (MP4, WebM: anything PyAV decodes) as a float tensor (1, F, 3, H, W) in [0, 1] (RGB);
    `field` is the block-3 field that named it, for the error when it cannot be decoded."""
    import av
    import numpy as np

    from worldgen.media import read_frames

    try:
        frames = read_frames(path)
    except (av.error.FFmpegError, OSError, ValueError) as err:  # damaged, truncated, no video stream
        raise ConfigError(f"cannot read video: {err}", file=str(path), path=field) from None
    array = np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in frames])
    return torch.from_numpy(array / 255.0).permute(0, 3, 1, 2).unsqueeze(0).contiguous()


def _read_json(path: Path) -> tuple[Any, bytes]:
    """(the parsed file, its bytes)."""
    try:
        raw = path.read_bytes()
        return json.loads(raw.decode("utf-8")), raw
    except FileNotFoundError:
        raise ConfigError("missing (every episode folder needs one)", file=str(path)) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"malformed JSON: {err.msg}", file=str(path), path=f"line {err.lineno}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", file=str(path)) from None


def _read_state(path: Path) -> WorldState:
    """state.json in either form (the world's field names, or numbered blocks); the error names the field."""
    data, raw = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object of blocks, got {type(data).__name__}", file=str(path))
    numbered = [k for k in data if str(k).isdigit()]
    if numbered and len(numbered) + ("id" in data) == len(data):
        blocks = {k: v for k, v in data.items() if k != "id"}
        try:
            state = WorldState.from_blocks(blocks, where="state")
        except ConfigError as err:
            raise ConfigError(err.detail, file=str(path), path=err.path) from None
        state = state.model_copy(update={"id": data["id"]}) if "id" in data else state
    else:
        unknown = sorted(set(data) - _STATE_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown}; a state has {sorted(_STATE_FIELDS)} (or blocks numbered 1 to 5)",
                file=str(path),
                path=unknown[0],
            )
        try:
            state = WorldState.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err), file=str(path)) from None
    if "id" not in data:  # stable across reads (the default would be a fresh random id each time)
        state = state.model_copy(update={"id": "hand-" + hashlib.sha1(raw).hexdigest()[:24]})
    return state


def _find_artifact(ref: ArtifactRef, folder: Path, root: Path, *, where: tuple[Path, str]) -> Path:
    """The file of a block-3 reference (see the module doc for the places looked at, in order)."""
    raw = PurePosixPath(ref.path.replace("\\", "/"))
    candidates = [Path(raw)] if raw.is_absolute() else [folder / raw, root / raw, folder / raw.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(
        f"{ref.kind} '{ref.path}' not found (looked at: {looked})", file=str(where[0]), path=where[1]
    )
