"""The `ip_adapter:` template option (worldgen/templates/ip_adapter.py) gives the diffusers pipelines' images after
`load_ip_adapter` + `set_ip_adapter_scale` (SD text to image and image to image, SDXL text to image), leaves a
graph on the same UNet without the adapter bit-identical, matches on Ray, and refuses adapters that do not fit."""

from __future__ import annotations

import diffusers
import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.images import to_pil
from worldgen.models.presets import preset_pipeline_components
from worldgen.models.tiny_ip_adapter import WEIGHT_NAME, save_preset_ip_adapter

STEPS, SEED, SCALE, STRENGTH = 2, 0, 0.6, 0.7
TOL, RAY_TOL = 1e-4, 1e-5


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


@pytest.fixture(scope="module")
def reference():
    """The reference image as a world passes one (a PIL picture of an earlier episode's image)."""
    return to_pil(torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(3)))[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The IP-Adapter presets as the folders diffusers' `load_ip_adapter` reads."""
    root = tmp_path_factory.mktemp("ip-adapters")
    return {
        name: save_preset_ip_adapter(name, root / name)
        for name in ("ip-adapter-tiny", "ip-adapter-sdxl-tiny")
    }


def with_ip_adapter(pipe, folder):
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHT_NAME)
    pipe.set_ip_adapter_scale(SCALE)
    return pipe


def sd_pipe(cls, folder):
    components = preset_pipeline_components("tiny")
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return with_ip_adapter(pipe, folder)


def test_sd_text_to_image_matches_diffusers_and_a_plain_graph_stays_unchanged(folders, reference, tmp_path):
    plain = wg.Graph.from_template("text_to_image", preset="tiny", steps=STEPS)
    before = plain.run({"prompt": PROMPT}, seed=SEED)["image"]

    pipe = sd_pipe(diffusers.StableDiffusionPipeline, folders["ip-adapter-tiny"])
    expected = pipe(
        PROMPT, ip_adapter_image=reference, num_inference_steps=STEPS, generator=generator(), output_type="pt"
    ).images
    graph = wg.Graph.from_template(
        "text_to_image",
        preset="tiny",
        steps=STEPS,
        ip_adapter={"model": "preset:ip-adapter-tiny", "scale": SCALE},
    )
    got = graph.run({"prompt": PROMPT, "ip_adapter_image": reference}, seed=SEED)["image"]
    assert close(got, expected)
    assert not close(got, before, 1e-3)  # the image prompt reaches the UNet

    # The plain graph shares the pooled UNet the adapter used: it gives the same image, bit for bit, and the
    # UNet's state dict (what a checkpoint saves) holds no adapter weights.
    assert torch.equal(plain.run({"prompt": PROMPT}, seed=SEED)["image"], before)
    unet = plain.block("unet").model
    assert unet is graph.block("unet").model
    assert not any("ip" in key for key in unet.state_dict())

    # Saved after running (the UNet checkpointed strictly, without the adapter), it loads and gives the image.
    graph.save(tmp_path / "saved")
    loaded = wg.Graph.load(tmp_path / "saved")
    assert close(loaded.run({"prompt": PROMPT, "ip_adapter_image": reference}, seed=SEED)["image"], expected)

    # The scale is an input: another scale, another image.
    other = graph.run({"prompt": PROMPT, "ip_adapter_image": reference, "ip_adapter_scale": 0.1}, seed=SEED)
    assert not close(other["image"], got, 1e-3)


def test_sd_image_to_image_matches_diffusers(folders, reference, init_image):
    pipe = sd_pipe(diffusers.StableDiffusionImg2ImgPipeline, folders["ip-adapter-tiny"])
    kwargs = {"image": init_image, "strength": STRENGTH, "negative_prompt": "a dog"}
    expected = pipe(
        PROMPT,
        ip_adapter_image=reference,
        num_inference_steps=3,
        generator=generator(),
        output_type="pt",
        **kwargs,
    ).images
    graph = wg.Graph.from_template(
        "image_to_image",
        preset="tiny",
        steps=3,
        ip_adapter={"model": "preset:ip-adapter-tiny", "scale": SCALE},
    )
    got = graph.run({"prompt": PROMPT, "ip_adapter_image": reference, **kwargs}, seed=SEED)["image"]
    assert close(got, expected)


