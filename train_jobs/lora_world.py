"""Train a world's LoRA adapters with Ray Train on the world's own episodes; write a custom world.

    worldgen train worlds/harbor --out worlds/harbor-lora --workers 2 --epochs 3
    ray job submit --working-dir . -- python -m worldgen train worlds/harbor --out /shared/harbor-lora

Every worker loads the base world, attaches the same adapters (worldgen/lora.py: base weights frozen, the
optimizer sees the adapters only), wraps them in DDP (`ray.train.torch.prepare_model`: gloo on CPU, NCCL on
GPU) and trains on its shard of the per-role examples (worldgen/training/). Every step's metrics go to the
run's `metrics.jsonl` (and the log); each epoch ends with `ray.train.report`: the loss on a fixed held-out
batch, the epoch's step losses, and a checkpoint holding only the adapters (PEFT format, safetensors), the
optimizer state (safetensors) and the step count. Running the same command again
resumes from the latest checkpoint. The result is a custom world directory: `world.yaml` naming the base world,
`adapters/`, and `training.json` (the loss curve).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worldgen.errors import ConfigError, format_validation_error
from worldgen.lora import (
    TRAINING_ADAPTER,
    LoraSettings,
    attach_adapters,
    base_state_dict,
    save_adapters,
    trainable_parameters,
)
from worldgen.storage import WorldStorage
from worldgen.storage_io import atomic_write_text

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class TrainConfig(BaseModel):
    """One training run: the base world, its data, the adapters and the schedule."""

    model_config = ConfigDict(extra="forbid")
    world: str = Field(description="the base world's directory (its episodes are the data by default)")
    out: str = Field(description="the custom world directory to write (world.yaml + adapters/)")
    episodes: str | None = Field(None, description="a folder of episodes instead of the world's own")
    roles: list[str] | None = Field(None, description="roles to train (default: every trainable role)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    epochs: int = Field(2, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="default: one pass over each worker's shard")
    batch_size: int = Field(2, ge=1, description="examples per worker per step")
    learning_rate: float = Field(1e-3, gt=0)
    held_out: int = Field(2, ge=1, description="examples kept out of training for the held-out loss")
    seed: int = Field(0, ge=0)
    storage: str | None = Field(None, description="Ray Train storage (default: <out>/training)")
    name: str = Field("lora", description="the Ray Train run's name (its folder under `storage`)")

    def adapter_settings(self) -> LoraSettings:
        """`lora`, with the trained roles as its roles unless it names its own."""
        if self.roles is None or self.lora.roles is not None:
            return self.lora
        return self.lora.model_copy(update={"roles": self.roles})

    def storage_path(self) -> Path:
        return Path(self.storage or Path(self.out) / "training").expanduser().resolve()


# ---- the worker side -----------------------------------------------------------------------------------
class AdapterLoss(torch.nn.Module):
    """The world's adapted models as one module, so DDP sees (and averages) every adapter's gradients; its
    forward is the loss of a batch of examples on the world's blocks."""

    def __init__(self, world: Any, models: list[Any]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)
        self.world = world

    def forward(self, examples: list[Any], seed: int) -> torch.Tensor:
        from worldgen.training import batch_loss

        return batch_loss(self.world, examples, torch.Generator().manual_seed(seed))


def base_digest(models: list[Any]) -> str:
    """SHA-256 of every weight that is not an adapter's: equal before and after training."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(base_state_dict(model).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_examples(examples: list[Any], held_out: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a fixed, seeded choice of `held_out` examples, the same in every worker."""
    if len(examples) <= held_out:
        raise ConfigError(
            f"{len(examples)} examples: too few to hold {held_out} out and train on the rest; record more "
            "episodes (or lower held_out)",
            path="held_out",
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_out])
    return [x for i, x in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def save_training_state(
    directory: Path, targets: list[Any], optimizer: Any, config: TrainConfig, state: dict[str, Any]
) -> None:
    """A checkpoint: the adapters (PEFT), the optimizer's tensors (safetensors) and the step count (JSON)."""
    from safetensors.torch import save_file

    save_adapters(targets, directory / "adapters", config.lora)
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, slots in optimizer_state["state"].items()
        for key, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, directory / OPTIMIZER_FILE)
    state = {**state, "param_groups": optimizer_state["param_groups"]}
    atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")


def load_training_state(directory: Path, targets: list[Any], optimizer: Any) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns the trainer state (epoch, step, history)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for target in targets:
        weights = load_file(directory / "adapters" / target.key / "adapter_model.safetensors")
        set_peft_model_state_dict(target.model, weights, adapter_name=TRAINING_ADAPTER)
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(directory / OPTIMIZER_FILE).items():
        index, _, name = key.partition(".")
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    return state


