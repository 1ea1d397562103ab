"""Per-role training losses on a world's own blocks (plain PyTorch: the Ray Train job distributes them).

- `denoising_loss`: the standard diffusion fine-tuning loss on a Creator graph's blocks — VAE-encode the image,
  add noise at a random training timestep (DDPM forward process from the graph's own scheduler config),
  predict with the UNet conditioned on the prompt, MSE against what the scheduler's `prediction_type` asks for.
- `causal_lm_loss`: a local LLM's mean token cross-entropy of the target after the chat prompt, tokenised as
  generation tokenises it (`encode_chat`), the prompt masked out.
- `caption_loss`: a `vlm/transformers` encoder-decoder captioner's cross-entropy of one image's description.
- `example_loss` / `batch_loss`: the loss of any example from `worldgen.training.examples`, by role.

Randomness (noise, timesteps, the VAE's latent sample) comes only from the `torch.Generator` passed in, so a
fixed held-out batch scored with a fresh generator of a fixed seed gives the same loss every time. The
models are used as they are — never moved, never switched to eval or train mode — and every computation
keeps its graph, so gradients reach whatever parameters require them (LoRA adapters, or everything). The VAE
encoding is the exception, on purpose: the latent is the data the backbone learns to denoise, and letting the
loss reach the encoder would let it make the data trivial.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from worldgen.block import Block, ModelBlock
from worldgen.errors import ConfigError
from worldgen.nodes.diffusion import scale_latent
from worldgen.training.examples import (
    CaptionExample,
    DiffusionBlocks,
    Example,
    ImageExample,
    TextExample,
    diffusion_blocks,
    find_block,
)

__all__ = [
    "IGNORE_INDEX",
    "batch_loss",
    "caption_loss",
    "causal_lm_loss",
    "denoising_loss",
    "encode_lm_example",
    "example_loss",
    "noise_scheduler",
]

IGNORE_INDEX = -100  # label of a token the loss ignores (the prompt)


def _model(block: Block) -> Any:
    """The block's model with the block's LoRA adapter active — what calling the block would run."""
    return block.active_model() if isinstance(block, ModelBlock) else block.model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ---- diffusion -----------------------------------------------------------------------------------------
def noise_scheduler(solver: Block) -> Any:
    """A DDPM scheduler with the solver's noise schedule (what the model was trained on): its `add_noise`
    is the forward process the loss samples from, whatever sampler the graph uses to generate."""
    from diffusers import DDPMScheduler

    config = dict(solver.scheduler.config)
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted})


def _text_embedding(tokenizer: Block, text_encoder: Block, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings as the graph's conditioner computes them (its `forward` runs without gradients)."""
    tokens = tokenizer(text=list(prompts))
    return text_encoder.embed(tokens["token_ids"], tokens["attention_mask"])["embedding"]


def _encode(vae: Any, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents, as the `codec/vae` encoder computes them (sampled)."""
    first = next(vae.parameters())
    pixels = (images * 2.0 - 1.0).to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist.sample(generator=generator)
    return scale_latent(vae, latent)


def denoising_loss(
    blocks: DiffusionBlocks, images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the backbone's prediction at random timesteps (one per image).

    `images` (B, 3, H, W) in [0, 1], `prompts` one per image. The VAE's latent sample, the noise and the
    timesteps are drawn from `generator`, in that order."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            f"expected images (B, 3, H, W) and B prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    scheduler = noise_scheduler(blocks.solver)
    vae, unet = _model(blocks.codec), _model(blocks.backbone)
    count = images.shape[0]
    latents = _encode(vae, images, generator)
    gen_device = generator.device
    noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=torch.float32)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (count,), generator=generator, device=gen_device
    )
    noise, timesteps = noise.to(latents.device, latents.dtype), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    condition = _text_embedding(blocks.tokenizer, blocks.text_encoder, prompts)
    first = next(unet.parameters())
    pred = unet(
        noisy.to(first.dtype), timesteps, encoder_hidden_states=condition.to(first.dtype), return_dict=False
    )[0]
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ConfigError(f"unknown prediction_type '{kind}' in the solver's scheduler config")
    return F.mse_loss(pred.float(), target.float())


# ---- language ------------------------------------------------------------------------------------------
def encode_lm_example(tokenizer: Any, messages: list[dict[str, str]], target: str) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `labels` (batch of one): the chat prompt exactly as generation encodes it,
    then the target's tokens and the end-of-sequence token; labels are IGNORE_INDEX over the prompt."""
    from worldgen.nodes.llm import encode_chat

    prompt = encode_chat(tokenizer, messages)["input_ids"][0]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = [*answer, tokenizer.eos_token_id]
    answer = torch.tensor(answer, dtype=prompt.dtype)
    ids = torch.cat([prompt, answer])
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer])
    return {
        "input_ids": ids[None],
        "attention_mask": torch.ones_like(ids)[None],
        "labels": labels[None],
    }


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each labelled token given the ones before it (logits shifted by one)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
    )


