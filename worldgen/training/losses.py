"""Per-role training losses on a world's own blocks (plain PyTorch: the Ray Train job distributes them).

- `denoising_loss`: the diffusion fine-tuning loss on a Creator graph's own blocks, for every family — VAE-encode
  the image (a clip: the graph's video codec, Wan's), noise it at a random training timestep by the loop solver's forward
  process (DDPM with the graph's scheduler config, or rectified flow), condition the backbone through the graph's
  own conditioning nodes (for image to video also the image the clip started from), MSE against the solver's
  target (the scheduler's `prediction_type`, or the flow's velocity).
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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from worldgen.block import Block, ModelBlock, training
from worldgen.errors import ConfigError
from worldgen.execution.local import check_inputs
from worldgen.graph import Graph
from worldgen.nodes.diffusion import scale_latent
from worldgen.plan import Loop, gather_inputs
from worldgen.ports import PortKind
from worldgen.training.examples import (
    CaptionExample,
    DiffusionBlocks,
    Example,
    ImageExample,
    TextExample,
    VideoExample,
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
]

IGNORE_INDEX = -100  # label of a token the loss ignores (the prompt)


def _model(block: Block) -> Any:
    """The block's model with the block's LoRA adapter active — what calling the block would run."""
    return block.active_model() if isinstance(block, ModelBlock) else block.model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ---- diffusion ----------------------------------------------------------------------------------------
def _encode(codec: Block, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> scaled latents, as the `codec/vae` encoder computes them (sampled); clips
    (B, F, 3, H, W) -> the video codec's own normalised latents (B, C, F', h, w), sampled likewise."""
    if pixels.ndim == 5:
        if not hasattr(codec, "training_latent"):
            raise ConfigError(
                f"the graph's codec ({codec.block_type}) encodes images, not clips: a video needs a video codec "
                "(codec/wan_vae)",
                path="stages.creator",
            )
        return codec.training_latent(pixels, generator)
    vae = _model(codec)
    first = next(vae.parameters())
    pixels = (pixels * 2.0 - 1.0).to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist.sample(generator=generator)
    return scale_latent(vae, latent)


_LOOP_PORTS = ("sample", "timestep")  # what the denoising loop feeds the backbone (the loss supplies them)
_NOISE_SOURCES = ("latent/noise", "latent/video_noise")  # where a graph's latent path starts (the loss's own)


def _is_uncond(port: str) -> bool:
    return port.endswith("_uncond")  # the guidance branch: the loss trains the conditioned prediction only


def _conditioning_nodes(graph: Graph, node: str, loop: Loop) -> set[str]:
    """The nodes outside the loop that the backbone's conditioning depends on (not the guidance branch)."""
    plan = graph.plan()
    needed: set[str] = set()
    stack = [
        edge.source
        for port in graph.item(node).input_ports()
        if port not in _LOOP_PORTS and not _is_uncond(port)
        for edge in plan.incoming.get((node, port), [])
        if edge.source not in loop.nodes
    ]
    while stack:
        current = stack.pop()
        if current in needed:
            continue
        needed.add(current)
        for port in graph.item(current).input_ports():
            stack += [e.source for e in plan.incoming.get((current, port), []) if e.source not in loop.nodes]
    return needed


def _latent_path(graph: Graph, node: str, loop: Loop) -> list[tuple[str, str, str]]:
    """The layout steps between the latent the noise (or VAE) makes and the one the backbone takes — e.g. Flux's
    packing — as (node, input port, output port), in order: the loss applies them to its own latents."""
    plan = graph.plan()
    setup = [e for e in plan.incoming.get((node, "sample"), []) if e.source not in loop.nodes]
    if not setup:
        return []
    path: list[tuple[str, str, str]] = []
    current, port = setup[0].source, "latent"  # the solver's setup call: its `latent` input
    while True:
        edges = plan.incoming.get((current, port), [])
        if len(edges) != 1:
            break
        source = graph.item(edges[0].source)
        if source.block_type in _NOISE_SOURCES or source.role == "codec":
            break
        path.append((edges[0].source, _latent_input(source), edges[0].source_port))
        current, port = edges[0].source, _latent_input(source)
    return list(reversed(path))


def _latent_input(block: Block) -> str:
    ports = [name for name, p in block.input_ports().items() if p.kind is PortKind.LATENT]
    return ports[0] if ports else "latent"


