"""Stable Audio task nodes (worldgen/nodes/stable_audio.py): the T5 + projection conditioning equals
`StableAudioPipeline.encode_prompt` + `encode_duration` (with and without a negative prompt), the DiT block is the
pipeline's transformer call, the Oobleck block cuts the waveform as the pipeline does, the noise is the pipeline's
draw, the cosine DPM-Solver's Brownian noise follows the run's seed; bad spans and latents are refused naming the
port."""

from __future__ import annotations

import diffusers
import pytest
import torch

import worldgen as wg
from worldgen.models.presets import preset_pipeline_components
from worldgen.nodes.stable_audio import (
    AudioNoiseBlock,
    CosineDPMSolver,
    OobleckCodecBlock,
    StableAudioDiTBackboneBlock,
    StableAudioProjectionBlock,
    StableAudioT5Block,
)
from worldgen.rng import RngState

PRESET = "stable-audio-tiny"
SOURCE = f"preset:{PRESET}"
PROMPT, NEGATIVE = "a dog barking in the rain", "a quiet room"


@pytest.fixture(scope="module")
def pipe():
    pipe = diffusers.StableAudioPipeline(**preset_pipeline_components(PRESET))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def block(cls, subfolder: str, **config):
    made = cls({"model": {"source": SOURCE, "subfolder": subfolder}, **config})
    return made


def tokens(pipe, text: str) -> dict[str, torch.Tensor]:
    out = pipe.tokenizer(
        text, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    return {"token_ids": out.input_ids, "attention_mask": out.attention_mask}


def graph_conditioning(pipe, negative: str | None, start: float, duration: float) -> dict[str, torch.Tensor]:
    te = block(StableAudioT5Block, "text_encoder")
    te.set_model(pipe.text_encoder)
    cond = block(StableAudioProjectionBlock, "projection_model", guidance=True)
    cond.set_model(pipe.projection_model)
    positive = tokens(pipe, PROMPT)
    inputs = {
        "embedding": te(**positive)["embedding"],
        "attention_mask": positive["attention_mask"],
        "start": start,
        "duration": duration,
    }
    if negative is not None:
        neg = tokens(pipe, negative)
        inputs |= {"embedding_uncond": te(**neg)["embedding"], "attention_mask_uncond": neg["attention_mask"]}
    return cond(**inputs)


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_conditioning_equals_encode_prompt_and_encode_duration(pipe, negative):
    start, duration = 0.25, 1.0
    out = graph_conditioning(pipe, negative, start, duration)
    # The pipeline's own assembly of both branches, batched [negative, positive].
    text = pipe.encode_prompt(PROMPT, "cpu", True, negative)
    begin, end = pipe.encode_duration(start, start + duration, "cpu", negative is not None, 1)
    if negative is None:  # the pipeline's zeros stand in for the negative branch
        positive = torch.cat([text, begin, end], dim=1)
        expected = torch.cat([torch.zeros_like(positive), positive])
        global_ = torch.cat([torch.cat([begin, end], dim=2)] * 2)
    else:
        expected = torch.cat([text, begin, end], dim=1)
        global_ = torch.cat([begin, end], dim=2)
    got = torch.cat([out["condition_uncond"], out["condition"]])
    assert got.shape == expected.shape == (2, pipe.tokenizer.model_max_length + 2, 16)
    assert (got - expected).abs().max() <= 1e-6
    assert torch.equal(torch.cat([out["global_condition_uncond"], out["global_condition"]]), global_)
    # The mask matters: padding's states are zeroed, so the sequence is not T5's full output projected.
    assert out["condition"][0, -3].abs().max() == 0


def test_without_guidance_no_negative_branch(pipe):
    cond = block(StableAudioProjectionBlock, "projection_model")
    cond.set_model(pipe.projection_model)
    out = cond(
        embedding=torch.zeros(1, 4, 32), attention_mask=torch.ones(1, 4, dtype=torch.long), duration=1.0
    )
    assert out["condition"].shape == (1, 6, 16) and out["condition_uncond"] is None


def test_the_dit_block_is_the_pipelines_transformer_call(pipe):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    dit = block(StableAudioDiTBackboneBlock, "transformer")
    dit.set_model(pipe.transformer)
    g = torch.Generator().manual_seed(3)
    sample, cond, glob = (
        torch.randn(1, 4, 8, generator=g),
        torch.randn(2, 10, 16, generator=g),
        torch.randn(2, 1, 32, generator=g),
    )
    t = torch.tensor(0.7)
    out = dit(
        sample=sample,
        timestep=t,
        condition=cond[1:],
        global_condition=glob[1:],
        condition_uncond=cond[:1],
        global_condition_uncond=glob[:1],
    )
    rotary = get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False)
    with torch.no_grad():
        expected = pipe.transformer(
            torch.cat([sample] * 2),
            t.unsqueeze(0),
            encoder_hidden_states=cond,
            global_hidden_states=glob,
            rotary_embedding=rotary,
            return_dict=False,
        )[0]
    assert torch.equal(torch.cat([out["pred_uncond"], out["pred"]]), expected)


