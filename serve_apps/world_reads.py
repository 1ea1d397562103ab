"""What the world gateway answers from a world's storage when its driver cannot answer (dead, restarting, not
running): the saved things, read through `WorldStorage`'s public methods only, so a root that is a URI
(s3://...) works here as soon as the storage takes one.

The answers have the shapes the driver's own (actors/world_driver.WorldDriver) have, so a client cannot tell
them apart but by `info()["driver"]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldgen.state import WorldState
from worldgen.storage import WorldStorage
from worldgen.stores import is_uri, open_store


def open_root(root: str) -> Path | str:
    """The gateway's world root, made ready to hold worlds: a local (or NFS) folder, created when missing, or a
    store URI (s3://...) every replica on every node reaches, checked to answer (a StoreError naming `root`)."""
    if is_uri(root):
        open_store(root, setting="the gateway's root")
        return root.rstrip("/")
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def saved_info(storage: WorldStorage, directory: str) -> dict[str, Any]:
    """`WorldDriver.info()` as the storage alone tells it: no process, the step of the last resume point."""
    config = storage.load_config()
    content = storage.load_content()
    progress = storage.load_progress()
    episodes = storage.episodes()
    return {
        "name": config.get("name"),
        "title": content.title if content is not None else None,
        "directory": directory,
        "actor": None,
        "step": progress.step if progress is not None else 0,
        "stage_index": progress.stage_index if progress is not None else 0,
        "running": False,
        "pid": None,
        "episodes": len(episodes),
        "last_episode": episodes[-1] if episodes else None,
        "resumed": None,
        "restarted": None,
        "started": None,
    }


def saved_state(storage: WorldStorage) -> dict[str, Any]:
    """`WorldDriver.state()`: the state of the last resume point (an empty one before the first stage)."""
    progress = storage.load_progress()
    state = progress.state if progress is not None else WorldState()
    return state.model_dump(mode="json")


def saved_episodes(storage: WorldStorage, offset: int, limit: int) -> dict[str, Any]:
    """`WorldDriver.episodes(offset, limit)`: a page of saved episodes, oldest first (as `World.history`)."""
    numbers = storage.episodes()
    items = []
    for number in numbers[offset : offset + limit]:
        state, meta = storage.load_episode(number)
        items.append({"episode": number, "state": state.model_dump(mode="json"), **meta})
    return {"total": len(numbers), "offset": offset, "limit": limit, "items": items}
