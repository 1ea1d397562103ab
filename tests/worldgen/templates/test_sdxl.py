"""SDXL templates (worldgen/templates/sdxl.py) give exactly the diffusers pipelines' images: text to image, image
to image (base and refiner) and base + refiner chained, on the tiny presets, from save_pretrained directories
through family detection, after save/load and on Ray; a missing text encoder is a clear error before any load."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors import safe_open

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.block import ModelRef
from worldgen.errors import ConfigError
from worldgen.models.pool import default_pool
from worldgen.models.presets import preset_pipeline, preset_pipeline_components, save_preset_pipeline

STEPS, STRENGTH, SEED, FRAC = 3, 0.6, 0, 0.7
TOL, RAY_TOL = 1e-4, 1e-5
SHARED = ("vae", "text_encoder_2")  # the refiner's components that are the base's
# Everything diffusers reads from the call besides the prompt: negatives, the second prompt, micro-conditioning.
EXTRAS = {
    "negative_prompt": "a dog",
    "prompt_2": "a castle",
    "original_size": (64, 48),
    "crops_coords_top_left": (4, 2),
    "target_size": (32, 32),
}


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe():
    return quiet(preset_pipeline("sdxl-tiny"))


@pytest.fixture(scope="module")
def refiner_pipe(base_pipe):
    """The refiner as diffusers' docs load it: the base's VAE and text_encoder_2."""
    components = preset_pipeline_components("sdxl-refiner-tiny")
    components |= {"vae": base_pipe.vae, "text_encoder_2": base_pipe.text_encoder_2}
    return quiet(
        diffusers.StableDiffusionXLImg2ImgPipeline(
            **components,
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    )


@pytest.fixture(scope="module")
def expected_t2i(base_pipe):
    return base_pipe(PROMPT, num_inference_steps=STEPS, generator=generator(), output_type="pt").images


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def test_text_to_image_matches_diffusers_and_survives_save_load(expected_t2i, tmp_path):
    graph = wg.Graph.from_template("text_to_image", preset="tiny", family="sdxl", steps=STEPS)
    got = graph.run({"prompt": PROMPT}, seed=SEED)["image"]
    assert close(got, expected_t2i)  # no negative prompt: zeros (force_zeros_for_empty_prompt)

    graph.save(tmp_path / "saved")
    assert close(wg.Graph.load(tmp_path / "saved").run({"prompt": PROMPT}, seed=SEED)["image"], expected_t2i)


def test_text_to_image_inputs_and_guidance_rescale_match_diffusers(base_pipe, expected_t2i):
    expected = base_pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        guidance_rescale=0.7,
        generator=generator(),
        output_type="pt",
        **EXTRAS,
    ).images
    graph = wg.Graph.from_template("text_to_image", preset="sdxl-tiny", steps=STEPS, guidance_rescale=0.7)
    got = graph.run({"prompt": PROMPT, "guidance_scale": 6.0, **EXTRAS}, seed=SEED)["image"]
    assert close(got, expected)
    assert not close(got, expected_t2i, 1e-3)  # the inputs reach the model


@pytest.mark.parametrize("preset", ["sdxl-tiny", "sdxl-refiner-tiny"])
def test_image_to_image_matches_diffusers(preset, init_image):
    """The base's image to image (target-size ids) and the refiner's (text_encoder_2 only, aesthetic ids)."""
    pipe = preset_pipeline(preset)
    if preset == "sdxl-tiny":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    kwargs = {"image": init_image, "strength": STRENGTH, "negative_prompt": "a dog"}
    expected = quiet(pipe)(
        PROMPT, num_inference_steps=4, generator=generator(), output_type="pt", **kwargs
    ).images
    graph = wg.Graph.from_template("image_to_image", preset=preset, steps=4)
    assert close(graph.run({"prompt": PROMPT, **kwargs}, seed=SEED)["image"], expected)


def _chained(base_pipe, refiner_pipe) -> torch.Tensor:
    """diffusers' documented ensemble of experts: base to `FRAC` as latents, the refiner from there."""
    latents = base_pipe(
        PROMPT, num_inference_steps=STEPS, denoising_end=FRAC, generator=generator(), output_type="latent"
    ).images
    return refiner_pipe(
        PROMPT,
        image=latents,
        num_inference_steps=STEPS,
        denoising_start=FRAC,
        generator=generator(),
        output_type="pt",
    ).images


def test_base_and_refiner_match_the_chained_pipelines_and_load_shared_components_once(
    base_pipe, refiner_pipe, tmp_path
):
    expected = _chained(base_pipe, refiner_pipe)
    pipeline = wg.Pipeline.from_template(
        "sdxl_base_refiner", preset="tiny", steps=STEPS, high_noise_frac=FRAC
    )
    refs = [
        ModelRef(source=f"preset:{p}", subfolder=c)
        for p in ("sdxl-tiny", "sdxl-refiner-tiny")
        for c in SHARED
    ]
    before = [default_pool().load_count(ref) for ref in refs]
    assert close(pipeline.run({"prompt": PROMPT}, seed=SEED)["image"], expected)

    # The refiner's nodes reference the base's VAE and text_encoder_2: they load at most once for both graphs,
    # and the refiner's own never.
    loads = [default_pool().load_count(ref) - n for ref, n in zip(refs, before, strict=True)]
    assert loads[:2] in ([0, 0], [0, 1], [1, 0], [1, 1]) and loads[2:] == [0, 0]
    assert {
        block.config.model.source
        for name, block in pipeline.named_blocks()
        if name.startswith("refiner.")
        and getattr(block.config, "model", None) is not None
        and block.config.model.subfolder in SHARED
    } == {"preset:sdxl-tiny"}
    # The hand-off point is an input: another fraction, another image.
    other = pipeline.run({"prompt": PROMPT, "high_noise_frac": 0.5}, seed=SEED)["image"]
    assert not close(other, expected, 1e-3)

    # Saved, the shared text encoder is stored once (the refiner's nodes are aliases of the base's).
    pipeline.save(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "checkpoint.safetensors", "pt") as checkpoint:
        aliases = json.loads(checkpoint.metadata()["aliases"])
    assert aliases["refiner.te_2"] == "base.te_2"
    assert close(wg.Pipeline.load(tmp_path / "saved").run({"prompt": PROMPT}, seed=SEED)["image"], expected)


