"""The sd3 family's graphs give exactly what `StableDiffusion3Pipeline` / `StableDiffusion3Img2ImgPipeline` give
(same components, prompts, seed, steps, guidance), with and without T5, after save/load, on Ray and from a
save_pretrained directory; bad models and inputs are refused naming the node and the field."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.models.presets import preset_pipeline_components, save_preset_pipeline
from worldgen.preflight import preflight

STEPS, GUIDANCE, STRENGTH, SEED = 3, 7.0, 0.6, 0
TOL = 1e-4
PRESET = "sd3-tiny"


@pytest.fixture(scope="module")
def components():
    return preset_pipeline_components(PRESET)


def pipeline(components, kind: str = "text_to_image", t5: bool = True):
    parts = dict(components)
    if not t5:
        parts |= {"text_encoder_3": None, "tokenizer_3": None}
    cls = (
        diffusers.StableDiffusion3Pipeline
        if kind == "text_to_image"
        else diffusers.StableDiffusion3Img2ImgPipeline
    )
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, **kwargs) -> torch.Tensor:
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE} | kwargs
    return pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="pt").images


def template(kind: str = "text_to_image", **options) -> wg.Graph:
    options = {"preset": "tiny", "family": "sd3", "steps": STEPS, "guidance_scale": GUIDANCE} | options
    return wg.Graph.from_template(kind, **options)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A diffusers SD3 directory written by save_pretrained (all three text encoders)."""
    return save_preset_pipeline(PRESET, tmp_path_factory.mktemp("sd3") / "model")


def test_text_to_image_matches_the_pipeline_and_after_save_load(components, tmp_path):
    expected = reference(pipeline(components))
    graph = template()
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["image"], expected) <= TOL
    graph.save(tmp_path / "saved")
    reloaded = wg.Graph.load(tmp_path / "saved")
    assert max_diff(reloaded.run({"prompt": PROMPT}, seed=SEED)["image"], expected) <= TOL


def test_without_t5_zeros_stand_in_as_in_the_pipeline(components):
    expected = reference(pipeline(components, t5=False))
    graph = template(text_encoder_3=False)
    assert not any(node in graph.node_ids for node in ("tok_3", "te_3"))
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["image"], expected) <= TOL
    # T5 matters: with it the image is another one.
    assert max_diff(reference(pipeline(components)), expected) > 1e-3


def test_second_and_third_prompts_and_negatives_default_to_the_first(components):
    graph = template(steps=2)
    pipe = pipeline(components)
    prompts = {
        "prompt_2": "a red castle",
        "prompt_3": "a blue ship",
        "negative_prompt": "night",
        "negative_prompt_3": "snow",
    }
    expected = reference(pipe, num_inference_steps=2, **prompts)
    assert max_diff(graph.run({"prompt": PROMPT, **prompts}, seed=SEED)["image"], expected) <= TOL
    same = graph.run({"prompt": PROMPT, "prompt_2": PROMPT, "prompt_3": ""}, seed=SEED)["image"]
    assert max_diff(same, graph.run({"prompt": PROMPT}, seed=SEED)["image"]) == 0.0
    assert max_diff(same, expected) > 1e-3


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_guidance_as_the_pipeline_including_none_below_one(components, guidance):
    graph = template(steps=2, guidance_scale=guidance)
    assert ("joint_neg" in graph.node_ids) == (guidance > 1)
    expected = reference(pipeline(components), num_inference_steps=2, guidance_scale=guidance)
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["image"], expected) <= TOL
    # The same scale given to a graph built for guidance: no guidance below 1 there either.
    guided = template(steps=2).run({"prompt": PROMPT, "guidance_scale": guidance}, seed=SEED)["image"]
    assert max_diff(guided, expected) <= TOL


def test_image_to_image_matches_the_pipeline(components):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = reference(pipeline(components, "image_to_image"), image=image, strength=STRENGTH)
    graph = template("image_to_image", strength=STRENGTH)
    assert max_diff(graph.run({"prompt": PROMPT, "image": image}, seed=SEED)["image"], expected) <= TOL


