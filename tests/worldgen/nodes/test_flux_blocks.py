"""Flux task nodes (worldgen/nodes/flux.py): packing as diffusers packs, the transformer backbone's guidance
and true-CFG inputs, its LoRA targets; and the text-node behaviour the Flux graphs rely on (a second prompt
falling back to the first, an optional negative prompt giving no tokens)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

import worldgen as wg
from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component
from worldgen.registry import create_block

PROMPT = "a harbor at dawn"


def test_pack_and_unpack_match_the_pipeline():
    latent = torch.randn(
        2, 16, 4, 6, generator=torch.Generator().manual_seed(0)
    )  # not square: rows != columns
    packed = create_block("latent/flux_pack")(latent=latent)
    expected = FluxPipeline._pack_latents(latent, 2, 16, 4, 6)
    assert torch.equal(packed["latent"], expected)
    assert torch.equal(
        packed["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32)
    )
    back = create_block("latent/flux_unpack")(latent=packed["latent"], img_ids=packed["img_ids"])["latent"]
    assert torch.equal(back, latent)
    # The pipeline unpacks with the image size in pixels: the same latent (here a VAE factor of 8).
    assert torch.equal(back, FluxPipeline._unpack_latents(expected, 32, 48, 8))


def test_pack_refuses_odd_latents_and_unpack_mismatched_ids():
    with pytest.raises(ConfigError, match=r"even H and W.*\(1, 16, 3, 4\)") as err:
        create_block("latent/flux_pack")(latent=torch.zeros(1, 16, 3, 4))
    assert err.value.path == "latent"
    ids = create_block("latent/flux_pack")(latent=torch.zeros(1, 16, 4, 4))["img_ids"]
    with pytest.raises(ConfigError, match="does not fit its position ids"):
        create_block("latent/flux_unpack")(latent=torch.zeros(1, 6, 64), img_ids=ids)


def _backbone(preset: str) -> wg.ModelBlock:
    block = create_block("backbone/flux_transformer", {"model": f"preset:{preset}"})
    block.set_model(build_preset_component(preset, "transformer"))
    return block


def _inputs(**extra):
    gen = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 64, generator=gen),
        "timestep": torch.tensor(750.0),
        "condition": torch.randn(1, 8, 32, generator=gen),
        "pooled": torch.randn(1, 32, generator=gen),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
        **extra,
    }


def test_backbone_calls_the_transformer_as_the_pipeline_does():
    block = _backbone("flux-dev-tiny")
    inputs = _inputs(guidance=3.5)
    with torch.no_grad():
        expected = block.model(
            hidden_states=inputs["sample"],
            timestep=torch.tensor([0.75]),
            guidance=torch.tensor([3.5]),
            pooled_projections=inputs["pooled"],
            encoder_hidden_states=inputs["condition"],
            txt_ids=torch.zeros(8, 3),
            img_ids=inputs["img_ids"],
            return_dict=False,
        )[0]
    out = block(**inputs)
    assert torch.equal(out["pred"], expected) and out["pred_uncond"] is None
    # The distilled guidance is an input of dev's transformer: another scale, another prediction.
    assert not torch.equal(block(**_inputs(guidance=1.0))["pred"], expected)


def test_backbone_runs_the_negative_branch_only_for_true_cfg():
    block = _backbone("flux-tiny")
    negative = {"condition_uncond": torch.zeros(1, 8, 32), "pooled_uncond": torch.zeros(1, 32)}
    plain = block(**_inputs())["pred"]
    assert block(**_inputs(**negative))["pred_uncond"] is None  # true_cfg_scale 1: one call
    out = block(**_inputs(**negative, true_cfg_scale=2.0))
    assert torch.equal(out["pred"], plain)
    assert out["pred_uncond"].shape == plain.shape and not torch.equal(out["pred_uncond"], plain)
    # A negative T5 sequence without the negative CLIP output (negative_prompt_2 alone) is no true CFG,
    # as FluxPipeline decides by `negative_prompt`.
    alone = block(**_inputs(condition_uncond=negative["condition_uncond"], true_cfg_scale=2.0))
    assert alone["pred_uncond"] is None


def test_backbone_errors_name_the_port():
    dev = _backbone("flux-dev-tiny")
    with pytest.raises(ConfigError, match="guidance embeddings") as err:
        dev(**_inputs())
    assert err.value.path == "guidance"
    with pytest.raises(ConfigError, match="true_cfg_scale must be a number") as err:
        dev.check_inputs({"true_cfg_scale": "high"})
    assert err.value.path == "true_cfg_scale"


def test_lora_targets_are_the_transformers_projections():
    from worldgen.lora import LoraSettings, attach_adapters, trainable_parameters

    g = wg.Graph("flux")
    g.add_node("backbone/flux_transformer", id="flux", config={"model": "preset:flux-tiny"})
    g.block("flux").set_model(build_preset_component("flux-tiny", "transformer"))  # not the pooled one
    targets = attach_adapters(g, LoraSettings(rank=2))
    model = g.block("flux").model
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    for suffix in g.block("flux").lora_targets:  # each declared target exists in the model and got an adapter
        assert any(name.endswith("." + suffix) for name in adapted), suffix
    # Both the double (joint) and the single blocks' attention are adapted.
    assert any(n.startswith("single_transformer_blocks.") for n in adapted)
    assert any(".attn.add_q_proj" in n for n in adapted)
    assert trainable_parameters(targets)


# ---- text nodes as the Flux graphs use them ------------------------------------------------------------
def test_tokenizer_fallback_and_optional_text():
    ref = {"source": "preset:flux-tiny", "subfolder": "tokenizer_2"}
    tok = create_block("tokenizer/t5", {"model": ref, "max_length": 16})
    prompt = tok(text=PROMPT)["token_ids"]
    assert torch.equal(tok(text=None, fallback=PROMPT)["token_ids"], prompt)  # prompt_2 defaults to prompt
    assert torch.equal(tok(text="", fallback=PROMPT)["token_ids"], prompt)  # as `prompt_2 or prompt`
    assert not torch.equal(tok(text="a red cat", fallback=PROMPT)["token_ids"], prompt)
    with pytest.raises(ConfigError, match="no text given") as err:
        tok(text=None)
    assert err.value.path == "text"
    optional = create_block("tokenizer/t5", {"model": ref, "optional": True})
    assert optional(text=None) == {"token_ids": None, "attention_mask": None}
    encoder = create_block("conditioner/t5_text", {"model": {**ref, "subfolder": "text_encoder_2"}})
    assert encoder(token_ids=None) == {"embedding": None}  # no negative prompt: no negative embedding


def test_t5_limit_names_the_port_the_prompt_came_from():
    ref = {"source": "preset:flux-tiny", "subfolder": "tokenizer_2"}
    tok = create_block("tokenizer/t5", {"model": ref, "max_length": 4})
    with pytest.raises(ConfigError, match="tokens long and this tokenizer takes at most 4") as err:
        tok.check_inputs({"text": None, "fallback": "a photo of the old harbor"})
    assert err.value.path == "fallback"
