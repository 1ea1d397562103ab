"""Text nodes (worldgen/nodes/text.py): the T5 tokenizer and conditioner, CLIP's penultimate layer and projected
pooled embedding, each equal to what the diffusers pipelines compute; prompts over the T5 limit refused."""

from __future__ import annotations

import pytest
import torch

import worldgen as wg
from worldgen.errors import ConfigError, ExecutionError
from worldgen.models.presets import Component, Preset, build_preset_component, register_preset
from worldgen.models.tiny import (
    PRESETS,
    clip_text_component,
    clip_tokenizer_component,
    t5_tokenizer_component,
)
from worldgen.registry import create_block

T5_CONFIG = {  # as small as diffusers' pipeline tests build T5 encoders
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "vocab_size": 128,
    "relative_attention_num_buckets": 8,
    "decoder_start_token_id": 0,
}
PRESET = "test-text-encoders"

register_preset(
    Preset(
        name=PRESET,
        family="test",
        pipeline_class="-",
        description="a CLIP encoder with projection and a T5 encoder, for these tests",
        components={
            "tokenizer": clip_tokenizer_component(),
            "text_encoder": clip_text_component(PRESETS["tiny"]["text_encoder"], seed=5, projection=True),
            "tokenizer_3": t5_tokenizer_component(),
            "text_encoder_3": Component("transformers.T5EncoderModel", T5_CONFIG, seed=6),
        },
    )
)
PROMPT = "a photo of the harbor at dawn"


def _block(block_type: str, subfolder: str, **config):
    return create_block(
        block_type, {"model": {"source": f"preset:{PRESET}", "subfolder": subfolder}, **config}
    )


def test_t5_tokenizer_and_conditioner_equal_the_sd3_and_flux_pipelines():
    tok = _block("tokenizer/t5", "tokenizer_3", max_length=16)
    te = _block("conditioner/t5_text", "text_encoder_3")
    ids = tok(text=PROMPT)["token_ids"]
    tokenizer = build_preset_component(PRESET, "tokenizer_3")
    # what StableDiffusion3Pipeline._get_t5_prompt_embeds / FluxPipeline._get_t5_prompt_embeds do
    expected_ids = tokenizer(
        PROMPT,
        padding="max_length",
        max_length=16,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    assert torch.equal(ids, expected_ids) and ids.shape == (1, 16)
    encoder = build_preset_component(PRESET, "text_encoder_3")
    with torch.no_grad():
        expected = encoder(expected_ids)[0]
    embedding = te(token_ids=ids)["embedding"]
    assert torch.equal(embedding, expected) and not embedding.requires_grad


def test_clip_penultimate_and_projection_equal_sdxl_and_sd3():
    tok = _block("tokenizer/clip", "tokenizer")
    te = _block("conditioner/clip_text", "text_encoder", layer="penultimate", projection=True)
    tokens = tok(text=[PROMPT, "a cat"])
    out = te(token_ids=tokens["token_ids"])
    encoder = build_preset_component(PRESET, "text_encoder")
    with torch.no_grad():  # StableDiffusionXLPipeline.encode_prompt / SD3's _get_clip_prompt_embeds
        full = encoder(tokens["token_ids"], output_hidden_states=True)
    assert torch.equal(out["embedding"], full.hidden_states[-2])
    assert torch.equal(out["pooled"], full[0]) and out["pooled"].shape == (2, 32)
    skipped = _block(
        "conditioner/clip_text", "text_encoder", layer="penultimate", projection=True, clip_skip=1
    )
    assert torch.equal(skipped(token_ids=tokens["token_ids"])["embedding"], full.hidden_states[-3])


def test_a_prompt_over_the_t5_limit_is_refused_naming_node_and_field():
    g = wg.Graph("t5")
    g.add_node(_block("tokenizer/t5", "tokenizer_3", max_length=8), id="tok_3")
    g.expose_input("prompt", "tok_3.text")
    g.expose_output("ids", "tok_3.token_ids")
    long_prompt = " ".join(["the old harbor at dawn"] * 3)
    with pytest.raises(ConfigError) as err:
        g.run({"prompt": long_prompt})
    message = str(err.value)
    assert "tok_3" in message and "text" in message and "at most 8" in message and "max_length" in message
    with pytest.raises(ConfigError, match="prompt 2 is"):
        g.run({"prompt": ["a cat", long_prompt]})
    assert g.run({"prompt": "a cat at dawn"})["ids"].shape == (1, 8)
    cutting = _block("tokenizer/t5", "tokenizer_3", max_length=8, truncate=True)  # as the pipelines do
    assert cutting(text=long_prompt)["token_ids"].shape == (1, 8)


def test_a_long_clip_prompt_is_cut_as_the_pipelines_do():
    tok = _block("tokenizer/clip", "tokenizer", max_length=8)
    assert tok(text=" ".join(["a red house"] * 10))["token_ids"].shape == (1, 8)


def test_gradients_flow_only_when_training():
    te = _block("conditioner/t5_text", "text_encoder_3")
    ids = _block("tokenizer/t5", "tokenizer_3", max_length=8)(text="a cat")["token_ids"]
    assert not te(token_ids=ids)["embedding"].requires_grad
    with wg.block.training():
        assert te(token_ids=ids)["embedding"].requires_grad


def test_errors_inside_a_node_are_not_raw_model_exceptions():
    te = _block("conditioner/t5_text", "text_encoder_3")
    g = wg.Graph("t5")
    g.add_node(te, id="te_3")
    g.expose_input("ids", "te_3.token_ids")
    g.expose_output("embedding", "te_3.embedding")
    with pytest.raises(ExecutionError, match="node 'te_3'"):
        g.run({"ids": torch.full((1, 4), 10_000)})  # an id past the vocabulary