def test_from_a_save_pretrained_directory_through_family_detection(sd3_dir, components, tmp_path):
    graph = wg.Graph.from_template("text_to_image", model=str(sd3_dir), steps=STEPS, guidance_scale=GUIDANCE)
    assert graph.block("transformer").block_type == "backbone/sd3_transformer"
    expected = reference(pipeline(components))
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["image"], expected) <= TOL

    # Saved without T5 (text_encoder_3=None): the graph runs on zeros in its place, as the pipeline.
    no_t5 = pipeline(components, t5=False)
    no_t5.save_pretrained(tmp_path / "no_t5", safe_serialization=True)
    graph = wg.Graph.from_template("text_to_image", model=str(tmp_path / "no_t5"), steps=STEPS)
    assert "te_3" not in graph.node_ids
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["image"], reference(no_t5)) <= TOL


@pytest.mark.parametrize(("field", "node"), [("text_encoder_2", "te_2"), ("tokenizer", "tok")])
def test_a_missing_clip_component_names_node_and_field_before_any_weights(sd3_dir, tmp_path, field, node):
    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((broken / "model_index.json").read_text())
    index[field] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(wg.ConfigError) as info:
        wg.Graph.from_template("text_to_image", model=str(broken))  # no weights there to load
    assert info.value.path == f"{node}.model"
    assert f"node '{node}'" in info.value.detail and f"`{field}`" in info.value.detail


def test_a_prompt_too_long_for_t5_names_tok_3_before_any_weights():
    graph = template(steps=2, max_sequence_length=8)
    long = "a photo of a red castle in the old city at dawn"
    err = pytest.raises(wg.ConfigError, preflight, graph, {"prompt": long}).value
    assert err.path == "inputs.prompt" and "(node 'tok_3')" in err.detail and "at most 8" in err.detail
    err = pytest.raises(wg.ConfigError, preflight, graph, {"prompt": PROMPT, "prompt_3": long}).value
    assert err.path == "inputs.prompt_3"
    # Run anyway: the tokenizer refuses it before any encoder has loaded.
    with pytest.raises(wg.ConfigError, match="node 'tok_3'.*at fallback.*at most 8"):
        graph.run({"prompt": long}, seed=SEED)
    assert not any(graph.block(node).model_loaded for node in ("te", "te_2", "te_3", "transformer"))
    graph.run({"prompt": "a cat"}, seed=SEED)  # a short one runs


@pytest.mark.parametrize(
    ("inputs", "path", "message"),
    [
        ({"height": 42}, "inputs.height", "multiples of 4, got 42x32"),  # VAE x2, patches of 2
        ({"width": 30}, "inputs.width", "multiples of 4"),
        ({"width": 132}, "inputs.width", "at most 128"),  # 32 patches of 2 latent pixels of 2
    ],
)
def test_an_unsupported_size_is_refused_before_any_weights(inputs, path, message):
    graph = template(steps=2)
    err = pytest.raises(wg.ConfigError, preflight, graph, {"prompt": PROMPT, **inputs}).value
    assert err.path == path and message in err.detail and "(node 'noise')" in err.detail
    assert not any(graph.block(node).model_loaded for node in ("te", "te_2", "te_3", "transformer", "vae"))


@pytest.mark.parametrize(
    ("options", "path"),
    [({"max_sequence_length": 513}, "max_sequence_length"), ({"solver": "ddim"}, "solver")],
)
def test_bad_options_are_refused_naming_them(options, path):
    with pytest.raises(wg.ConfigError) as info:
        template(**options)
    assert info.value.path == path


def test_on_ray_fused_and_not_equals_local(clean_hosts):
    from actors.model_host import host_name, list_hosts

    # One test for both: the model hosts (tokenizers, text encoders, the transformer, the VAE) start once.
    graph = template(steps=2)
    local = graph.run({"prompt": PROMPT}, seed=SEED)["image"]

    def transformer_calls() -> int:
        return next(h["calls"] for h in list_hosts() if h["name"] == host_name(graph.block("transformer")))

    for fuse in (True, False):
        remote = graph.run({"prompt": PROMPT}, seed=SEED, executor="ray", fuse_loops=fuse)["image"]
        assert max_diff(remote, local) <= 1e-5, f"fuse_loops={fuse}"
        # Fused: the whole denoising loop is one call on the transformer's host; unfused, one per step.
        assert transformer_calls() == (1 if fuse else 1 + 2)
    hosts = list_hosts()
    # three text encoders, transformer, VAE (tokenizers run inline); the negative branch uses the same hosts
    assert len(hosts) == 5 and all(h["loads"] == 1 for h in hosts)
