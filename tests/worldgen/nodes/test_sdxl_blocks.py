"""SDXL's task nodes (worldgen/nodes/sdxl.py) and what they added to the shared blocks: the prompt condition of two
CLIP encoders (zeros for a left-out negative prompt), the added time ids of both pipelines, the UNet's text_time
ports, the tokenizers' fallback prompt, and the solvers' denoising_start/denoising_end cuts."""

from __future__ import annotations

import pytest
import torch

from worldgen.errors import ConfigError
from worldgen.registry import create_block


def test_prompt_condition_concatenates_and_zeros_a_left_out_prompt():
    cond = create_block("conditioner/sdxl_text")
    e1, e2, pooled = torch.randn(1, 77, 32), torch.randn(1, 77, 48), torch.randn(1, 48)
    out = cond(embedding=e1, embedding_2=e2, pooled_2=pooled)
    assert torch.equal(out["embedding"], torch.cat([e1, e2], dim=-1)) and out["pooled"] is pooled
    zeros = cond(embedding=None, embedding_2=e2, pooled_2=pooled, like=out["embedding"], like_pooled=pooled)
    assert (
        zeros["embedding"].shape == (1, 77, 80) and not zeros["embedding"].any() and not zeros["pooled"].any()
    )
    with pytest.raises(ConfigError, match="no prompt was encoded") as err:
        cond(embedding=None, embedding_2=e2, pooled_2=pooled)
    assert err.value.path == "embedding"
    refiner = create_block("conditioner/sdxl_text", {"encoders": 1})  # text_encoder_2 alone
    assert torch.equal(refiner(embedding_2=e2, pooled_2=pooled)["embedding"], e2)


@pytest.mark.parametrize(
    ("config", "inputs", "ids", "neg_ids"),
    [
        # base: sizes default to the image's (16x8 latent * 8); negative sizes only when both are given
        ({}, {}, [128, 64, 0, 0, 128, 64], [128, 64, 0, 0, 128, 64]),
        (
            {},
            {"negative_original_size": (10, 20), "negative_crops_coords_top_left": (1, 2)},
            [128, 64, 0, 0, 128, 64],
            [128, 64, 0, 0, 128, 64],
        ),
        (
            {},
            {
                "negative_original_size": (10, 20),
                "negative_target_size": (30, 40),
                "crops_coords_top_left": (5, 6),
            },
            [128, 64, 5, 6, 128, 64],
            [10, 20, 0, 0, 30, 40],
        ),
        # image to image: the negative ids take the positive crop (as diffusers does)
        (
            {"pipeline": "image_to_image"},
            {"negative_original_size": (10, 20), "crops_coords_top_left": (5, 6)},
            [128, 64, 5, 6, 128, 64],
            [10, 20, 5, 6, 128, 64],
        ),
        # the refiner: aesthetic scores instead of the target size
        (
            {"pipeline": "image_to_image", "aesthetic": True},
            {"original_size": (1024, 1024), "negative_crops_coords_top_left": (1, 1)},
            [1024, 1024, 0, 0, 6.0],
            [1024, 1024, 1, 1, 2.5],
        ),
    ],
)
def test_time_ids_follow_each_pipelines_rules(config, inputs, ids, neg_ids):
    block = create_block("conditioner/sdxl_time_ids", config)
    out = block(latent=torch.zeros(1, 4, 16, 8), **inputs)
    assert out["time_ids"].tolist() == [ids] and out["time_ids_uncond"].tolist() == [neg_ids]


def test_time_ids_refuse_what_is_not_a_pair_or_score():
    block = create_block("conditioner/sdxl_time_ids")
    with pytest.raises(ConfigError) as err:
        block.check_inputs({"target_size": "1024"})
    assert err.value.path == "target_size"
    with pytest.raises(ConfigError) as err:
        block.check_inputs({"aesthetic_score": "high"})
    assert err.value.path == "aesthetic_score"


def test_text_time_unet_without_its_ports_is_a_clear_error():
    unet = create_block("backbone/unet2d", {"model": {"source": "preset:sdxl-tiny", "subfolder": "unet"}})
    with pytest.raises(ConfigError, match="text_time") as err:
        unet.check_inputs({"pooled": None, "time_ids": None})
    assert err.value.path == "pooled"
    assert not unet.model_loaded  # found from the config
    sd = create_block("backbone/unet2d", {"model": {"source": "preset:tiny", "subfolder": "unet"}})
    sd.check_inputs({"pooled": None, "time_ids": None})  # an SD UNet takes none
    sample = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ConfigError, match="text_time") as err:
        unet(
            sample=sample,
            timestep=torch.tensor(1),
            condition=torch.zeros(1, 77, 64),
            pooled=torch.zeros(1, 32),
        )
    assert err.value.path == "time_ids"


def test_tokenizer_falls_back_and_takes_a_left_out_prompt_only_when_optional():
    ref = {"source": "preset:sdxl-tiny", "subfolder": "tokenizer_2"}
    tok = create_block("tokenizer/clip", {"model": ref})
    same = tok(text="a cat")["token_ids"]
    assert torch.equal(tok(text=None, fallback="a cat")["token_ids"], same)  # prompt_2 or prompt
    assert torch.equal(tok(text="", fallback="a cat")["token_ids"], same)
    assert not torch.equal(tok(text="a dog", fallback="a cat")["token_ids"], same)
    with pytest.raises(ConfigError, match="no text given") as err:
        tok.check_inputs({"text": None, "fallback": None})
    assert err.value.path == "text"
    optional = create_block("tokenizer/clip", {"model": ref, "optional": True})
    assert optional(text=None) == {"token_ids": None, "attention_mask": None}
    te = create_block(
        "conditioner/clip_text", {"model": {"source": "preset:sdxl-tiny", "subfolder": "text_encoder"}}
    )
    assert te(token_ids=None) == {"embedding": None, "pooled": None}


def test_solver_cuts_the_schedule_at_denoising_end_and_start():
    """The same timesteps as StableDiffusionXLPipeline's denoising_end and the img2img get_timesteps."""
    solver = create_block("solver/euler", {"model": {"source": "preset:sdxl-tiny", "subfolder": "scheduler"}})
    latent = torch.zeros(1, 4, 8, 8)
    full = solver(latent=latent, num_steps=10)["state"].timesteps
    first = solver(latent=latent, num_steps=10, denoising_end=0.8)["state"].timesteps
    second = solver(latent=latent, num_steps=10, denoising_start=0.8)
    assert first.tolist() == [t for t in full.tolist() if t >= 200]
    assert second["state"].timesteps.tolist() == [t for t in full.tolist() if t < 200]
    assert torch.equal(second["latent"], latent)  # a hand-off adds no noise
    for ports, path in [
        ({"denoising_end": 1.0}, "denoising_end"),
        ({"denoising_start": 0.8, "denoising_end": 0.5}, "denoising_start"),
    ]:
        with pytest.raises(ConfigError) as err:
            solver.check_inputs({"state": None, "num_steps": 10, "strength": None, **ports})
        assert err.value.path == path
