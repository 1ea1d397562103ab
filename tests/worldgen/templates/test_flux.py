"""Flux templates (worldgen/templates/flux.py): the graphs give exactly what FluxPipeline / FluxImg2ImgPipeline
give on the same components, seed and settings (locally, on Ray, after save/load, from a save_pretrained
directory), follow the model's defaults, and refuse bad input before any weights load."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import preset_pipeline, save_preset_pipeline
from worldgen.preflight import preflight

TOL = 1e-4  # graph vs pipeline
RAY_TOL = 1e-5  # Ray vs local
STEPS, SEED = 2, 0
NEGATIVE = "blurry, dark"


def reference(preset: str, pipeline: type = FluxPipeline, **call) -> torch.Tensor:
    """The diffusers pipeline's image for the preset's components (`pipeline` built from them)."""
    pipe = pipeline(**preset_pipeline(preset).components)
    pipe.set_progress_bar_config(disable=True)
    dev = pipe.transformer.config.guidance_embeds
    call = {"num_inference_steps": STEPS, "max_sequence_length": 512 if dev else 256, **call}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="pt", **call).images


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def loaded(graph: wg.Graph) -> list[str]:
    return [n for n, b in graph.blocks() if isinstance(b, wg.ModelBlock) and b.model_loaded]


@pytest.fixture(scope="module")
def init_image() -> torch.Tensor:
    # 40x56 is no multiple of 16: both sides resize it down to 32x48 (the pipeline's image processor).
    return torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(7))


def test_schnell_text_to_image_matches_the_pipeline_and_after_save_load(tmp_path):
    size = {"height": 32, "width": 48}  # not square: a swapped packing would show
    expected = reference("flux-tiny", guidance_scale=0.0, **size)
    graph = wg.Graph.from_template("text_to_image", preset="flux-tiny", steps=STEPS)
    assert diff(graph.run({"prompt": PROMPT, **size}, seed=SEED)["image"], expected) <= TOL

    graph.save(tmp_path / "saved")
    reloaded = wg.Graph.load(tmp_path / "saved")
    assert diff(reloaded.run({"prompt": PROMPT, **size}, seed=SEED)["image"], expected) <= TOL


def test_dev_text_to_image_with_guidance_and_true_cfg_matches_the_pipeline():
    graph = wg.Graph.from_template("text_to_image", preset="flux-dev-tiny", steps=STEPS)
    base = {"prompt": PROMPT, "guidance_scale": 5.0}  # the distilled guidance (not the default 3.5)
    plain = graph.run(base, seed=SEED)["image"]
    assert diff(plain, reference("flux-dev-tiny", guidance_scale=5.0, height=32, width=32)) <= TOL

    # True CFG: a negative prompt and a scale over 1 (two transformer calls per step), with a second prompt.
    cfg = {"prompt_2": "a red ship", "negative_prompt": NEGATIVE, "true_cfg_scale": 2.0}
    expected = reference("flux-dev-tiny", guidance_scale=5.0, height=32, width=32, **cfg)
    assert diff(graph.run({**base, **cfg}, seed=SEED)["image"], expected) <= TOL
    # A negative prompt at scale 1, or only a negative_prompt_2, is no true CFG (as in diffusers).
    for inputs in ({"negative_prompt": NEGATIVE}, {"negative_prompt_2": NEGATIVE, "true_cfg_scale": 2.0}):
        assert torch.equal(graph.run({**base, **inputs}, seed=SEED)["image"], plain)


def test_image_to_image_matches_the_pipeline(init_image):
    graph = wg.Graph.from_template("image_to_image", preset="flux-dev-tiny", steps=4, strength=0.6)
    got = graph.run({"prompt": PROMPT, "image": init_image}, seed=SEED)["image"]
    # Asked for the image's own size (diffusers' own default is 1024x1024), the pipeline resizes as the graph.
    expected = reference(
        "flux-dev-tiny",
        FluxImg2ImgPipeline,
        image=init_image,
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=40,
        width=56,
    )
    assert got.shape == (1, 3, 32, 48)
    assert diff(got, expected) <= TOL


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_preset_pipeline("flux-tiny", tmp_path_factory.mktemp("flux-tiny"))


def test_family_found_from_a_save_pretrained_directory(flux_dir, init_image):
    graph = wg.Graph.from_template("text_to_image", model=str(flux_dir), steps=STEPS)
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        max_sequence_length=256,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
    ).images
    got = graph.run({"prompt": PROMPT}, seed=SEED)["image"]  # its default size: the VAE's sample_size
    assert got.shape == (1, 3, 32, 32) and diff(got, expected) <= TOL
    i2i = wg.Graph.from_template("image_to_image", model=str(flux_dir))
    assert i2i.block("vae_enc").config.pixel_multiple == 16


def test_defaults_follow_the_transformer():
    schnell = wg.Graph.from_template("text_to_image", preset="tiny", family="flux")  # flux-tiny
    dev = wg.Graph.from_template("image_to_image", preset="flux-dev-tiny")
    for graph, steps, guidance, tokens in ((schnell, 4, 0.0, 256), (dev, 28, 3.5, 512)):
        assert graph.block("schedule").config.num_inference_steps == steps
        assert graph.exposed_inputs["guidance_scale"].default == guidance
        assert graph.block("tok_2").config.max_length == tokens
        assert graph.exposed_inputs["true_cfg_scale"].default == 1.0
        assert not loaded(graph)  # sized from configs alone


def test_a_size_that_is_no_multiple_of_16_is_refused_before_weights_load():
    graph = wg.Graph.from_template("text_to_image", preset="flux-tiny", steps=STEPS)
    for field in ("height", "width"):
        with pytest.raises(ConfigError, match=r"multiples of 16, got .*\(node 'noise'\)") as err:
            preflight(graph, {"prompt": PROMPT, field: 40})
        assert err.value.path == f"inputs.{field}"
    with pytest.raises(ConfigError, match=r"node 'noise'.*multiples of 16") as err:
        graph.run({"prompt": PROMPT, "width": 24}, seed=SEED)
    assert err.value.path == "width"
    assert not loaded(graph)


def test_a_prompt_over_the_t5_limit_is_refused():
    graph = wg.Graph.from_template("text_to_image", preset="flux-tiny", max_sequence_length=8)
    long_prompt = "a photo of the old harbor at dawn with a red boat"
    with pytest.raises(ConfigError, match=r"at most 8 .*\(node 'tok_2'\)") as err:
        preflight(graph, {"prompt": long_prompt})
    assert err.value.path == "inputs.prompt"  # the T5 tokenizer read the prompt (no prompt_2)
    with pytest.raises(ConfigError, match=r"\(node 'tok_2'\)") as err:
        preflight(graph, {"prompt": PROMPT, "prompt_2": long_prompt})
    assert err.value.path == "inputs.prompt_2"
    with pytest.raises(ConfigError, match="max_sequence_length must be 1 to 512") as err:
        wg.Graph.from_template("text_to_image", preset="flux-tiny", max_sequence_length=513)
    assert err.value.path == "max_sequence_length"


@pytest.mark.parametrize(("missing", "node"), [("text_encoder_2", "te_2"), ("text_encoder", "te")])
def test_a_missing_text_encoder_names_its_node(tmp_path, missing, node):
    from worldgen.templates.families import model_index

    # A Flux pipeline saved without that encoder: its model_index.json names it null.
    index = {**model_index("preset:flux-tiny"), missing: [None, None]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"node '{node}' \(conditioner/.*has none") as err:
        wg.Graph.from_template("text_to_image", model=str(tmp_path))
    assert err.value.path == f"nodes.{node}.config.model"


def test_flux_graphs_on_ray_equal_local(clean_hosts, init_image):
    """One test for both modes: its six model hosts (one per component) start once."""
    from actors.model_host import host_name, list_hosts

    t2i = wg.Graph.from_template("text_to_image", preset="flux-dev-tiny", steps=STEPS)
    i2i = wg.Graph.from_template("image_to_image", preset="flux-dev-tiny", steps=3)
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "true_cfg_scale": 2.0}
    local = t2i.run(inputs, seed=SEED)["image"]

    def transformer_calls() -> int:
        return next(h["calls"] for h in list_hosts() if h["name"] == host_name(t2i.block("flux")))

    # Fused, the whole denoising loop is one call on the transformer's host; unfused, one call per step.
    assert diff(t2i.run(inputs, seed=SEED, executor="ray")["image"], local) <= RAY_TOL
    assert transformer_calls() == 1
    assert diff(t2i.run(inputs, seed=SEED, executor="ray", fuse_loops=False)["image"], local) <= RAY_TOL
    assert transformer_calls() == 1 + STEPS
    i2i_inputs = {"prompt": PROMPT, "image": init_image}
    remote = i2i.run(i2i_inputs, seed=SEED, executor="ray")["image"]
    assert diff(remote, i2i.run(i2i_inputs, seed=SEED)["image"]) <= RAY_TOL
