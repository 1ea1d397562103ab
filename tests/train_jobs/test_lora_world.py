"""LoRA training with Ray Train: 2 CPU workers (gloo), held-out loss, frozen base, resume, the custom world."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.worldgen.nodes.test_vision import tiny_vlm_dir  # noqa: F401 - the tiny captioner fixture
from tests.worldgen.test_world import fast_config
from train_jobs.lora_world import train
from worldgen.errors import ConfigError
from worldgen.lora import adapter_bytes, read_manifest, world_weight_bytes
from worldgen.world import World

# custom worlds and training attach adapters to pooled models: they leave the pool with this module
pytestmark = pytest.mark.usefixtures("own_model_pool")


@pytest.fixture(scope="module")
def base_world(tmp_path_factory):
    """A tiny world with 5 recorded episodes (its first step saves none)."""
    world = World.from_config(fast_config(), tmp_path_factory.mktemp("base") / "harbor")
    world.run(6)
    return world.storage.root


def png(world_dir, episode: int = 1) -> np.ndarray:
    return np.asarray(Image.open(world_dir / "episodes" / f"{episode:06d}" / "000.png")).astype(int)


def test_two_workers_train_then_resume_and_write_a_custom_world(base_world, tmp_path, clean_hosts):
    config = {
        "world": str(base_world),
        "out": str(tmp_path / "custom"),
        "workers": 2,
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "held_out": 1,
        "learning_rate": 3e-3,
        "lora": {"rank": 4, "alpha": 8},
    }
    first = train(config)
    assert [h["step"] for h in first["history"]] == [2, 4]
    metrics = first["metrics"]
    assert metrics["base_digest_before"] == metrics["base_digest_after"]  # base weights bit-identical

    resumed = train({**config, "epochs": 4})  # the same run, longer: continues from its latest checkpoint
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6, 8]
    assert resumed["history"][:2] == first["history"]  # nothing was redone
    # the curve goes on as if never stopped: adapters, optimizer state and data order all came back
    straight = train({**config, "epochs": 4, "out": str(tmp_path / "straight")})
    for after_resume, uninterrupted in zip(resumed["history"], straight["history"], strict=True):
        for key in ("loss", "held_out_loss"):
            assert after_resume[key] == pytest.approx(uninterrupted[key], rel=1e-5), (key, after_resume)
    assert resumed["initial_held_out_loss"] == first["initial_held_out_loss"]
    held = [resumed["initial_held_out_loss"], *(h["held_out_loss"] for h in resumed["history"])]
    assert held[-1] < held[0], held  # the fixed held-out batch's loss goes down
    assert resumed["metrics"]["base_digest_before"] == resumed["metrics"]["base_digest_after"]

    out = tmp_path / "custom"
    training = json.loads((out / "training.json").read_text())
    assert training["step"] == 8 and len(training["history"]) == 4
    ratio = adapter_bytes(out / "adapters") / world_weight_bytes(World.load(base_world))
    assert ratio < 0.05, ratio

    custom = World.load(out)  # world.yaml names the base; adapters/ holds what was trained
    custom.run(2)
    assert not np.array_equal(png(out), png(base_world))  # same seed, other weights


def test_bad_training_configs_name_the_field(base_world, tmp_path):
    with pytest.raises(ConfigError, match="workers"):
        train({"world": str(base_world), "out": str(tmp_path / "x"), "workers": 0})
    with pytest.raises(ConfigError, match="no world at"):
        train({"world": str(tmp_path / "nowhere"), "out": str(tmp_path / "x")})


@pytest.fixture(scope="module")
def vlm_world(tmp_path_factory, tiny_vlm_dir):  # noqa: F811 - the fixture imported above
    """A tiny world whose Philosopher is a local captioner (vlm/transformers), with 4 recorded episodes."""
    config = fast_config()
    config["stages"]["philosopher"] = {
        "name": "philosopher",
        "nodes": {
            "describe": {
                "type": "vlm/transformers",
                "config": {"model": str(tiny_vlm_dir), "max_new_tokens": 6},
            }
        },
        "inputs": {"images": "describe.images"},
        "outputs": {"text": "describe.text"},
    }
    world = World.from_config(config, tmp_path_factory.mktemp("vlm") / "harbor")
    world.run(5)
    return world.storage.root


def test_a_vlm_philosophers_adapter_trains(vlm_world, tmp_path, clean_hosts):
    from safetensors.torch import load_file

    out = tmp_path / "custom"
    result = train(
        {
            "world": str(vlm_world),
            "out": str(out),
            "roles": ["philosopher"],
            "workers": 1,
            "epochs": 1,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "held_out": 1,
            "learning_rate": 1e-2,
            "lora": {"rank": 4, "alpha": 8},
        }
    )
    assert list(read_manifest(out / "adapters")["adapters"]) == ["philosopher.main.describe"]
    weights = load_file(out / "adapters" / "philosopher.main.describe" / "adapter_model.safetensors")
    # the captioner's language model only (GPT-2's self- and cross-attention), never its image encoder
    assert {k.rsplit(".lora_", 1)[0] for k in weights} == {
        "decoder.transformer.h.0.attn.c_attn",
        "decoder.transformer.h.0.crossattention.c_attn",
    }
    ups = [v for k, v in weights.items() if ".lora_B." in k]
    assert ups and all(float(b.abs().sum()) > 0 for b in ups)  # B starts at 0: only training moves it
    assert np.isfinite(result["history"][-1]["loss"])
    assert result["metrics"]["base_digest_before"] == result["metrics"]["base_digest_after"]

    custom = World.load(out)  # the custom world's Philosopher describes with its adapter (loaded from PEFT)
    custom.run(2)
    describe = dict(custom.named_blocks())["philosopher.main.describe"]
    assert describe.config.adapter is not None
    assert describe.config.adapter.name in describe.model.__dict__["_worldgen_adapters"]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_world_of_another_family_trains(family, tmp_path, clean_hosts):
    """`worldgen train` on an SDXL or Flux world: adapters on the backbone and every text encoder, the base
    untouched, and the custom world draws differently."""
    config = fast_config()
    config["stages"]["creator"] = {
        "template": "text_to_image",
        "params": {"preset": "tiny", "family": family, "steps": 2},
    }
    config["stages"]["architect"]["nodes"]["llm"]["config"]["template"] = (
        '{"prompt": "a ship at dawn", "width": 32, "height": 32, "steps": 2}'  # a short prompt: the tiny T5 vocabulary spells most words letter by letter
    )
    world = World.from_config(config, tmp_path / "base")
    world.run(4)
    out = tmp_path / "custom"
    result = train(
        {
            "world": str(world.storage.root),
            "out": str(out),
            "roles": ["creator"],
            "workers": 1,
            "epochs": 1,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "held_out": 1,
            "learning_rate": 1e-2,
            "lora": {"rank": 4, "alpha": 8},
        }
    )
    adapters = set(read_manifest(out / "adapters")["adapters"])
    backbone = {"sdxl": "creator.text_to_image.unet", "flux": "creator.text_to_image.flux"}[family]
    encoders = {"creator.text_to_image.te", "creator.text_to_image.te_2"}
    assert backbone in adapters and encoders <= adapters, adapters
    assert np.isfinite(result["history"][-1]["loss"])
    assert result["metrics"]["base_digest_before"] == result["metrics"]["base_digest_after"]
    custom = World.load(out)
    custom.run(2)
    assert not np.array_equal(png(out), png(world.storage.root))  # same seed, other weights
