"""The in-process model pool (worldgen/models/pool.py): one load per key, private copies, concurrent gets, failed
loads not cached."""

from __future__ import annotations

import threading
import time

import pytest
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from worldgen.block import ModelRef
from worldgen.errors import ModelLoadError
from worldgen.models import (
    ModelPool,
    default_pool,
)


def _counting_loader(delay: float = 0.0):
    calls = []

    def loader(ref, cls):
        calls.append(ref.identity_key())
        time.sleep(delay)
        return object()

    return loader, calls


def test_pool_loads_once_per_key():
    pool = ModelPool()
    ref = ModelRef(source="preset:tiny", subfolder="vae")
    vae = pool.get(ref, AutoencoderKL)
    assert pool.get(ModelRef(source="preset:tiny", subfolder="vae"), AutoencoderKL) is vae
    assert pool.load_count(ref) == 1 and pool.loads == 1 and ref in pool and len(pool) == 1
    loader, calls = _counting_loader()
    other = pool.get(ref, CLIPTokenizer, loader=loader)  # same model, another class: its own entry
    assert other is not vae and len(pool) == 2 and pool.load_count(ref) == 2
    assert pool.unload(ref) == 2 and ref not in pool and len(pool) == 0
    pool.get(ref, CLIPTokenizer, loader=loader)
    assert len(calls) == 2
    pool.clear()
    assert pool.keys() == [] and pool.loads == 3


def test_pool_reuse_false_gives_private_copies():
    pool = ModelPool()
    loader, calls = _counting_loader()
    ref = ModelRef(source="x", reuse=False)
    a, b = pool.get(ref, object, loader=loader), pool.get(ref, object, loader=loader)
    assert a is not b and len(calls) == 2 and len(pool) == 0 and pool.load_count(ref) == 2


def test_pool_concurrent_get_loads_once():
    pool = ModelPool()
    loader, calls = _counting_loader(delay=0.05)
    ref = ModelRef(source="x")
    results: list[object] = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(pool.get(ref, object, loader=loader))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8 and all(r is results[0] for r in results)


def test_failed_load_is_not_cached():
    pool = ModelPool()
    with pytest.raises(ModelLoadError):
        pool.get(ModelRef(source="preset:nope", subfolder="unet"), UNet2DConditionModel)
    assert len(pool) == 0 and pool.loads == 0


def test_default_pool_is_shared():
    assert default_pool() is default_pool()
