"""LoRA worlds: adapters on a world's model blocks, frozen bases, PEFT-format files, custom worlds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.worldgen.test_world import fast_config
from worldgen.errors import ConfigError
from worldgen.lora import (
    TRAINING_ADAPTER,
    LoraSettings,
    adapter_bytes,
    attach_adapters,
    save_adapters,
    trainable_parameters,
    world_weight_bytes,
)
from worldgen.world import World

# custom worlds and training attach adapters to pooled models: they leave the pool with this module
pytestmark = pytest.mark.usefixtures("own_model_pool")


def two_pipeline_config(executor: str = "local") -> dict:
    """The tiny world whose Creator has two pipelines on the same models (one model object each)."""
    config = fast_config(executor)
    params = {"preset": "tiny", "steps": 2}
    config["stages"]["creator"] = {
        "pipelines": {
            "text_to_image": {"template": "text_to_image", "params": params},
            "image_to_image": {"template": "image_to_image", "params": params},
        }
    }
    return config


def trained_adapters(world: World, directory, seed: int) -> None:
    """Adapters as if trained: random non-zero B (a fresh adapter has B = 0 and changes nothing)."""
    settings = LoraSettings(rank=4, alpha=8)
    targets = attach_adapters(world, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ((n, p) for t in targets for n, p in t.model.named_parameters()):
            if "lora_B" in name and param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_adapters(targets, directory, settings)


def custom_world_dir(tmp_path, base_dir, adapters, name: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "world.yaml").write_text(
        f"schema_version: 1\nkind: world\nbase: {base_dir}\nadapters: {adapters}\nname: {name}\n"
    )
    return folder


def first_png(world: World) -> np.ndarray:
    state, _ = world.storage.load_episode(1)
    return np.asarray(Image.open(world.storage.artifact_path(state.artifacts[0])))


def test_adapters_go_on_every_eligible_model_once_and_everything_else_is_frozen(tmp_path):
    world = World.from_config(two_pipeline_config(), tmp_path / "w")
    before = {n: p.detach().clone() for n, b in world.named_blocks() if hasattr(b, "lora_targets")
              and b.lora_targets is not False for n, p in [(n + ":" + k, v) for k, v in b.model.state_dict().items()]}  # fmt: skip
    targets = attach_adapters(world, LoraSettings(rank=2))
    keys = {t.key.rsplit(".", 1)[-1]: len(t.blocks) for t in targets}
    assert keys == {"te": 4, "unet": 2}  # tokenizer and VAE take no adapter; a shared model gets one
    params = trainable_parameters(targets)
    assert params and len({id(p) for p in params}) == len(params)
    for target in targets:
        for name, param in target.model.named_parameters():
            assert param.requires_grad == (f".{TRAINING_ADAPTER}." in name), name  # others: frozen
    llm_blocks = [b for p, b in world.named_blocks() if p.startswith("author")]
    assert all(
        getattr(b, "lora_targets", False) is False for b in llm_blocks
    )  # llm/template: nothing to train
    with pytest.raises(ConfigError, match="no block of this world can take a LoRA adapter"):
        attach_adapters(world, LoraSettings(roles=["author"]))
    # a fresh adapter (B = 0) leaves the base weights and the outputs unchanged
    after = {n: p for n, b in world.named_blocks() if hasattr(b, "lora_targets") and b.lora_targets is not False
             for n, p in [(n + ":" + k, v) for k, v in b.model.state_dict().items()]}  # fmt: skip
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)


def test_saved_adapters_are_peft_files_a_small_fraction_of_the_base(tmp_path):
    world = World.from_config(fast_config(), tmp_path / "w")
    folder = tmp_path / "adapters"
    trained_adapters(world, folder, seed=1)
    manifest = json.loads((folder / "adapters.json").read_text())
    assert set(manifest["adapters"]) == {"creator.text_to_image.te", "creator.text_to_image.unet"}
    for key in manifest["adapters"]:
        config = json.loads((folder / key / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
    ratio = adapter_bytes(folder) / world_weight_bytes(world)
    assert ratio < 0.05, ratio  # rank 4 on the tiny world: ~1.5 %


def test_a_custom_world_differs_from_its_base_and_the_base_is_untouched(tmp_path):
    base = World.from_config(fast_config(), tmp_path / "base")
    base.run(2)
    trained_adapters(World.from_config(fast_config(), tmp_path / "trainer"), tmp_path / "adapters", seed=2)
    custom = World.load(custom_world_dir(tmp_path, base.storage.root, tmp_path / "adapters", "noir"))
    assert custom.settings.name == "noir"
    custom.run(2)
    again = World.from_config(fast_config(), tmp_path / "base-again")  # same seed, same process, same models
    again.run(2)
    assert not np.array_equal(first_png(custom), first_png(base))
    assert np.array_equal(first_png(again), first_png(base))  # base blocks run with adapters off
    # the custom world's directory keeps the reference, not a copy of the base config
    saved = custom.storage.load_config()
    assert saved["base"] == str(base.storage.root.resolve()) and "stages" not in saved
    assert not np.array_equal(first_png(World.load(custom.storage.root)), first_png(base))


def test_bad_custom_worlds_name_the_field(tmp_path):
    base = World.from_config(fast_config(), tmp_path / "base")
    folder = custom_world_dir(tmp_path, tmp_path / "missing", tmp_path / "adapters", "lost")
    with pytest.raises(ConfigError, match=r"world\.yaml, at base"):
        World.load(folder)
    folder = custom_world_dir(tmp_path, base.storage.root, tmp_path / "no-adapters", "bare")
    with pytest.raises(ConfigError, match=r"adapters\.json.*(at adapters|no adapter manifest)"):
        World.load(folder)


def test_two_custom_worlds_on_one_base_share_its_host_actors(tmp_path, clean_hosts):
    from actors.model_host import list_hosts

    base = World.from_config(fast_config("ray"), tmp_path / "base")
    base.run(2)
    for i in (1, 2):
        trained_adapters(World.from_config(fast_config(), tmp_path / f"t{i}"), tmp_path / f"a{i}", seed=i)
    worlds = [
        World.load(custom_world_dir(tmp_path, base.storage.root, tmp_path / f"a{i}", f"custom{i}"))
        for i in (1, 2)
    ]
    for world in worlds:
        assert world.settings.executor == "ray"  # from the base config
        world.run(2)
    pictures = [first_png(w) for w in (base, *worlds)]
    assert not np.array_equal(pictures[0], pictures[1]) and not np.array_equal(pictures[1], pictures[2])
    hosts = list_hosts()
    unet = [h for h in hosts if h["class"].endswith("UNet2DConditionModel")]
    assert len(unet) == 1 and len(unet[0]["adapters"]) == 2  # one base actor, an adapter per custom world
    assert len([h for h in hosts if h["class"].endswith("CLIPTextModel")]) == 1
    # the same custom world run locally gives the same picture
    (tmp_path / "local").mkdir()
    local_config = tmp_path / "local" / "world.yaml"
    local_config.write_text(
        f"schema_version: 1\nkind: world\nbase: {base.storage.root}\nadapters: {tmp_path / 'a1'}\n"
        "name: custom1\nexecutor: local\n"
    )
    local = World.from_config(local_config, tmp_path / "local-run")
    local.run(2)
    assert np.abs(first_png(local).astype(int) - pictures[1].astype(int)).max() <= 1


def test_checkpoints_of_a_shared_model_never_carry_adapters(tmp_path):
    """A custom world attaches adapters to the models this process shares; a base graph saved afterwards still
    holds exactly the base weights under their own names, and loads into fresh models."""
    from safetensors import safe_open

    import worldgen as wg

    trained_adapters(World.from_config(fast_config(), tmp_path / "t"), tmp_path / "a", seed=3)
    graph = wg.Graph.from_template("text_to_image", preset="tiny")
    before = graph.run({"prompt": "a harbor", "height": 32, "width": 32, "steps": 2}, seed=0)["image"]
    saved = graph.save(tmp_path / "saved")
    with safe_open(str(saved / "checkpoint.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())  # noqa: SIM118
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k]
    after = wg.Graph.load(saved).run({"prompt": "a harbor", "height": 32, "width": 32, "steps": 2}, seed=0)[
        "image"
    ]
    assert torch.equal(before, after)
