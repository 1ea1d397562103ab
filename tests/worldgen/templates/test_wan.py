"""Wan templates (worldgen/templates/wan.py): text_to_video and image_to_video give what WanPipeline /
WanImageToVideoPipeline give on the same components, seed and settings (UniPC and flow-match Euler; locally, on
Ray with the denoising loop fused on the transformer's host, after save/load, from a save_pretrained directory),
and refuse bad sizes and frame counts before any model loads."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import preset_pipeline, save_preset_pipeline
from worldgen.preflight import preflight

TOL = 1e-4  # graph vs pipeline
RAY_TOL = 1e-5  # Ray vs local
STEPS, SEED = 2, 0
NEGATIVE = "blurry, dark"
SIZE = {"height": 32, "width": 48, "frames": 9}  # not square: swapped axes would show


def reference(pipe, **call) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": STEPS, "num_frames": 9, "height": 32, "width": 48, **call}
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="pt", **call).frames


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def loaded(graph: wg.Graph) -> list[str]:
    return [n for n, b in graph.blocks() if isinstance(b, wg.ModelBlock) and b.model_loaded]


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    # 24x40: the first frame is resized to the clip's 32x48, as the pipeline's video processor does.
    pixels = torch.rand(24, 40, 3, generator=torch.Generator().manual_seed(3))
    return Image.fromarray((pixels * 255).byte().numpy())


def test_text_to_video_with_unipc_matches_the_pipeline_and_after_save_load(tmp_path):
    expected = reference(WanPipeline(**preset_pipeline("wan-tiny").components), negative_prompt=NEGATIVE)
    graph = wg.Graph.from_template("text_to_video", preset="wan-tiny", steps=STEPS)
    assert graph.block("schedule").block_type == "solver/unipc"  # the checkpoint's own scheduler
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **SIZE}
    got = graph.run(inputs, seed=SEED)["video"]
    assert got.shape == (1, 9, 3, 32, 48) and diff(got, expected) <= TOL

    graph.save(tmp_path / "saved")
    assert diff(wg.Graph.load(tmp_path / "saved").run(inputs, seed=SEED)["video"], expected) <= TOL


def test_text_to_video_with_flow_match_euler_matches_the_pipeline():
    # Euler with the model's flow shift (3.0), as a diffusers user swaps the scheduler; guidance 1: one call a step.
    components = {
        **preset_pipeline("wan-tiny").components,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    expected = reference(WanPipeline(**components), num_frames=5, num_inference_steps=3, guidance_scale=1.0)
    graph = wg.Graph.from_template(
        "text_to_video", preset="wan-tiny", solver="flow_match_euler", steps=3, guidance_scale=1.0
    )
    got = graph.run({"prompt": PROMPT, "height": 32, "width": 48, "frames": 5}, seed=SEED)["video"]
    assert got.shape == (1, 5, 3, 32, 48) and diff(got, expected) <= TOL


def test_image_to_video_matches_the_pipeline(picture):
    pipe = WanImageToVideoPipeline(**preset_pipeline("wan-i2v-tiny").components)
    expected = reference(pipe, image=picture, negative_prompt=NEGATIVE, guidance_scale=4.0)
    graph = wg.Graph.from_template("image_to_video", preset="wan-i2v-tiny", steps=STEPS, guidance_scale=4.0)
    got = graph.run({"prompt": PROMPT, "negative_prompt": NEGATIVE, "image": picture, **SIZE}, seed=SEED)
    assert diff(got["video"], expected) <= TOL


def test_wan22_expand_timesteps_image_and_text_to_video_match_the_pipelines(picture):
    # Wan 2.2 TI2V: no image encoder; the image's latent is the first latent frame at timestep 0.
    pipe = preset_pipeline("wan22-ti2v-tiny")  # a WanImageToVideoPipeline with expand_timesteps
    size = {"height": 32, "width": 64, "frames": 9}  # multiples of 32: the Wan 2.2 VAE compresses 16x
    expected = reference(pipe, image=picture, negative_prompt=NEGATIVE, height=32, width=64)
    graph = wg.Graph.from_template("image_to_video", preset="wan22-ti2v-tiny", steps=STEPS)
    assert "image_enc" not in dict(graph.blocks())
    got = graph.run({"prompt": PROMPT, "negative_prompt": NEGATIVE, "image": picture, **size}, seed=SEED)
    assert diff(got["video"], expected) <= TOL

    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "image_processor")}
    expected = reference(WanPipeline(**components, expand_timesteps=True), height=32, width=64, num_frames=5)
    graph = wg.Graph.from_template("text_to_video", preset="wan22-ti2v-tiny", steps=STEPS)
    got = graph.run({"prompt": PROMPT, "height": 32, "width": 64, "frames": 5}, seed=SEED)["video"]
    assert diff(got, expected) <= TOL
    with pytest.raises(ConfigError, match="positive multiple of 32") as err:
        preflight(graph, {"prompt": PROMPT, "width": 48})
    assert err.value.path == "inputs.width"


def test_family_found_from_a_save_pretrained_directory(tmp_path, picture):
    folder = save_preset_pipeline("wan-i2v-tiny", tmp_path / "wan-i2v")
    graph = wg.Graph.from_template("image_to_video", model=str(folder), steps=STEPS)
    expected = reference(WanImageToVideoPipeline.from_pretrained(folder), image=picture)
    got = graph.run({"prompt": PROMPT, "image": picture, **SIZE}, seed=SEED)["video"]
    assert diff(got, expected) <= TOL
    # A video model has no image graph: the error names the graphs it has.
    with pytest.raises(ConfigError, match="wan family has no text_to_image graph; it has: text_to_video"):
        wg.Graph.from_template("text_to_image", model=str(folder))


def test_defaults_and_exposed_ports():
    graph = wg.Graph.from_template("image_to_video", preset="wan-i2v-tiny")
    assert {
        "prompt",
        "negative_prompt",
        "image",
        "width",
        "height",
        "frames",
        "steps",
        "guidance_scale",
    } <= set(graph.exposed_inputs)
    assert set(graph.exposed_outputs) == {"video"}
    assert graph.exposed_inputs["guidance_scale"].default == 5.0  # WanPipeline's
    assert graph.block("schedule").config.num_inference_steps == 50
    assert graph.block("tok").config.max_length == 512
    assert not loaded(graph)  # sized from configs alone


def test_bad_sizes_frames_and_solvers_are_refused_before_models_load(picture):
    graph = wg.Graph.from_template("image_to_video", preset="wan-i2v-tiny", steps=STEPS)
    base = {"prompt": PROMPT, "image": picture}
    cases = [
        ({"frames": 0}, "frames", "nearest valid: 1 or 5"),
        ({"frames": 10}, "frames", "nearest valid: 9 or 13"),
        ({"frames": -4}, "frames", "frames must be 4k\\+1"),
        ({"width": 40}, "width", "positive multiple of 16.*got 40"),
        ({"height": 24}, "height", "positive multiple of 16.*got 24"),
        ({"height": 1024}, "height", "at most 512"),  # the tiny transformer's 32 rope positions per axis
    ]
    for extra, port, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            preflight(graph, {**base, **extra})
        assert err.value.path == f"inputs.{port}"
    with pytest.raises(ConfigError, match="frames must be 4k\\+1") as err:
        graph.run({**base, "frames": 6}, seed=SEED)
    assert err.value.path == "frames"
    assert not loaded(graph)
    with pytest.raises(ConfigError, match="flow-matching model: solver must be one of unipc") as err:
        wg.Graph.from_template("text_to_video", preset="wan-tiny", solver="ddim")
    assert err.value.path == "solver"
    with pytest.raises(ConfigError, match="no image-to-video model") as err:
        wg.Graph.from_template("image_to_video", preset="wan-tiny")
    assert err.value.path == "model"
    with pytest.raises(ConfigError, match="image-to-video model .*use image_to_video") as err:
        wg.Graph.from_template("text_to_video", preset="wan-i2v-tiny")
    assert err.value.path == "model"


def test_wan_graphs_on_ray_equal_local_with_the_loop_fused(clean_hosts, picture):
    """One test for both graphs: their model hosts start once."""
    from actors.model_host import host_name, list_hosts

    t2v = wg.Graph.from_template("text_to_video", preset="wan-tiny", steps=STEPS)
    i2v = wg.Graph.from_template(
        "image_to_video", preset="wan-i2v-tiny", steps=STEPS, solver="flow_match_euler"
    )

    def transformer_calls(graph: wg.Graph) -> int:
        return next(h["calls"] for h in list_hosts() if h["name"] == host_name(graph.block("wan")))

    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **SIZE}
    # Fused, the whole denoising loop is one call on the transformer's host.
    assert (
        diff(t2v.run(inputs, seed=SEED, executor="ray")["video"], t2v.run(inputs, seed=SEED)["video"])
        <= RAY_TOL
    )
    assert transformer_calls(t2v) == 1
    i2v_inputs = {**inputs, "image": picture}
    remote = i2v.run(i2v_inputs, seed=SEED, executor="ray")["video"]
    assert diff(remote, i2v.run(i2v_inputs, seed=SEED)["video"]) <= RAY_TOL
    assert transformer_calls(i2v) == 1
