"""Training data for LoRA worlds: a world's episodes read back (and a hand-written folder read the same way),
per-role examples whose inputs are exactly what the stages sent their models, and per-role losses that are
deterministic, reach the weights and go down under plain SGD.

One tiny world runs once for the module: Development, Author and World update on a tiny random causal LM
(`llm/transformers`), the offline Architect and Philosopher (nothing to train), the tiny text-to-image Creator.
A second world with the same models adds a trainable Architect (the LM, JSON output) and Philosopher (a tiny
captioner) and learns from the first world's episodes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.worldgen.nodes.test_llm import CHAT_TEMPLATE, _tiny_causal_lm
from tests.worldgen.nodes.test_vision import tiny_vlm_dir  # noqa: F401 - the tiny captioner fixture
from worldgen.block import ModelBlock
from worldgen.config import load_config_file
from worldgen.errors import ConfigError
from worldgen.nodes.llm import LocalLLM
from worldgen.state import WorldState
from worldgen.training import (
    CaptionExample,
    ImageExample,
    TextExample,
    batch_loss,
    build_examples,
    example_loss,
    find_block,
    read_episodes,
    trainable_roles,
)
from worldgen.training.examples import diffusion_blocks
from worldgen.world import World, stage_context, stage_seed

# custom worlds and training attach adapters to pooled models: they leave the pool with this module
pytestmark = pytest.mark.usefixtures("own_model_pool")

DEFAULT = Path(__file__).parents[3] / "configs" / "worlds" / "default.yaml"


def _llm_stage(model: Path, prompt: str, **config) -> dict:
    llm = {"model": str(model), "system": "file:system.j2", "prompt": prompt, "max_tokens": 6, **config}
    output = "data" if config.get("output") == "json" else "text"
    return {
        "name": "stage",
        "nodes": {"llm": {"type": "llm/transformers", "config": llm}},
        "inputs": {"context": "llm.context"},
        "outputs": {output: f"llm.{output}"},
    }


def _config(lm: Path) -> dict:
    config = load_config_file(DEFAULT)
    config["name"] = "trainable"
    config["generation_defaults"] = {"width": 32, "height": 32, "steps": 2, "guidance": 7.5}
    config["stages"]["creator"] = {"template": "text_to_image", "params": {"preset": "tiny", "steps": 2}}
    for role in ("development", "author", "world_update"):
        config["stages"][role] = _llm_stage(lm, f"file:{role}.j2")
    return config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The world after 3 steps (2 episodes), the chats its LLM blocks were sent (block, messages) in order,
    and its content after each World update (by step)."""
    base = tmp_path_factory.mktemp("training")
    lm = _tiny_causal_lm(base / "lm", CHAT_TEMPLATE, context=4096)
    world = World.from_config(_config(lm), base / "world")
    sent: list[tuple[object, list]] = []
    contents = {}
    generate = LocalLLM.generate

    def recording(self, messages, **call):
        sent.append((self, copy.deepcopy(messages)))
        return generate(self, messages, **call)

    def snapshot(role, what, step):
        if role == "world_update" and what == "ran":
            contents[step] = world.content.model_copy(deep=True)

    world.callbacks.append(snapshot)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalLLM, "generate", recording)
        world.run(3, action="a storm rolls in")
    return {"world": world, "sent": sent, "contents": contents, "lm": lm, "base": base}


def _sent(recorded, role: str) -> list[list]:
    block = find_block(recorded["world"], f"{role}.main.llm")
    return [messages for b, messages in recorded["sent"] if b is block]


def _hand_written(recorded, folder: Path) -> Path:
    """The world's two episodes rewritten by hand in <folder>/episodes/: episode 1 with numbered blocks and no
    id, its image beside it; episode 2 in the world's form (its image path relative to <folder>), with the
    content its stages saw in meta.json."""
    world = recorded["world"]
    first, meta1 = world.storage.load_episode(1)
    _, meta2 = world.storage.load_episode(2)
    one = folder / "episodes" / "000001"
    one.mkdir(parents=True)
    shutil.copy(world.storage.episode_dir(1) / "000.png", one / "picture.png")
    blocks = {
        "1": first.happening,
        "2": first.generation[0].model_dump(mode="json"),  # one request written the old way: a mapping
        "3": ["picture.png"],
        "4": first.description,
        "5": first.outcome,
    }
    (one / "state.json").write_text(json.dumps(blocks))
    (one / "meta.json").write_text(json.dumps({"step": meta1["step"], "action": meta1["action"]}))
    two = folder / "episodes" / "000002"
    shutil.copytree(world.storage.episode_dir(2), two)
    content = recorded["contents"][2].model_dump(mode="json", exclude={"last_state_id"})
    (two / "meta.json").write_text(json.dumps({**meta2, "content": content}))
    return folder