def test_sdxl_text_to_image_from_an_adapter_folder_matches_diffusers(folders, reference):
    """The adapter named as diffusers names it: a folder, its weight name and its image_encoder subfolder."""
    folder = folders["ip-adapter-sdxl-tiny"]
    pipe = with_ip_adapter(
        diffusers.StableDiffusionXLPipeline(**preset_pipeline_components("sdxl-tiny")), folder
    )
    expected = pipe(
        PROMPT, ip_adapter_image=reference, num_inference_steps=STEPS, generator=generator(), output_type="pt"
    ).images
    spec = {"model": str(folder), "weight_name": WEIGHT_NAME, "scale": SCALE}
    graph = wg.Graph.from_template("text_to_image", preset="sdxl-tiny", steps=STEPS, ip_adapter=spec)
    assert graph.block("ip_adapter").config.model.source == str(folder)
    assert close(graph.run({"prompt": PROMPT, "ip_adapter_image": reference}, seed=SEED)["image"], expected)


@pytest.mark.parametrize(
    ("preset", "spec", "path", "match"),
    [
        # SDXL's adapter on SD's UNet: other text width (64, the two CLIPs, vs 32) and layer count.
        ("tiny", {"model": "preset:ip-adapter-sdxl-tiny"}, "ip_adapter.model", r"made for another UNet"),
        ("tiny", {"model": "preset:ip-adapter-tiny", "scale": "strong"}, "ip_adapter.scale", r"number"),
        (
            "tiny",
            {"model": "/no/such/folder", "weight_name": "w.safetensors"},
            "ip_adapter.model",
            r"w.safetensors",
        ),
        ("tiny", {"model": "h94/IP-Adapter"}, "ip_adapter.weight_name", r"name the weights file"),
        ("flux-tiny", {"model": "preset:ip-adapter-tiny"}, "ip_adapter", r"not on flux"),
    ],
)
def test_an_adapter_that_does_not_fit_is_refused_when_the_graph_is_built(preset, spec, path, match):
    with pytest.raises(ConfigError, match=match) as err:
        wg.Graph.from_template("text_to_image", preset=preset, ip_adapter=spec)
    assert err.value.path == path


def test_a_weights_file_with_other_keys_is_refused_naming_them(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora.down.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"no IP-Adapter weights file.*image_proj.*lora.down.weight") as err:
        wg.Graph.from_template(
            "text_to_image",
            preset="tiny",
            ip_adapter={"model": str(tmp_path), "weight_name": "other.safetensors"},
        )
    assert err.value.path == "ip_adapter.model"


def test_on_ray_equal_local_and_the_plain_graph_on_the_same_host_unchanged(clean_hosts, reference):
    from actors.model_host import list_hosts

    spec = {"model": "preset:ip-adapter-tiny", "scale": SCALE}
    graph = wg.Graph.from_template("text_to_image", preset="tiny", steps=STEPS, ip_adapter=spec)
    plain = wg.Graph.from_template("text_to_image", preset="tiny", steps=STEPS)
    inputs = {"prompt": PROMPT, "ip_adapter_image": reference}

    before = plain.run({"prompt": PROMPT}, seed=SEED, executor="ray")["image"]
    got = graph.run(inputs, seed=SEED, executor="ray")["image"]
    assert close(got, graph.run(inputs, seed=SEED)["image"], RAY_TOL)
    assert torch.equal(plain.run({"prompt": PROMPT}, seed=SEED, executor="ray")["image"], before)
    unets = [h for h in list_hosts() if h["class"].endswith("UNet2DConditionModel")]
    assert len(unets) == 1 and unets[0]["loads"] == 1  # both graphs on one UNet host