def test_models_saved_with_save_pretrained_are_found_by_family(
    tmp_path, expected_t2i, base_pipe, refiner_pipe
):
    base_dir = save_preset_pipeline("sdxl-tiny", tmp_path / "base")
    refiner_dir = save_preset_pipeline("sdxl-refiner-tiny", tmp_path / "refiner")
    graph = wg.Graph.from_template("text_to_image", model=str(base_dir), steps=STEPS)
    assert close(graph.run({"prompt": PROMPT}, seed=SEED)["image"], expected_t2i)

    # The refiner's flags come from its model_index.json (aesthetic ids, no zeroed negative prompt).
    pipeline = wg.Pipeline.from_template(
        "sdxl_base_refiner", model=str(base_dir), refiner=str(refiner_dir), steps=STEPS, high_noise_frac=FRAC
    )
    assert close(pipeline.run({"prompt": PROMPT}, seed=SEED)["image"], _chained(base_pipe, refiner_pipe))


def test_a_missing_text_encoder_is_one_clear_error_before_any_load(tmp_path):
    loads = default_pool().loads
    with pytest.raises(
        ConfigError, match=r"node 'te' \(conditioner/clip_text\).*text_encoder.*refiner"
    ) as err:
        wg.Graph.from_template("text_to_image", preset="sdxl-refiner-tiny")
    assert err.value.path == "te.model"

    components = preset_pipeline_components("sdxl-tiny") | {"text_encoder_2": None}
    diffusers.StableDiffusionXLPipeline(**components).save_pretrained(tmp_path / "no-te2")
    for task in ("text_to_image", "image_to_image"):
        with pytest.raises(ConfigError, match=r"node 'te_2' .*text_encoder_2") as err:
            wg.Graph.from_template(task, model=str(tmp_path / "no-te2"))
        assert err.value.path == "te_2.model"
    assert default_pool().loads == loads  # found from model_index.json and configs only


@pytest.mark.parametrize(
    ("options", "inputs", "path"),
    [
        ({}, {"original_size": (64,)}, "inputs.original_size"),
        ({}, {"denoising_end": 1.5}, "inputs.denoising_end"),
        ({"components": {"vea": "x"}}, None, "components.vea"),
    ],
)
def test_bad_sdxl_inputs_are_refused_naming_them(options, inputs, path):
    from worldgen.preflight import preflight

    with pytest.raises(ConfigError) as err:
        graph = wg.Graph.from_template("text_to_image", preset="sdxl-tiny", **options)
        preflight(graph, {"prompt": PROMPT, **(inputs or {})})
    assert err.value.path == path


def test_on_ray_equal_local_fused_and_not(clean_hosts, expected_t2i):
    from actors.model_host import list_hosts

    graph = wg.Graph.from_template("text_to_image", preset="sdxl-tiny", steps=STEPS)
    for fuse in (True, False):
        got = graph.run({"prompt": PROMPT}, seed=SEED, executor="ray", fuse_loops=fuse)["image"]
        assert close(got, expected_t2i, TOL) and close(
            got, graph.run({"prompt": PROMPT}, seed=SEED)["image"], RAY_TOL
        )
    unet = next(h for h in list_hosts() if h["class"].endswith("UNet2DConditionModel"))
    assert unet["calls"] == 1 + STEPS  # fused: one call for the loop; unfused: one per step


def test_base_and_refiner_on_ray_host_each_shared_model_once(clean_hosts):
    from actors.model_host import list_hosts

    pipeline = wg.Pipeline.from_template(
        "sdxl_base_refiner", preset="tiny", steps=STEPS, high_noise_frac=FRAC
    )
    local = pipeline.run({"prompt": PROMPT}, seed=SEED)["image"]
    assert close(pipeline.run({"prompt": PROMPT}, seed=SEED, executor="ray")["image"], local, RAY_TOL)
    classes = sorted(h["class"].split(":")[1] for h in list_hosts())
    # One VAE and one text_encoder_2 for both graphs; a UNet each (tokenizers run inline, without a host).
    assert classes.count("AutoencoderKL") == 1 and classes.count("CLIPTextModelWithProjection") == 1
    assert classes.count("UNet2DConditionModel") == 2 and classes.count("CLIPTextModel") == 1
    assert all(h["loads"] == 1 for h in list_hosts())
    assert not any("sdxl-refiner-tiny" in h["name"] and "vae" in h["name"] for h in list_hosts())
