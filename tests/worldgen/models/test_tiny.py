"""Tiny presets (worldgen/models/tiny.py): listed, deterministic whatever the order, the RNG untouched, a tokenizer
that matches its text encoder."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.block import ModelRef
from worldgen.errors import ModelLoadError
from worldgen.models import PRESETS, build_preset_component, load_component, preset_pipeline_components


def test_presets_listed():
    assert {"tiny", "small"} <= set(PRESETS)


def test_preset_components_deterministic_in_any_order_and_rng_untouched():
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = preset_pipeline_components("tiny")
    assert torch.equal(torch.random.get_rng_state(), state)
    # Only the text encoder, then the UNet, with the global RNG in another state: same weights.
    torch.manual_seed(99)
    te = build_preset_component("tiny", "text_encoder")
    unet = build_preset_component("tiny", "unet")
    assert_same_weights(first["unet"], unet)
    assert_same_weights(first["text_encoder"], te)
    assert_same_weights(first["vae"], build_preset_component("tiny", "vae"))
    assert isinstance(first["scheduler"], DDIMScheduler)


def test_tokenizer_matches_text_encoder():
    tok = build_preset_component("tiny", "tokenizer")
    te = build_preset_component("tiny", "text_encoder")
    assert te.config.vocab_size > len(tok)
    assert (te.config.bos_token_id, te.config.eos_token_id, te.config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    ids = tok("a photo of the harbor at dawn").input_ids
    assert len(ids) == 2 + 7  # common words are single tokens, plus BOS/EOS
    with torch.no_grad():
        out = te(torch.tensor([tok("a cat", padding="max_length", max_length=77).input_ids]))
    assert out.last_hidden_state.shape == (1, 77, 32)


def test_unknown_preset_and_component():
    with pytest.raises(ModelLoadError, match=r"unknown model preset 'tinny'.*did you mean 'tiny'"):
        load_component(ModelRef(source="preset:tinny", subfolder="unet"), UNet2DConditionModel)
    with pytest.raises(ModelLoadError, match=r"no component 'unett'.*choices: unet"):
        build_preset_component("tiny", "unett")
