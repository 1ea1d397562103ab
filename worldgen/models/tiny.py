"""Seeded, random-initialised Stable-Diffusion-family components built from configs (no network).

The presets exist for tests, benchmarks and the offline default world: they have the exact shapes and
interfaces of a real Stable Diffusion checkpoint, but tiny widths, so they run in milliseconds on a CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from worldgen.errors import ModelLoadError, did_you_mean

SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# One fixed seed per component (not per preset build), so that building only the UNet gives the same
# weights as building the whole pipeline, in any order.
_SEEDS: dict[str, int] = {"unet": 0, "vae": 1, "text_encoder": 2}

# Stable Diffusion's own scheduler settings (v1.x `scheduler_config.json`).
_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}

_SD_VAE_BLOCKS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
}

_SD_UNET_BLOCKS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}

PRESETS: dict[str, dict[str, Any]] = {
    # For unit tests: as small as diffusers' own pipeline tests (32x32 images, 16x16 latents).
    "tiny": {
        "description": "test-sized SD-family model: 32x32 images, UNet (32, 64), CLIP hidden 32",
        "unet": {
            **_SD_UNET_BLOCKS,
            "block_out_channels": [32, 64],
            "sample_size": 16,
            "cross_attention_dim": 32,
            "norm_num_groups": 32,
            "attention_head_dim": 8,
        },
        "vae": {**_SD_VAE_BLOCKS, "block_out_channels": [32, 64], "sample_size": 32, "norm_num_groups": 32},
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
            "vocab_size": 1000,
            "max_position_embeddings": 77,
            "projection_dim": 32,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
        "scheduler": {"class": "DDIMScheduler", **_SD_SCHEDULER},
    },
    # For benchmarks: tiny but not trivial (64x64 images, 32x32 latents; one UNet call is tens of ms on CPU).
    "small": {
        "description": "benchmark-sized SD-family model: 64x64 images, UNet (32, 64) with 2 layers, CLIP hidden 64",
        # Measured: (64, 128) costs ~85 ms per call (batch 2, 32x32 latents, 2 CPU threads), (32, 64) ~35 ms;
        # the benchmarks want tens of ms, so the width goes into the text side and the latent size instead.
        "unet": {
            **_SD_UNET_BLOCKS,
            "block_out_channels": [32, 64],
            "sample_size": 32,
            "cross_attention_dim": 64,
            "norm_num_groups": 32,
            "attention_head_dim": 8,
        },
        "vae": {**_SD_VAE_BLOCKS, "block_out_channels": [32, 64], "sample_size": 64, "norm_num_groups": 32},
        "text_encoder": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
            "vocab_size": 1000,
            "max_position_embeddings": 77,
            "projection_dim": 64,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
        "scheduler": {"class": "DDIMScheduler", **_SD_SCHEDULER},
    },
}

# Words merged into single tokens so ordinary prompts do not tokenize to characters only.
_WORD_TEXT = """a an the of at in on and with to by photo painting image city harbor dawn dusk night forest
mountain river sea sky cat dog house red blue green world light old small big man woman tree castle street
sun moon snow rain village ship boat"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the 256 base symbols of byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab (bytes, bytes + '</w>', merged words, special tokens) and its BPE merges."""
    base = _bytes_to_unicode()
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    # Longer words first: their chains then outrank short words' merges (e.g. "to" inside "photo").
    for word in sorted(_WORDS, key=len, reverse=True):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right: each step's result is a vocab entry (ranks follow insertion order).
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    tokens += [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer() -> Any:
    """The presets' CLIP tokenizer (identical for every preset)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=_EOS,
    )


def _preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ModelLoadError(
            f"unknown model preset '{preset}'{did_you_mean(preset, PRESETS)}; choices: {', '.join(PRESETS)}"
        )
    return PRESETS[preset]


def _seeded(seed: int, build: Any) -> Any:
    """Run `build()` under a fixed CPU seed without disturbing the caller's global RNG."""
    # fork_rng restores the global CPU generator afterwards; devices=[] avoids touching (or warning about) CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_preset_component(preset: str, subfolder: str) -> Any:
    """Build one component ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler') of a preset, float32, eval mode."""
    cfg = _preset(preset)
    if subfolder not in SUBFOLDERS:
        raise ModelLoadError(
            f"model preset '{preset}' has no component '{subfolder}'{did_you_mean(str(subfolder), SUBFOLDERS)}; "
            f"choices: {', '.join(SUBFOLDERS)}"
        )
    if subfolder == "tokenizer":
        return build_tokenizer()
    if subfolder == "scheduler":
        import diffusers

        sched = dict(cfg["scheduler"])
        return getattr(diffusers, sched.pop("class")).from_config(sched)
    if subfolder == "unet":
        from diffusers import UNet2DConditionModel

        model = _seeded(_SEEDS["unet"], lambda: UNet2DConditionModel(**copy.deepcopy(cfg["unet"])))
    elif subfolder == "vae":
        from diffusers import AutoencoderKL

        model = _seeded(_SEEDS["vae"], lambda: AutoencoderKL(**copy.deepcopy(cfg["vae"])))
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        tok = build_tokenizer()
        # The text encoder must agree with the tokenizer on special ids (the pooled output is taken at EOS).
        config = CLIPTextConfig(
            **cfg["text_encoder"],
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        if config.vocab_size <= len(tok):
            raise ModelLoadError(
                f"preset '{preset}': text encoder vocab {config.vocab_size} <= tokenizer size {len(tok)}"
            )
        model = _seeded(_SEEDS["text_encoder"], lambda: CLIPTextModel(config))
    return model.eval()


def preset_pipeline_components(preset: str) -> dict[str, Any]:
    """All five components of a preset, keyed like `StableDiffusionPipeline`'s constructor arguments."""
    _preset(preset)
    return {name: build_preset_component(preset, name) for name in SUBFOLDERS}


def save_preset_pipeline(preset: str, directory: str | Path) -> Path:
    """Write a preset as a diffusers-format Stable Diffusion directory (safetensors) and return its path."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **preset_pipeline_components(preset),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(directory)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