def _run_nodes(graph: Graph, nodes: set[str], inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Outputs of `nodes`, called in plan order (no loop among them) with what gather_inputs gives them."""
    values: dict[str, dict[str, Any]] = {}
    for step in graph.plan().steps:
        for node_id in step.nodes:
            if node_id in nodes and step.loop is None:
                values[node_id] = graph.item(node_id)(**gather_inputs(graph, node_id, values, inputs))
    return values


def denoising_loss(
    blocks: DiffusionBlocks,
    images: torch.Tensor,
    prompts: Sequence[str],
    generator: torch.Generator,
    *,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the backbone's prediction at random training timesteps (one per image).

    The graph conditions the backbone itself: its nodes outside the denoising loop that feed the backbone
    (tokenizers, text encoders, SDXL's time ids, Flux's position ids, ...) run on the prompts, with gradients,
    so one loss trains every family. The images' latents (VAE-encoded) are noised by the loop solver's forward
    process (`training_sample`: DDPM's for UNet families, rectified flow for SD3/Flux), put in the backbone's
    layout by the graph's own layout nodes (Flux's packing), and the prediction is compared with the solver's
    target. `images` (B, 3, H, W) in [0, 1], or clips (B, F, 3, H, W) in [0, 1] for a video graph (Wan: the
    clip's latent is 5-D, the graph's video codec encodes it); `prompts` one per image or clip; `source`
    (B, 3, H, W): the image each clip started from, the `image` input of an image-to-video graph (its nodes make
    the first-frame condition and the CLIP-vision embeddings from it, as when generating). The codec's latent
    sample, the noise and the timesteps are drawn from `generator`, in that order."""
    clips = images.ndim == 5
    channels = images.shape[2] if clips else images.shape[1] if images.ndim == 4 else None
    if channels != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            "expected images (B, 3, H, W) or clips (B, F, 3, H, W) and B prompts, got "
            f"{tuple(images.shape)} and {len(prompts)}"
        )
    if source is not None and (not clips or source.shape[0] != images.shape[0]):
        raise ValueError(f"a source image (B, 3, H, W) goes with B clips, got {tuple(source.shape)}")
    graph, node = blocks.graph, blocks.backbone_node
    loop = next(lp for lp in graph.plan().loops if node in lp.nodes)
    latents = _encode(blocks.codec, images, generator)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
    noisy, timesteps, target = blocks.solver.training_sample(latents, noise, generator)

    offered: dict[str, Any] = {
        "prompt": list(prompts),
        "height": images.shape[-2],
        "width": images.shape[-1],
        "image": source if clips else images,
    }
    if clips:
        offered["frames"] = images.shape[1]
    inputs = check_inputs(graph, {k: v for k, v in offered.items() if k in graph.exposed_inputs})
    with training():
        values = _run_nodes(graph, _conditioning_nodes(graph, node, loop), inputs)
        for step_node, port, output in _latent_path(graph, node, loop):
            kwargs = gather_inputs(graph, step_node, values, inputs)
            block = graph.item(step_node)
            noisy = block(**{**kwargs, port: noisy})[output]
            target = block(**{**kwargs, port: target})[output]
        kwargs = gather_inputs(graph, node, values, inputs, loop=loop, outside_only=True)
        kwargs = {k: v for k, v in kwargs.items() if not _is_uncond(k)}
        pred = blocks.backbone(**{**kwargs, "sample": noisy, "timestep": timesteps})["pred"]
    if kwargs.get("first_frame") is not None:
        # Wan 2.2 image to video: the image's latent is the first latent frame, given (at timestep 0), not
        # generated; only the frames after it are learned
        pred, target = pred[:, :, 1:], target[:, :, 1:]
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
    if isinstance(example, VideoExample):
        return denoising_loss(
            _creator_blocks(world, example.pipeline),
            example.video,
            [example.prompt],
            generator,
            source=example.image,
        )
    if isinstance(example, TextExample):
        return causal_lm_loss(find_block(world, example.block), example.messages, example.target)
    if isinstance(example, CaptionExample):
        return caption_loss(find_block(world, example.block), example.image, example.target)
    raise TypeError(f"not a training example: {type(example).__name__}")


def batch_loss(world: Any, examples: Sequence[Example], generator: torch.Generator) -> torch.Tensor:
    """The mean of the examples' losses (each example weighs the same). Creator examples of one pipeline and
    size (images, or clips of one frame count) share one batched denoising pass; the rest run one by one."""
    if not examples:
        raise ValueError("batch_loss needs at least one example")
    # one pipeline's examples of one size (and, for clips, one frame count) stack into one batch
    groups: dict[tuple[str, int, int, int], list[ImageExample | VideoExample]] = {}
    total: torch.Tensor | None = None
    for example in examples:
        if isinstance(example, (ImageExample, VideoExample)):
            frames = example.frames if isinstance(example, VideoExample) else 0
            key = (example.pipeline, example.height, example.width, frames)
            groups.setdefault(key, []).append(example)
            continue
        loss = example_loss(world, example, generator)
        total = loss if total is None else total + loss
    for (pipeline, _, _, frames), group in groups.items():
        prompts = [x.prompt for x in group]
        blocks = _creator_blocks(world, pipeline)
        if frames:  # clips, each with the image it started from (image to video) or none
            clips = torch.cat([x.video for x in group])
            sources = [x.image for x in group if x.image is not None]
            source = torch.cat(sources) if len(sources) == len(group) else None
            loss = denoising_loss(blocks, clips, prompts, generator, source=source)
        else:
            loss = denoising_loss(blocks, torch.cat([x.image for x in group]), prompts, generator)
        total = loss * len(group) if total is None else total + loss * len(group)
    return total / len(examples)
