"""Template graphs give exactly the diffusers pipelines' images (same components, prompt, seed, settings)."""

from __future__ import annotations

import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT, SOLVER_SCHEDULERS, diffusers_pipeline
from worldgen.models.loading import load_component

STEPS, GUIDANCE, STRENGTH, SEED = 4, 7.5, 0.6, 0
TOL = 1e-4


def reference(kind: str, solver: str, image=None, components=None) -> torch.Tensor:
    pipe = diffusers_pipeline(kind, solver, components)
    kwargs = {"image": image, "strength": STRENGTH} if kind == "image_to_image" else {}
    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=generator,
        output_type="pt",
        **kwargs,
    ).images


def run_graph(graph: wg.Graph, kind: str, image=None) -> torch.Tensor:
    inputs = {"prompt": PROMPT}
    if kind == "image_to_image":
        inputs |= {"image": image, "strength": STRENGTH}
    return graph.run(inputs, seed=SEED)["image"]


def template(kind: str, solver: str, **source) -> wg.Graph:
    extra = {"strength": STRENGTH} if kind == "image_to_image" else {}
    return wg.Graph.from_template(
        kind, solver=solver, steps=STEPS, guidance_scale=GUIDANCE, **source, **extra
    )


@pytest.mark.parametrize("solver", SOLVER_SCHEDULERS)
@pytest.mark.parametrize("kind", ["text_to_image", "image_to_image"])
def test_template_matches_diffusers_pipeline(kind, solver, init_image, tmp_path):
    expected = reference(kind, solver, init_image)

    graph = template(kind, solver, preset="tiny")
    got = run_graph(graph, kind, init_image)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL

    graph.save(tmp_path / "saved")
    reloaded = wg.Graph.load(tmp_path / "saved")
    assert (run_graph(reloaded, kind, init_image) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("solver", SOLVER_SCHEDULERS)
@pytest.mark.parametrize("kind", ["text_to_image", "image_to_image"])
def test_template_from_save_pretrained_directory(kind, solver, tiny_sd_dir, init_image):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def ref(subfolder, cls):
        return load_component(wg.ModelRef(source=str(tiny_sd_dir), subfolder=subfolder), cls)

    components = {
        "unet": ref("unet", UNet2DConditionModel),
        "vae": ref("vae", AutoencoderKL),
        "text_encoder": ref("text_encoder", CLIPTextModel),
        "tokenizer": ref("tokenizer", CLIPTokenizer),
        "scheduler": ref("scheduler", DDIMScheduler),
    }
    expected = reference(kind, solver, init_image, components)
    got = run_graph(template(kind, solver, model=str(tiny_sd_dir)), kind, init_image)
    assert (got - expected).abs().max().item() <= TOL


def test_same_seed_same_image_other_seed_other_image():
    graph = template("text_to_image", "euler_ancestral", preset="tiny")
    a = graph.run({"prompt": PROMPT}, seed=3)["image"]
    b = graph.run({"prompt": PROMPT}, seed=3)["image"]
    c = graph.run({"prompt": PROMPT}, seed=4)["image"]
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 1e-3


def test_guidance_and_steps_inputs_change_the_result():
    graph = template("text_to_image", "ddim", preset="tiny")
    base = graph.run({"prompt": PROMPT}, seed=0)["image"]
    assert not torch.equal(base, graph.run({"prompt": PROMPT, "guidance_scale": 2.0}, seed=0)["image"])
    assert not torch.equal(base, graph.run({"prompt": PROMPT, "steps": 2}, seed=0)["image"])
    expected = diffusers_pipeline("text_to_image", "ddim")(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert (graph.run({"prompt": PROMPT, "steps": 2}, seed=0)["image"] - expected).abs().max() <= TOL
