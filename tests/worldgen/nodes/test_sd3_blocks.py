"""SD3 task nodes (worldgen/nodes/sd3.py): the joined text condition equals `StableDiffusion3Pipeline.encode_prompt`
with and without T5; the MMDiT backbone refuses latents it cannot take naming the port, and its LoRA targets
name real modules of the transformer."""

from __future__ import annotations

import diffusers
import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.models.presets import preset_pipeline_components
from worldgen.nodes.sd3 import SD3JointConditionerBlock, SD3TransformerBackboneBlock

PRESET = "sd3-tiny"


@pytest.fixture(scope="module")
def pipe():
    pipe = diffusers.StableDiffusion3Pipeline(**preset_pipeline_components(PRESET))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoded(pipe, t5: bool, length: int = 16) -> dict[str, torch.Tensor]:
    """What the text nodes give the joint block, from the pipeline's own encoders (as the graph computes them)."""
    out = {}
    for i, (tok, te) in enumerate(
        [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    ):
        ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = te(ids, output_hidden_states=True)
        name = "clip" if i == 0 else "clip_2"
        out[f"{name}_embedding"], out[f"{name}_pooled"] = hidden.hidden_states[-2], hidden.text_embeds
    if t5:
        ids = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=length, return_tensors="pt").input_ids
        out["t5_embedding"] = pipe.text_encoder_3(ids)[0]
    return out


@pytest.mark.parametrize("t5", [True, False])
@torch.no_grad()
def test_joint_condition_equals_encode_prompt(pipe, t5):
    width = pipe.transformer.config.joint_attention_dim
    block = SD3JointConditionerBlock(t5_length=16, t5_width=width)
    if not t5:
        pipe = diffusers.StableDiffusion3Pipeline(
            **{**pipe.components, "text_encoder_3": None, "tokenizer_3": None}
        )
    got = block(**encoded(pipe, t5))
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert got["embedding"].shape == embeds.shape == (1, 77 + 16, width)
    assert torch.equal(got["embedding"], embeds) and torch.equal(got["pooled"], pooled)


def backbone() -> SD3TransformerBackboneBlock:
    return SD3TransformerBackboneBlock(model=f"preset:{PRESET}")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 16, 15, 16), "multiples of the patch size 2"),
        ((1, 16, 66, 64), "at most 64 a side"),  # 32 patches of 2
        ((1, 4, 16, 16), "must be (B, 16, H, W)"),
    ],
)
def test_backbone_refuses_a_latent_it_cannot_take_naming_the_port(shape, message):
    block = backbone()
    with pytest.raises(wg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        block.check_inputs({"sample": torch.zeros(shape)})
    assert info.value.path == "sample" and not block.model_loaded  # checked from the config alone
    with pytest.raises(wg.ConfigError) as info:  # and when called
        block(sample=torch.zeros(shape), timestep=torch.tensor(500.0), condition=torch.zeros(1, 4, 96),
              pooled=torch.zeros(1, 80))  # fmt: skip
    assert info.value.path == "sample"


def test_an_image_whose_latent_is_not_whole_patches_names_the_transformer():
    graph = wg.Graph.from_template("image_to_image", preset="tiny", family="sd3", steps=2)
    image = torch.rand(1, 3, 34, 34)  # a 17x17 latent: not patches of 2
    with pytest.raises(wg.ConfigError, match=r"node 'transformer'.*at sample.*patch size 2"):
        graph.run({"prompt": PROMPT, "image": image}, seed=0)


def test_lora_targets_name_attention_projections_of_both_streams(pipe):
    names = [name for name, _ in pipe.transformer.named_modules()]
    for target in SD3TransformerBackboneBlock.lora_targets:
        assert any(name.endswith("." + target) for name in names), target


def test_joint_condition_refuses_embeddings_of_other_prompts_naming_the_port():
    block = SD3JointConditionerBlock(t5_length=4, t5_width=96)
    parts = {
        "clip_embedding": torch.zeros(2, 77, 32),
        "clip_pooled": torch.zeros(2, 32),
        "clip_2_embedding": torch.zeros(2, 77, 48),
        "clip_2_pooled": torch.zeros(2, 48),
    }
    assert block(**parts)["embedding"].shape == (2, 77 + 4, 96)
    with pytest.raises(wg.ConfigError) as info:
        block(**parts | {"clip_2_embedding": torch.zeros(1, 77, 48)})
    assert info.value.path == "clip_2_embedding"
    with pytest.raises(wg.ConfigError) as info:
        block(**parts, t5_embedding=torch.zeros(3, 4, 96))
    assert info.value.path == "t5_embedding"