# ---- episodes ------------------------------------------------------------------------------------------
def test_episodes_read_back_with_their_images(recorded, tmp_path):
    world = recorded["world"]
    episodes = read_episodes(world.directory)
    assert [e.number for e in episodes] == [1, 2] == world.storage.episodes()
    for episode in episodes:
        state, meta = world.storage.load_episode(episode.number)
        assert episode.state == state and episode.filled == {1, 2, 3, 4, 5}
        assert episode.meta.step == meta["step"] and episode.meta.action == meta["action"]
        (image,) = episode.images
        assert image.shape == (1, 3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0
    assert [e.meta.action for e in episodes] == ["a storm rolls in", None]
    assert read_episodes(world.directory / "episodes", numbers=[2])[0].state == episodes[1].state

    # by hand: numbered blocks / the world's form; images beside state.json or world-relative; and a copied folder
    hand = read_episodes(_hand_written(recorded, tmp_path / "hand"))
    shutil.copytree(world.storage.episode_dir(1), tmp_path / "copied" / "000007")
    copied = read_episodes(tmp_path / "copied")
    for theirs in (hand, copied):
        ours = episodes[: len(theirs)]
        for mine, other in zip(ours, theirs, strict=True):
            assert other.state.blocks() | {3: None} == mine.state.blocks() | {3: None}
            assert torch.equal(other.images[0], mine.images[0])
    assert hand[0].state.id == read_episodes(tmp_path / "hand")[0].state.id  # stable without an id
    assert copied[0].number == 7


def test_bad_episodes_are_named_by_file_and_field(recorded, tmp_path):
    world = recorded["world"]
    folder = tmp_path / "bad" / "000001"
    shutil.copytree(world.storage.episode_dir(1), folder)
    state = json.loads((folder / "state.json").read_text())

    (folder / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"000001/state\.json.*malformed JSON"):
        read_episodes(tmp_path / "bad")
    (folder / "state.json").write_text(
        json.dumps({**state, "generation": [{**state["generation"][0], "width": 33}]})
    )
    with pytest.raises(ConfigError, match=r"state\.json.*generation\.0\.width.*multiple of 8"):
        read_episodes(tmp_path / "bad")
    (folder / "state.json").write_text(json.dumps({**state, "mood": "grim"}))
    with pytest.raises(ConfigError, match=r"state\.json.*unknown field.*mood"):
        read_episodes(tmp_path / "bad")
    (folder / "state.json").write_text(json.dumps({"1": "x", "3": "not a list"}))
    with pytest.raises(ConfigError, match=r"state\.json.*artifacts"):
        read_episodes(tmp_path / "bad")
    (folder / "state.json").write_text(json.dumps(state))
    meta = (folder / "meta.json").read_text()
    (folder / "meta.json").write_text(json.dumps({"step": 0}))
    with pytest.raises(ConfigError, match=r"meta\.json.*step"):
        read_episodes(tmp_path / "bad")
    (folder / "meta.json").write_text(meta)
    (folder / "000.png").unlink()
    with pytest.raises(
        ConfigError, match=r"state\.json, at artifacts\.0\.path: image 'episodes/000001/000\.png' not found"
    ):
        read_episodes(tmp_path / "bad")
    with pytest.raises(ConfigError, match="no episodes here"):
        read_episodes(tmp_path)


# ---- examples ------------------------------------------------------------------------------------------
def test_examples_are_what_the_stages_were_sent_and_what_the_episodes_hold(recorded, tmp_path):
    world = recorded["world"]
    episodes = read_episodes(world.directory)
    assert trainable_roles(world) == ["development", "creator", "author"]
    examples = build_examples(world, episodes)
    assert {x.role for x in examples} == {
        "development",
        "creator",
        "author",
    }  # llm/template, image_stats: none
    by = {(x.role, x.episode): x for x in examples}
    assert len(by) == len(examples) == 6

    for episode in episodes:
        author = by["author", episode.number]
        assert isinstance(author, TextExample) and author.block == "author.main.llm"
        assert author.target == episode.state.outcome
        assert by["development", episode.number].target == episode.state.happening
        creator = by["creator", episode.number]
        assert isinstance(creator, ImageExample) and creator.pipeline == "text_to_image"
        assert creator.prompt == episode.state.generation[0].prompt
        assert creator.negative_prompt == episode.state.generation[0].negative_prompt
        assert (creator.width, creator.height) == (32, 32) and torch.equal(creator.image, episode.images[0])

    # Episode 1's stages saw the initial content: the rebuilt chats are exactly what the LLM blocks were sent.
    development, author = _sent(recorded, "development"), _sent(recorded, "author")
    assert by["development", 1].messages == development[0]
    assert by["author", 1].messages == author[0]
    assert "a storm rolls in" in development[0][-1]["content"]  # the action went to Development
    # Episode 2's stages saw the story World update wrote, which only a recorded content gives back exactly.
    hand = build_examples(world, read_episodes(_hand_written(recorded, tmp_path / "hand")))
    chats = {(x.role, x.episode): x.messages for x in hand if isinstance(x, TextExample)}
    assert chats == {
        ("development", 1): development[0],
        ("development", 2): development[1],
        ("author", 1): author[0],
        ("author", 2): author[1],
    }
    # without it, the rebuilt content has the true history and the initial story (never a later one)
    context = "\n".join(m["content"] for m in by["author", 2].messages)
    assert episodes[0].state.outcome in context and world.settings.initial_world.story in context


def test_a_trainable_architect_and_philosopher_learn_from_another_worlds_episodes(
    recorded,
    tiny_vlm_dir,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    config = _config(recorded["lm"])
    config["stages"]["architect"] = _llm_stage(
        recorded["lm"], "file:architect.j2", output="json", schema="generation"
    )
    config["stages"]["philosopher"] = {
        "name": "philosopher",
        "nodes": {"describe": {"type": "vlm/transformers", "config": {"model": str(tiny_vlm_dir)}}},
        "inputs": {"images": "describe.images"},
        "outputs": {"text": "describe.text"},
    }
    world = World.from_config(config, tmp_path / "other")
    episodes = read_episodes(recorded["world"].directory)
    assert trainable_roles(world) == ["development", "architect", "creator", "philosopher", "author"]
    examples = {
        (x.role, x.episode): x for x in build_examples(world, episodes, roles=["architect", "philosopher"])
    }
    assert set(examples) == {("architect", 1), ("architect", 2), ("philosopher", 1), ("philosopher", 2)}
    for episode in episodes:
        architect = examples["architect", episode.number]
        assert json.loads(architect.target) == [r.model_dump(mode="json") for r in episode.state.generation]
        step = episode.meta.step - 1  # the Architect ran in the step before the one that saved the episode
        content = world.content.model_copy(
            update={"history": [e.state.outcome for e in episodes[: episode.number - 1]]}
        )
        context = stage_context(
            "architect",
            WorldState(happening=episode.state.happening),
            content,
            action=None,
            step=step,
            pipelines=["text_to_image"],
            defaults=world.settings.generation_defaults.model_dump(),
            seed=stage_seed(world.settings.seed, step, "architect"),
        )
        assert architect.messages == find_block(world, architect.block).messages(context)
        philosopher = examples["philosopher", episode.number]
        assert isinstance(philosopher, CaptionExample) and philosopher.block == "philosopher.main.describe"
        assert episode.state.description == f"Image 1: {philosopher.target}"
        assert torch.equal(philosopher.image, episode.images[0])
    with _own_models(world):
        loss = example_loss(world, examples["philosopher", 1], torch.Generator().manual_seed(0))
        loss.backward()
        vlm = find_block(world, "philosopher.main.describe").model
        assert torch.isfinite(loss) and _grad_norm(vlm) > 0
        assert torch.isfinite(example_loss(world, examples["architect", 1], torch.Generator()))


# ---- losses --------------------------------------------------------------------------------------------
class _own_models:
    """Give the world's model blocks private copies of their models for the duration, and put their adapter
    choice back afterwards (training must not change the models the in-process pool shares with other tests)."""

    def __init__(self, world):
        self.blocks = [b for _, b in world.named_blocks() if isinstance(b, ModelBlock)]

    def __enter__(self):
        self.saved = [(b, b._model, b.model_origin, getattr(b.config, "adapter", None)) for b in self.blocks]
        copies: dict[int, object] = {}
        for block in self.blocks:
            model = block.model
            if isinstance(model, torch.nn.Module):
                if id(model) not in copies:
                    copies[id(model)] = copy.deepcopy(model)
                block.set_model(copies[id(model)])
        return self

    def __exit__(self, *exc):
        for block, model, origin, adapter in self.saved:
            block.set_model(model, origin)
            if adapter is not None or getattr(block.config, "adapter", None) is not None:
                block.config.adapter = adapter


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_losses_are_deterministic_finite_and_reach_the_weights(recorded):
    world = recorded["world"]
    examples = build_examples(world, read_episodes(world.directory))
    with _own_models(world):
        for example in examples:
            first = example_loss(world, example, torch.Generator().manual_seed(3))
            again = example_loss(world, example, torch.Generator().manual_seed(3))
            assert torch.isfinite(first) and first.requires_grad and torch.equal(first, again), example.role
        creator = next(x for x in examples if x.role == "creator")
        other = example_loss(world, creator, torch.Generator().manual_seed(4))
        assert not torch.equal(other, example_loss(world, creator, torch.Generator().manual_seed(3)))
        texts = [x for x in examples if isinstance(x, TextExample)]
        mean = sum(example_loss(world, x, torch.Generator()) for x in texts) / len(texts)
        assert torch.allclose(batch_loss(world, texts, torch.Generator()), mean)

        loss = batch_loss(world, examples, torch.Generator().manual_seed(0))
        assert torch.equal(loss, batch_loss(world, examples, torch.Generator().manual_seed(0)))
        loss.backward()
        parts = diffusion_blocks(world.stages["creator"].item("text_to_image"))
        text_encoder = parts.graph.block("te")  # the graph's own conditioning ran with gradients
        assert _grad_norm(parts.backbone.model) > 0 and _grad_norm(text_encoder.model) > 0
        assert _grad_norm(find_block(world, "development.main.llm").model) > 0
        assert _grad_norm(parts.codec.model) == 0  # the latents are data, not something to learn


def _score(world, examples) -> float:
    """The loss of a fixed batch: same examples, same noise and timesteps every time."""
    with torch.no_grad():
        return float(batch_loss(world, examples, torch.Generator().manual_seed(123)))


def test_plain_sgd_lowers_the_loss_on_held_out_episodes(recorded):
    world = recorded["world"]
    examples = build_examples(world, read_episodes(world.directory))
    with _own_models(world):
        for role, model in (
            ("creator", diffusion_blocks(world.stages["creator"].item("text_to_image")).backbone.model),
            ("development", find_block(world, "development.main.llm").model),
        ):
            train = [x for x in examples if x.role == role and x.episode == 1]
            held_out = [x for x in examples if x.role == role and x.episode == 2]

            before = _score(world, held_out)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05 if role == "creator" else 0.5)
            for step in range(8):
                optimizer.zero_grad()
                batch_loss(world, train, torch.Generator().manual_seed(step)).backward()
                optimizer.step()
            assert _score(world, held_out) < before, role


def test_with_lora_adapters_only_the_adapters_learn(recorded):
    from worldgen.lora import TRAINING_ADAPTER, LoraSettings, attach_adapters, trainable_parameters

    world = recorded["world"]
    examples = [x for x in build_examples(world, read_episodes(world.directory)) if x.role == "creator"]
    with _own_models(world):
        before = batch_loss(world, examples, torch.Generator().manual_seed(5))
        targets = attach_adapters(world, LoraSettings(rank=2, roles=["creator"]))
        loss = batch_loss(world, examples, torch.Generator().manual_seed(5))
        assert torch.allclose(loss, before)  # a fresh adapter changes nothing
        loss.backward()
        for target in targets:
            for name, param in target.model.named_parameters():
                if "lora_B" in name and f".{TRAINING_ADAPTER}." in name:
                    assert param.grad is not None and param.grad.abs().sum() > 0, name
                elif f".{TRAINING_ADAPTER}." not in name:  # base weights (and other worlds' adapters)
                    assert param.grad is None, name
        # gradient descent on one fixed batch (same noise, same timesteps) must lower its loss
        start = _score(world, examples)
        optimizer = torch.optim.SGD(trainable_parameters(targets), lr=0.2)
        for _ in range(3):
            optimizer.zero_grad()
            batch_loss(world, examples, torch.Generator().manual_seed(123)).backward()
            optimizer.step()
        assert _score(world, examples) < start
