"""Stable Diffusion 1.x presets (`tiny`, `small`) and the tokenizers every family's presets share: a CLIP
byte-level BPE over a small vocabulary and a T5 Unigram, both built locally (no network).

The registry and the generic builders are worldgen/models/presets.py; this module registers its presets there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldgen.models.presets import (
    Component,
    Preset,
    build_preset_component,
    preset_pipeline_components,
    register_preset,
    save_preset_pipeline,
)

__all__ = [
    "PRESETS",
    "build_preset_component",
    "build_t5_tokenizer",
    "build_tokenizer",
    "clip_text_component",
    "clip_tokenizer_component",
    "preset_pipeline_components",
    "save_preset_pipeline",
    "t5_tokenizer_component",
]

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


def clip_tokenizer_component() -> Component:
    """The presets' CLIP tokenizer as a preset component."""
    return Component("transformers.CLIPTokenizer", build=lambda _config: build_tokenizer())


def clip_text_component(config: Mapping[str, Any], seed: int, projection: bool = False) -> Component:
    """A CLIP text encoder (with the pooled projection: `CLIPTextModelWithProjection`) whose special token ids
    agree with `build_tokenizer()` (the pooled output is taken at the end-of-text token)."""
    cls = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"

    def build(config: Mapping[str, Any]) -> Any:
        import transformers

        tok = build_tokenizer()
        if config["vocab_size"] <= len(tok):
            raise ValueError(f"text encoder vocab {config['vocab_size']} <= tokenizer size {len(tok)}")
        ids = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        model_class = getattr(transformers, cls)
        return model_class(transformers.CLIPTextConfig(**config, **ids))

    return Component(f"transformers.{cls}", config=config, seed=seed, build=build)


# ---- T5 ------------------------------------------------------------------------------------------------
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's own vocabulary


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer (SentencePiece-style Unigram, `T5TokenizerFast`) over the presets' words and single
    characters, built with `tokenizers` (T5's real vocabulary cannot be downloaded here)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in _T5_SPECIALS]
    pieces += [("\u2581" + word, -2.0) for word in _WORDS]  # "▁word": a word at the start of a piece
    pieces += [(char, -5.0) for char in sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))]
    pieces += [("\u2581", -3.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("  ", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


def t5_tokenizer_component() -> Component:
    """The presets' T5 tokenizer as a preset component."""
    return Component("transformers.T5TokenizerFast", build=lambda _config: build_t5_tokenizer())


# ---- the Stable Diffusion 1.x presets ------------------------------------------------------------------
for _name, _spec in PRESETS.items():
    _scheduler = dict(_spec["scheduler"])
    register_preset(
        Preset(
            name=_name,
            family="sd",
            pipeline_class="StableDiffusionPipeline",
            description=_spec["description"],
            components={
                "unet": Component("diffusers.UNet2DConditionModel", _spec["unet"], _SEEDS["unet"]),
                "vae": Component("diffusers.AutoencoderKL", _spec["vae"], _SEEDS["vae"]),
                "text_encoder": clip_text_component(_spec["text_encoder"], _SEEDS["text_encoder"]),
                "tokenizer": clip_tokenizer_component(),
                "scheduler": Component(f"diffusers.{_scheduler.pop('class')}", _scheduler),
            },
            pipeline_extra={
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            },
        )
    )
