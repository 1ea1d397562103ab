"""Training data and losses for LoRA worlds: a world's recorded episodes become per-role examples, scored by
losses on the world's own blocks (plain PyTorch; the Ray Train job in train_jobs/ distributes it).

    episodes = read_episodes(world.directory)             # or a folder of hand-written episodes
    examples = build_examples(world, episodes)            # per trainable role
    loss = batch_loss(world, examples, torch.Generator().manual_seed(0))
"""

from worldgen.state import EpisodeMeta  # the one model of episode metadata (the storage writes it)
from worldgen.training.episodes import Episode, load_image, load_video, read_episode, read_episodes
from worldgen.training.examples import (
    TRAINED_ROLES,
    CaptionExample,
    DiffusionBlocks,
    Example,
    ImageExample,
    TextExample,
    VideoExample,
    build_examples,
    diffusion_blocks,
    episode_content,
    find_block,
    role_context,
    role_examples,
    stage_llm,
    trainable_roles,
)
from worldgen.training.losses import (
    batch_loss,
    caption_loss,
    causal_lm_loss,
    denoising_loss,
    encode_lm_example,
    example_loss,
)

__all__ = [
    "TRAINED_ROLES",
    "CaptionExample",
    "DiffusionBlocks",
    "Episode",
    "EpisodeMeta",
    "Example",
    "ImageExample",
    "TextExample",
    "VideoExample",
    "batch_loss",
    "build_examples",
    "caption_loss",
    "causal_lm_loss",
    "denoising_loss",
    "diffusion_blocks",
    "encode_lm_example",
    "episode_content",
    "example_loss",
    "find_block",
    "load_image",
    "load_video",
    "read_episode",
    "read_episodes",
    "role_context",
    "role_examples",
    "stage_llm",
    "trainable_roles",
]
