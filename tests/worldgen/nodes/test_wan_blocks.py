"""Wan blocks (worldgen/nodes/wan.py), each against the pipeline step it stands for: the UMT5 prompt encoding
(trimmed and zero-padded), the CLIP-vision image embeds, the first-frame condition, the VAE's decoding to a VIDEO;
the size and frame checks; the transformer's refusals; LoRA adapters on the transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import preset_pipeline
from worldgen.nodes.wan import refuse_frames
from worldgen.registry import create_block

TINY = {"source": "preset:wan-tiny"}
I2V = {"source": "preset:wan-i2v-tiny"}


@pytest.fixture(scope="module")
def i2v_pipe() -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline(**preset_pipeline("wan-i2v-tiny").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    pixels = torch.rand(24, 40, 3, generator=torch.Generator().manual_seed(3))
    return Image.fromarray((pixels * 255).byte().numpy())


def block(block_type: str, ref: dict, subfolder: str | None = None, **config):
    model = {"model": {**ref, "subfolder": subfolder}} if subfolder else {}
    return create_block(block_type, {**model, **config})


@pytest.mark.parametrize(
    ("frames", "message"),
    [(0, "nearest valid: 1 or 5"), (-3, "nearest valid: 1 or 5"), (10, "got 10; nearest valid: 9 or 13"),
     (2.5, "whole number")],
)  # fmt: skip
def test_frames_must_be_4k_plus_1_naming_the_nearest_counts(frames, message):
    with pytest.raises(ConfigError, match=message) as err:
        refuse_frames(frames)
    assert err.value.path == "frames"
    assert refuse_frames(9) == 9 and refuse_frames(1) == 1


def test_video_noise_is_shaped_by_size_and_frames_and_refuses_bad_sizes():
    noise = block("latent/video_noise", TINY, max_side=512)
    out = noise(height=32, width=48, frames=9)
    assert out["latent"].shape == (1, 16, 3, 4, 6) and out["latent"].dtype == torch.float32
    with pytest.raises(
        ConfigError, match=r"width must be a positive multiple of 16.*got 40.*32 or 48"
    ) as err:
        noise.check_inputs({"height": 32, "width": 40, "frames": 9})
    assert err.value.path == "width"
    with pytest.raises(ConfigError, match="at most 512") as err:
        noise.check_inputs({"height": 528, "width": 32, "frames": 9})
    assert err.value.path == "height"
    with pytest.raises(ConfigError) as err:
        noise.check_inputs({"height": 32, "width": 32, "frames": 8})
    assert err.value.path == "frames"


def test_umt5_encoding_matches_the_pipeline_trimmed_and_zero_padded():
    pipe = WanPipeline(**preset_pipeline("wan-tiny").components)
    tok = block("tokenizer/umt5", TINY, "tokenizer", max_length=512)
    te = block("conditioner/umt5", TINY, "text_encoder")
    prompts = ["a  harbor &amp; boats ", PROMPT]  # cleaned as the pipeline cleans (spaces, HTML entities)
    got = te(**tok(text=prompts))["embedding"]
    expected = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=512)
    assert got.shape == expected.shape == (2, 512, 32)
    assert (got - expected).abs().max() <= 1e-5
    assert got[0, 10:].abs().sum() == 0 and got[0, :3].abs().sum() > 0  # zeros after the prompt's tokens


def test_clip_vision_embeds_match_the_pipeline(i2v_pipe, picture):
    enc = block("conditioner/clip_vision", I2V, "image_encoder")
    got = enc(image=picture)["embedding"]
    assert torch.equal(got, i2v_pipe.encode_image(picture, torch.device("cpu")))
    # A [0, 1] tensor of the same picture is read as the picture (not rescaled by 1/255 twice).
    tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 255
    assert (enc(image=tensor)["embedding"] - got).abs().max() < 1e-4
    with pytest.raises(ConfigError, match=r"\[0, 1\]") as err:
        enc.check_inputs({"image": tensor * 255})
    assert err.value.path == "image"


def test_first_frame_condition_matches_the_pipeline(i2v_pipe, picture):
    clip = block("video/first_frame_clip", I2V)
    encode = block("codec/wan_vae", I2V, "vae", mode="encode")
    condition = block("latent/wan_i2v_condition", I2V)
    video = clip(image=picture, height=32, width=48, frames=9)["video"]
    assert video.shape == (1, 9, 3, 32, 48) and torch.all(video[:, 1:] == 0.5)
    # A [0, 1] tensor (another graph's IMAGE output) is resized the same way to the clip's size.
    tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 255
    assert clip(image=tensor, height=32, width=48, frames=5)["video"].shape == (1, 5, 3, 32, 48)
    got = condition(latent=encode(video=video)["latent"])["condition"]

    image = i2v_pipe.video_processor.preprocess(picture, height=32, width=48)
    _, expected = i2v_pipe.prepare_latents(image, 1, 16, 32, 48, 9, torch.float32, torch.device("cpu"))
    assert got.shape == expected.shape == (1, 4 + 16, 3, 4, 6)
    assert (got - expected).abs().max() <= 1e-5


def test_vae_decodes_to_a_video_as_the_pipeline_postprocesses_it(i2v_pipe):
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    got = block("codec/wan_vae", I2V, "vae")(latent=latent)["video"]
    vae = i2v_pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    decoded = vae.decode(latent * std + mean, return_dict=False)[0]
    expected = i2v_pipe.video_processor.postprocess_video(decoded, output_type="pt")
    assert got.shape == (1, 9, 3, 32, 48)  # VIDEO: (B, F, C, H, W), 4k+1 frames from k+1 latent frames
    assert (got - expected).abs().max() <= 1e-5 and got.min() >= 0 and got.max() <= 1


def test_transformer_refuses_a_latent_or_image_condition_that_does_not_fit():
    sample = torch.randn(1, 16, 2, 4, 4)
    condition = torch.randn(1, 512, 32)
    i2v = block("backbone/wan_transformer", I2V, "transformer")
    with pytest.raises(ConfigError, match="takes 36 latent channels, got 16: it needs an image") as err:
        i2v(sample=sample, timestep=torch.tensor(999), condition=condition)
    assert err.value.path == "latent_condition"
    mask_and_latent = torch.randn(1, 20, 2, 4, 4)
    with pytest.raises(ConfigError, match="takes CLIP-vision image embeddings") as err:
        i2v(sample=sample, timestep=torch.tensor(999), condition=condition, latent_condition=mask_and_latent)
    assert err.value.path == "image_embeds"
    t2v = block("backbone/wan_transformer", TINY, "transformer")
    with pytest.raises(ConfigError, match="guidance_scale must be a number") as err:
        t2v.check_inputs({"guidance_scale": "high"})
    # Guidance over 1 with a negative sequence: a second, unconditional call (as the pipelines, never batched).
    out = t2v(sample=sample, timestep=torch.tensor(999), condition=condition, condition_uncond=condition * 0)
    assert out["pred_uncond"] is not None and not torch.equal(out["pred"], out["pred_uncond"])
    with pytest.raises(ConfigError, match="expand_timesteps models only") as err:
        t2v(sample=sample, timestep=torch.tensor(999), condition=condition, first_frame=sample[:, :, :1])
    assert err.value.path == "first_frame"
    assert (
        t2v(sample=sample, timestep=torch.tensor(999), condition=condition, guidance_scale=1.0)["pred_uncond"]
        is None
    )


@pytest.mark.usefixtures("own_model_pool")
def test_lora_preparation_puts_adapters_on_the_transformer_attention_and_ffn():
    import worldgen as wg
    from worldgen.lora import LoraSettings, attach_adapters

    graph = wg.Graph.from_template("text_to_video", preset="wan-tiny", steps=2)
    targets = {t.key: t for t in attach_adapters(graph, LoraSettings(rank=2))}
    assert set(targets) == {"wan", "te"}  # the transformer and the UMT5 encoder (not the VAE, the tokenizer)
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in targets["wan"].model.named_parameters() if ".lora_A" in n
    }
    for module in ("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
        assert any(name.startswith("blocks.0.") and name.endswith(module) for name in adapted), module