@pytest.mark.parametrize("shape", [(1, 3, 8), (1, 4, 8, 8)])
def test_the_dit_refuses_a_latent_it_cannot_take_naming_the_port(shape):
    dit = block(StableAudioDiTBackboneBlock, "transformer")
    err = pytest.raises(wg.ConfigError, dit.check_inputs, {"sample": torch.zeros(shape)}).value
    assert err.path == "sample" and "(B, 4, L)" in err.detail
    assert not dit.model_loaded  # checked from the config alone


def test_lora_targets_name_attention_projections_of_the_dit(pipe):
    names = [name for name, _ in pipe.transformer.named_modules()]
    for target in StableAudioDiTBackboneBlock.lora_targets:
        assert any(name.endswith(".attn1." + target) for name in names), target
        assert any(name.endswith(".attn2." + target) for name in names), target


def test_the_noise_is_the_pipelines_draw():
    noise = AudioNoiseBlock(channels=4, length=8)
    out = noise(batch_size=2, rng=RngState.seeded(11))
    expected = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out["latent"], expected)
    assert out["rng"].generator().initial_seed() == 11  # what the solver seeds its Brownian tree with


def run_solver(seed: int, steps: int = 3) -> torch.Tensor:
    solver = CosineDPMSolver(
        {"model": {"source": SOURCE, "subfolder": "scheduler"}, "num_inference_steps": steps}
    )
    latent = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    out = solver(latent=latent, rng=RngState.seeded(seed))
    for _ in range(steps):
        out = solver(latent=out["latent"], pred=torch.zeros_like(latent), state=out["state"])
    return out["latent"]


def test_the_solvers_brownian_noise_follows_the_seed(pipe):
    from worldgen.models.presets import build_preset_component

    first = run_solver(seed=5)
    assert torch.equal(first, run_solver(seed=5))
    assert not torch.equal(first, run_solver(seed=6))
    # As the pipeline's scheduler with a generator seeded alike.
    scheduler = build_preset_component(PRESET, "scheduler")
    scheduler.set_timesteps(3)
    latent = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(latent, t)
        latent = scheduler.step(torch.zeros_like(latent), t, latent, generator=generator).prev_sample
    assert torch.equal(first, latent)


def test_oobleck_cuts_the_span_as_the_pipeline(pipe):
    vae = block(OobleckCodecBlock, "vae", latent_length=8)
    vae.set_model(pipe.vae)
    latent = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    out = vae(latent=latent, start=0.25, duration=1.0)
    with torch.no_grad():
        full = pipe.vae.decode(latent).sample
    assert out["sample_rate"] == 16
    assert torch.equal(out["audio"], full[:, :, 4:20].clamp(-1, 1))


@pytest.mark.parametrize(
    ("start", "duration", "path", "message"),
    [
        (0.0, 2.5, "duration", "at most 2 s"),
        (0.0, 0.0, "duration", "more than 0 seconds"),
        (0.5, -0.25, "duration", "more than 0 seconds"),
        (1.5, 1.0, "start", "ends at 2.5 s, past the 2 s"),
        (-1.0, 1.0, "start", "at least 0"),
        (0.0, 0.01, "duration", "holds no sample"),
        (0.0, "long", "duration", "a number of seconds"),
    ],
)
def test_oobleck_refuses_a_span_the_model_cannot_make_before_loading(start, duration, path, message):
    vae = block(OobleckCodecBlock, "vae", latent_length=8)
    err = pytest.raises(wg.ConfigError, vae.check_inputs, {"start": start, "duration": duration}).value
    assert err.path == path and message in err.detail
    if path == "duration" and "most" in message:
        assert SOURCE in err.detail
    assert not vae.model_loaded


def test_the_projection_refuses_seconds_outside_its_range():
    cond = block(StableAudioProjectionBlock, "projection_model")
    err = pytest.raises(wg.ConfigError, cond.check_inputs, {"start": 500.0, "duration": 20.0}).value
    assert err.path == "duration" and "0.0 to 512.0" in err.detail
    assert not cond.model_loaded
