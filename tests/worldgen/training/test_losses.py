"""The denoising loss (worldgen/training/losses.py) trains every family through the graph's own conditioning:
deterministic for a seeded generator, gradients into the backbone and every text encoder (never the VAE), the
objective the loop's solver sets (DDPM for UNet families, rectified flow for SD3/Flux), and a few steps on the
LoRA adapters lower it."""

from __future__ import annotations

import pytest
import torch

import worldgen as wg
from worldgen.block import ModelBlock
from worldgen.training.examples import diffusion_blocks
from worldgen.training.losses import denoising_loss

FAMILIES = ("sd", "sdxl", "sd3", "flux")
PROMPTS = ["a red house by the sea", "a ship at dawn"]

# training puts gradients (and adapters) on pooled models: they leave the pool with this module
pytestmark = pytest.mark.usefixtures("own_model_pool")


def _graph(family: str) -> wg.Graph:
    return wg.Graph.from_template("text_to_image", preset="tiny", family=family, steps=2)


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _grad(model: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_reaches_the_backbone_and_every_text_encoder(family):
    graph = _graph(family)
    parts = diffusion_blocks(graph)
    loss = denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(3))
    again = denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(3))
    other = denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(4))
    assert torch.isfinite(loss) and torch.equal(loss, again) and not torch.equal(loss, other)
    models = {
        block.config.model.subfolder: block.model
        for _, block in graph.blocks()
        if isinstance(block, ModelBlock)
    }
    for model in models.values():
        if isinstance(model, torch.nn.Module):
            model.zero_grad(set_to_none=True)
    loss.backward()
    encoders = [name for name in models if name.startswith("text_encoder")]
    assert len(encoders) == {"sd": 1, "sdxl": 2, "sd3": 3, "flux": 2}[family]
    for name in ["unet" if "unet" in models else "transformer", *encoders]:
        assert _grad(models[name]) > 0, f"no gradient reached {name}"
    assert _grad(models["vae"]) == 0  # the latents are data, not something to learn
    assert not graph.run({"prompt": PROMPTS[0]}, seed=0)[
        "image"
    ].requires_grad  # inference: no autograd graph


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_objective_is_the_solvers(family, monkeypatch):
    """Flux learns the flow's velocity (noise - x), SD the noise: replacing the target changes the loss."""
    parts = diffusion_blocks(_graph(family))
    base = denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(1))
    original = type(parts.solver).training_sample

    def zero_target(self, latents, noise, generator):
        noisy, timesteps, target = original(self, latents, noise, generator)
        return noisy, timesteps, torch.zeros_like(target)

    monkeypatch.setattr(type(parts.solver), "training_sample", zero_target)
    assert not torch.equal(base, denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_lora_steps_lower_the_loss(family):
    from peft import LoraConfig, get_peft_model

    graph = _graph(family)
    parts = diffusion_blocks(graph)
    backbone = parts.backbone
    targets = backbone.lora_target_modules()
    model = get_peft_model(backbone.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    backbone.set_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) < 0.5 * sum(p.numel() for p in model.parameters())

    def score() -> float:
        with torch.no_grad():
            return float(denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(7)))

    before = score()
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(6):
        optimizer.zero_grad()
        denoising_loss(parts, _images(), PROMPTS, torch.Generator().manual_seed(7)).backward()
        optimizer.step()
    assert score() < before


# ---- Wan: clips, a video codec, the image-to-video condition ------------------------------------------------
WAN_PRESETS = {"image_to_video": "wan-i2v-tiny", "text_to_video": "wan-tiny"}


def _clips() -> torch.Tensor:
    return torch.rand(
        2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )  # 5 frames: 2 latent frames


def _sources(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task", list(WAN_PRESETS))
def test_a_wan_clip_trains_the_transformer_through_the_graphs_own_conditioning(task):
    graph = wg.Graph.from_template(task, preset=WAN_PRESETS[task], steps=2)
    parts = diffusion_blocks(graph)
    source = _sources() if task == "image_to_video" else None

    def loss(seed: int, given: torch.Tensor | None = source) -> torch.Tensor:
        return denoising_loss(parts, _clips(), PROMPTS, torch.Generator().manual_seed(seed), source=given)

    first = loss(3)
    assert torch.isfinite(first) and torch.equal(first, loss(3)) and not torch.equal(first, loss(4))
    models = {b.config.model.subfolder: b.model for _, b in graph.blocks() if isinstance(b, ModelBlock)}
    for model in models.values():
        if isinstance(model, torch.nn.Module):
            model.zero_grad(set_to_none=True)
    first.backward()
    assert _grad(models["transformer"]) > 0 and _grad(models["text_encoder"]) > 0
    assert _grad(models["vae"]) == 0  # the clip's latent and the first-frame condition are data
    if task == "image_to_video":
        assert _grad(models["image_encoder"]) > 0  # the CLIP-vision embeddings come from the graph's own node
        # the first-frame condition and the image embeddings are the source's: another image, another loss
        assert not torch.equal(first.detach(), loss(3, _sources(seed=2)))


def test_wan22_learns_only_the_frames_it_generates(monkeypatch):
    """Wan 2.2 image to video (expand_timesteps): the image's latent is the first latent frame, at timestep 0 in
    every step; the loss learns the frames after it, whatever the target says there."""
    parts = diffusion_blocks(wg.Graph.from_template("image_to_video", preset="wan22-ti2v-tiny", steps=2))

    def loss() -> torch.Tensor:
        return denoising_loss(parts, _clips(), PROMPTS, torch.Generator().manual_seed(3), source=_sources())

    base = loss()
    assert torch.isfinite(base)
    original = type(parts.solver).training_sample

    def shifted(self, latents, noise, generator, where):
        noisy, timesteps, target = original(self, latents, noise, generator)
        target = target.clone()
        target[:, :, where] += 10.0
        return noisy, timesteps, target

    monkeypatch.setattr(type(parts.solver), "training_sample", lambda *a: shifted(*a, where=0))
    assert torch.equal(loss(), base)  # the given first frame is no target
    monkeypatch.setattr(type(parts.solver), "training_sample", lambda *a: shifted(*a, where=1))
    assert loss() > base + 1


def test_wan_learns_the_flow_velocity_at_its_shifted_sigmas():
    """Wan's UniPC solver (flow_prediction, flow sigmas shifted by 3): x_t = (1 - s) x + s noise at the
    timestep 1000 s, target noise - x — not DDPM's noising, which would not match how the model samples."""
    parts = diffusion_blocks(wg.Graph.from_template("image_to_video", preset="wan-i2v-tiny", steps=2))
    assert parts.solver.block_type == "solver/unipc"
    latents, noise = torch.randn(2, 64, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # 64 clips
    noisy, timesteps, target = parts.solver.training_sample(latents, noise, torch.Generator().manual_seed(5))
    sigma = (timesteps / 1000).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6)
    assert torch.equal(target, noise - latents)
    # each sigma is a training sigma u = k / 1000 shifted by 3 (3u / (1 + 2u)): undo the shift, find k whole
    unshifted = sigma.flatten() / (3 - 2 * sigma.flatten())
    assert torch.allclose(unshifted * 1000, (unshifted * 1000).round(), atol=1e-2)
    assert len(set(timesteps.tolist())) > 1  # one timestep per latent
