"""Upscaler presets (worldgen/models/tiny_upscale.py): registered under their pipelines' classes and families, the
x4 UNet's channels and class embeddings fit its VAE and noise levels, and the x2 upscaler's VAE and text encoder
are `tiny`'s very weights (it upscales SD 1.x latents)."""

from __future__ import annotations

from tests.worldgen.models.test_loading import assert_same_weights
from worldgen.models.presets import build_preset_component, preset_config, preset_name, preset_names
from worldgen.templates.families import detect_family, model_index


def test_upscaler_presets_are_registered_for_their_families():
    assert preset_names("upscale") == ["upscale-tiny"]
    assert preset_names("latent-upscale") == ["latent-upscale-tiny"]
    assert preset_name("tiny", "upscale") == "upscale-tiny"
    x4 = model_index("preset:upscale-tiny")
    assert x4["_class_name"] == "StableDiffusionUpscalePipeline" and x4["max_noise_level"] == 350
    assert detect_family("preset:latent-upscale-tiny").name == "latent-upscale"


def test_x4_unet_takes_latents_and_image_and_every_noise_level():
    unet, vae = preset_config("upscale-tiny", "unet"), preset_config("upscale-tiny", "vae")
    assert unet["in_channels"] == vae["latent_channels"] + 3
    assert unet["num_class_embeds"] > model_index("preset:upscale-tiny")["max_noise_level"]
    assert len(vae["block_out_channels"]) == 3 and vae["scaling_factor"] == 0.08333  # 4x, the x4 VAE's factor


def test_x2_shares_tiny_vae_and_text_encoder():
    for name in ("vae", "text_encoder"):
        assert preset_config("latent-upscale-tiny", name) == preset_config("tiny", name)
        assert_same_weights(
            build_preset_component("tiny", name), build_preset_component("latent-upscale-tiny", name)
        )
    unet, latent = (
        preset_config("latent-upscale-tiny", "unet"),
        preset_config("tiny", "vae")["latent_channels"],
    )
    pooled = preset_config("tiny", "text_encoder")["hidden_size"]
    assert unet["time_cond_proj_dim"] == 128 + pooled  # the noise-level embedding, then the pooled text
    assert (
        unet["in_channels"] == 2 * latent and unet["out_channels"] == latent + 1
    )  # + image latents; + 1 dropped
