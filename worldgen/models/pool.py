"""In-process model pool: one shared instance per (model identity, class), loaded once, thread-safe."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from worldgen.model_ref import ModelRef
from worldgen.models.loading import load_component

Loader = Callable[[ModelRef, type], Any]
PoolKey = tuple[str, str]


def _class_name(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


class ModelPool:
    """Shares loaded models: every `get` of the same reference and class returns the same instance.

    A reference with `reuse=False` gets a fresh private copy on every call (never stored in the pool).
    """

    def __init__(self) -> None:
        self._items: dict[PoolKey, Any] = {}
        self._lock = threading.Lock()  # guards the dicts below (held briefly)
        self._key_locks: dict[PoolKey, threading.Lock] = {}  # one per key: a load holds only its own key
        self._counts: Counter[str] = Counter()  # loads per identity key (shared and private)
        self._total = 0

    @staticmethod
    def key(ref: ModelRef, cls: type) -> PoolKey:
        """Pool key of a reference loaded as `cls`."""
        return (ref.identity_key(), _class_name(cls))

    def _count(self, ref: ModelRef) -> None:
        with self._lock:
            self._counts[ref.identity_key()] += 1
            self._total += 1

    def get(self, ref: ModelRef, cls: type, loader: Loader = load_component) -> Any:
        """The shared instance of `ref` as `cls` (loaded on first use), or a private copy when `ref.reuse` is False."""
        if not ref.reuse:
            obj = loader(ref, cls)
            self._count(ref)
            return obj
        key = self.key(ref, cls)
        with self._lock:
            if key in self._items:
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        # Loading happens outside the pool lock, so different models load in parallel while two threads
        # asking for the same one wait for a single load.
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            obj = loader(ref, cls)
            with self._lock:
                self._items[key] = obj
                self._counts[ref.identity_key()] += 1
                self._total += 1
            return obj

    def load_count(self, ref: ModelRef) -> int:
        """How many times the model `ref` identifies was loaded (any class, shared or private)."""
        with self._lock:
            return self._counts[ref.identity_key()]

    @property
    def loads(self) -> int:
        """Total number of loads this pool performed."""
        with self._lock:
            return self._total

    def keys(self) -> list[PoolKey]:
        """(identity key, class name) of every shared instance held."""
        with self._lock:
            return list(self._items)

    def unload(self, ref: ModelRef) -> int:
        """Drop every shared instance of `ref` (any class); returns how many were dropped."""
        ident = ref.identity_key()
        with self._lock:
            gone = [k for k in self._items if k[0] == ident]
            for k in gone:
                del self._items[k]
            return len(gone)

    def clear(self) -> None:
        """Drop every shared instance (load counts are kept: they count history)."""
        with self._lock:
            self._items.clear()

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, ModelRef):
            return False
        ident = ref.identity_key()
        with self._lock:
            return any(k[0] == ident for k in self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


_DEFAULT: ModelPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> ModelPool:
    """The process-wide pool that blocks use unless given another."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ModelPool()
        return _DEFAULT