def log_step(cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """One training step's metrics, appended to `<storage>/<name>/metrics.jsonl` and printed.

    Not `ray.train.report`: on Ray 2.60 (Train V2) a report waits until the controller collects the previous
    one, which it does every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so a report per step would cost ~2 s per
    step. Epochs end with a report (its metrics carry the epoch's step losses) and a checkpoint."""
    folder = cfg.storage_path() / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**metrics, "time": time.time()}) + "\n")
    print(f"epoch {metrics['epoch']} step {metrics['step']}: loss {metrics['loss']:.4f}", flush=True)


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (`TorchTrainer(train_loop, train_loop_config=TrainConfig...)`)."""
    import ray.train
    import ray.train.torch

    from worldgen.training import build_examples, read_episodes
    from worldgen.world import World

    cfg = TrainConfig.model_validate(config)
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    world = World.load(cfg.world)  # its models load in this worker, through the process pool
    examples = build_examples(world, read_episodes(cfg.episodes or cfg.world), cfg.roles)
    train, held = split_examples(examples, cfg.held_out, cfg.seed)
    torch.manual_seed(cfg.seed)  # the same fresh adapters in every worker (DDP also broadcasts rank 0's)
    targets = attach_adapters(world, cfg.adapter_settings())
    models = [t.model for t in targets]
    before = base_digest(models)
    module = ray.train.torch.prepare_model(
        AdapterLoss(world, models), parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    optimizer = torch.optim.AdamW(trainable_parameters(targets), lr=cfg.learning_rate)

    def held_out_loss() -> float:
        with torch.no_grad():  # fixed examples, fixed noise: comparable from epoch to epoch
            return float(module(held, seed=cfg.seed))

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder), targets, optimizer)
    else:
        state = {"epoch": 0, "step": 0, "history": [], "initial_held_out_loss": held_out_loss()}
    shard_size = math.ceil(len(train) / size)
    steps = cfg.steps_per_epoch or max(1, math.ceil(shard_size / cfg.batch_size))
    for epoch in range(state["epoch"], cfg.epochs):
        order = list(range(len(train)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)  # the same order everywhere; a shard each
        shard = order[rank::size] or order
        losses, started = [], time.perf_counter()
        for i in range(steps):
            batch = [train[shard[(i * cfg.batch_size + j) % len(shard)]] for j in range(cfg.batch_size)]
            loss = module(batch, seed=cfg.seed * 1_000_003 + state["step"] * 101 + rank)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            losses.append(float(loss.detach()))
            if rank == 0:  # per-step metrics: a line in the run's metrics.jsonl and in the worker's log
                log_step(cfg, {"epoch": epoch + 1, "step": state["step"], "loss": losses[-1]})
        seconds = time.perf_counter() - started  # training steps only (not the held-out pass, the checkpoint)
        held_loss = held_out_loss()
        state["epoch"] = epoch + 1
        state["history"].append(
            {
                "epoch": epoch + 1,
                "step": state["step"],
                "loss": sum(losses) / len(losses),
                "held_out_loss": held_loss,
                "samples": steps * cfg.batch_size * size,
                "seconds": seconds,
            }
        )
        metrics = {
            "epoch": epoch + 1,
            "step": state["step"],
            "held_out_loss": held_loss,
            "loss": losses[-1],
            "step_losses": losses,
        }
        if epoch + 1 == cfg.epochs:
            metrics |= {"base_digest_before": before, "base_digest_after": base_digest(models)}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:  # the adapters are the same in every worker after DDP's averaged steps
                save_training_state(Path(folder), targets, optimizer, cfg, state)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)


# ---- the driver side -----------------------------------------------------------------------------------
def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Run the training job (Ray must be reachable) and write the custom world; returns the final state."""
    import ray.train
    from ray.train.torch import TorchTrainer

    try:
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    except ValidationError as err:
        raise ConfigError(f"training config: {format_validation_error(err)}") from None
    base = Path(cfg.world).expanduser().resolve()
    if not WorldStorage.is_world(base):
        raise ConfigError(f"no world at {base} (no {WorldStorage(base).config_path.name})", path="world")
    cfg = cfg.model_copy(update={"world": str(base), "out": str(Path(cfg.out).expanduser().resolve())})
    storage = cfg.storage_path()
    # The same name and storage: Ray Train restores the run and `get_checkpoint()` returns its latest
    # checkpoint in every worker (Train V2's job-level restoration), so running again resumes.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ConfigError(f"training {cfg.name} produced no checkpoint", path="epochs")
    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
        write_custom_world(cfg, Path(folder) / "adapters", state)
    return {**state, "metrics": result.metrics, "out": cfg.out}


def write_custom_world(cfg: TrainConfig, adapters: Path, state: dict[str, Any]) -> Path:
    """`out/world.yaml` (the base world + the adapters), `out/adapters/`, `out/training.json`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".adapters.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapters, staging)
    shutil.rmtree(out / "adapters", ignore_errors=True)
    staging.rename(out / "adapters")
    world = WorldStorage(out)
    if not world.exists():  # a world that already ran keeps its config (and its episodes)
        custom = {"schema_version": 1, "kind": "world", "base": cfg.world, "adapters": "adapters"}
        world.save_config({**custom, "name": f"{Path(cfg.world).name}-lora"})
    history = {k: state[k] for k in ("epoch", "step", "initial_held_out_loss", "history")}
    atomic_write_text(
        out / "training.json", json.dumps({"config": cfg.model_dump(), **history}, indent=2) + "\n"
    )
    return out
