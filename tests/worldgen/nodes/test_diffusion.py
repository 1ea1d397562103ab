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


# ---- the flow-matching solver (SD3, Flux) ---------------------------------------------------------------
FLUX_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}


def _flow_reference(config: dict, steps: int, seq_len: int | None):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    if seq_len is None:  # SD3: the scheduler's own sigmas
        scheduler.set_timesteps(steps)
    else:  # Flux: linear sigmas, shifted by the image's sequence length
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_match_solver_steps_as_the_pipelines_do(family):
    from worldgen.registry import create_block

    torch.manual_seed(0)
    if family == "flux":  # a packed latent: 64 tokens of 16 channels
        config, sigmas, latent, seq_len = FLUX_SCHEDULER, "linear", torch.randn(1, 64, 16), 64
    else:
        config, sigmas, latent, seq_len = {"shift": 3.0}, "scheduler", torch.randn(1, 16, 8, 8), None
    solver = create_block("solver/flow_match_euler", {"scheduler": config, "sigmas": sigmas})
    reference = _flow_reference(config, 4, seq_len)

    out = solver(latent=latent, num_steps=4)
    assert torch.equal(out["state"].timesteps, reference.timesteps)
    assert torch.equal(out["latent"], latent) and torch.equal(out["model_input"], latent)  # no scaling
    expected = latent
    for t in reference.timesteps:
        pred = torch.randn_like(latent)
        expected = reference.step(pred, t, expected, return_dict=False)[0]
        out = solver(latent=out["latent"], pred=pred, state=out["state"])
        assert torch.equal(out["latent"], expected)
    assert out["state"].remaining == 0


def test_flow_match_image_to_image_starts_as_the_flux_pipeline():
    from worldgen.registry import create_block

    torch.manual_seed(1)
    image_latent, noise = torch.randn(1, 64, 16), torch.randn(1, 64, 16)
    solver = create_block("solver/flow_match_euler", {"scheduler": FLUX_SCHEDULER, "sigmas": "linear"})
    reference = _flow_reference(FLUX_SCHEDULER, 4, 64)
    # FluxImg2ImgPipeline.get_timesteps: t_start = int(4 - 4 * 0.6) = 1 (SD's rule would give 2)
    out = solver(latent=image_latent, noise=noise, strength=0.6, num_steps=4)
    assert torch.equal(out["state"].timesteps, reference.timesteps[1:])
    reference.set_begin_index(1)
    assert torch.equal(out["latent"], reference.scale_noise(image_latent, reference.timesteps[1:2], noise))
    with pytest.raises(wg.ConfigError, match="leaves no denoising step"):
        solver.check_inputs(
            {"num_steps": 4, "strength": 0.0, "state": None}
        )  # strength 0.1 still runs one (t_start 3)


def test_flow_match_training_sample_is_rectified_flow():
    from worldgen.registry import create_block

    solver = create_block("solver/flow_match_euler", {"scheduler": {"shift": 3.0}})
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy, timesteps, target = solver.training_sample(latents, noise, torch.Generator().manual_seed(0))
    sigma = (timesteps / 1000).reshape(-1, 1, 1, 1)  # the scheduler's training sigmas are t / 1000
    assert torch.allclose(noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6)
    assert torch.equal(target, noise - latents)