def causal_lm_loss(block: Block, messages: list[dict[str, str]], target: str) -> torch.Tensor:
    """Mean token cross-entropy of `target` (+ end of sequence) after the chat `messages`, for an
    `llm/transformers` block."""
    model = _model(block)
    encoded = encode_lm_example(block.tokenizer, messages, target)
    limit = getattr(model.config, "max_position_embeddings", None)
    length = encoded["input_ids"].shape[1]
    if limit is not None and length > limit:
        raise ConfigError(
            f"{block.block_type}: prompt and target are {length} tokens, more than the model's {limit} positions"
        )
    device = _device(model)
    logits = model(
        input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
    ).logits
    return _token_cross_entropy(logits, encoded["labels"])


def caption_loss(block: Block, image: torch.Tensor, target: str) -> torch.Tensor:
    """Mean token cross-entropy of one image's description for a `vlm/transformers` encoder-decoder captioner
    (image processor + tokenizer, e.g. ViT-GPT2); `image` (1, 3, H, W) in [0, 1]."""
    from worldgen.images import to_pil

    processors = block.processors
    if processors.combined:
        raise ConfigError(
            f"{block.block_type}: training a captioner with a combined processor (BLIP, chat VLMs) is not "
            "supported; encoder-decoder captioners (image processor + tokenizer) are"
        )
    model = _model(block)
    first = next(model.parameters())
    pixels = processors.image(images=to_pil(image), return_tensors="pt").pixel_values
    tokenizer = processors.tokenizer
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    labels = torch.tensor([ids], device=first.device)
    out = model(pixel_values=pixels.to(device=first.device, dtype=first.dtype), labels=labels)
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1))


# ---- by example ----------------------------------------------------------------------------------------
def _creator_blocks(world: Any, pipeline: str) -> DiffusionBlocks:
    creator = world.selecting_stage  # the stage whose pipelines block 2 names
    if pipeline not in creator.node_ids:
        raise ConfigError(f"this world's creator has no pipeline '{pipeline}'")
    blocks = diffusion_blocks(creator.item(pipeline), f"{creator.role}.{pipeline}.")
    if blocks is None:
        raise ConfigError(f"the creator's pipeline '{pipeline}' has no diffusion backbone to train")
    return blocks


def example_loss(world: Any, example: Example, generator: torch.Generator) -> torch.Tensor:
    """The loss of one example on `world`'s blocks (a scalar tensor with a graph)."""
    if isinstance(example, ImageExample):
        return denoising_loss(
            _creator_blocks(world, example.pipeline), example.image, [example.prompt], generator
        )
    if isinstance(example, TextExample):
        return causal_lm_loss(find_block(world, example.block), example.messages, example.target)
    if isinstance(example, CaptionExample):
        return caption_loss(find_block(world, example.block), example.image, example.target)
    raise TypeError(f"not a training example: {type(example).__name__}")


def batch_loss(world: Any, examples: Sequence[Example], generator: torch.Generator) -> torch.Tensor:
    """The mean of the examples' losses (each example weighs the same). Creator examples of one pipeline and
    size share one batched denoising pass; the rest run one by one, in order."""
    if not examples:
        raise ValueError("batch_loss needs at least one example")
    groups: dict[tuple[str, int, int], list[ImageExample]] = {}
    total: torch.Tensor | None = None
    for example in examples:
        if isinstance(example, ImageExample):
            groups.setdefault((example.pipeline, example.height, example.width), []).append(example)
            continue
        loss = example_loss(world, example, generator)
        total = loss if total is None else total + loss
    for (pipeline, _, _), group in groups.items():
        images = torch.cat([x.image for x in group])
        loss = denoising_loss(_creator_blocks(world, pipeline), images, [x.prompt for x in group], generator)
        total = loss * len(group) if total is None else total + loss * len(group)
    return total / len(examples)
