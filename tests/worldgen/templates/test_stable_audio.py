"""The stable-audio family's text_to_audio gives exactly what `StableAudioPipeline` gives (same components,
prompt, negative prompt, seed, steps, guidance, span), after save/load, from a save_pretrained directory found by
its model_index.json, and on Ray with the denoising loop fused on the DiT's host; spans the model cannot make are
refused naming `duration` (or `start`), the maximum and the model before any weights load."""

from __future__ import annotations

import diffusers
import pytest
import torch

import worldgen as wg
from worldgen.models.presets import preset_pipeline_components, save_preset_pipeline
from worldgen.preflight import preflight

STEPS, GUIDANCE, SEED = 3, 7.0, 0
TOL = 1e-4
PRESET = "stable-audio-tiny"
PROMPT = "a dog barking in the rain"


@pytest.fixture(scope="module")
def components():
    return preset_pipeline_components(PRESET)


def pipeline(components) -> diffusers.StableAudioPipeline:
    pipe = diffusers.StableAudioPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, duration: float = 1.5, start: float = 0.0, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE} | kwargs
    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        PROMPT,
        audio_start_in_s=start,
        audio_end_in_s=start + duration,
        generator=generator,
        output_type="pt",
        **kwargs,
    ).audios


def template(**options) -> wg.Graph:
    options = {"preset": PRESET, "steps": STEPS, "guidance_scale": GUIDANCE} | options
    return wg.Graph.from_template("text_to_audio", **options)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_text_to_audio_matches_the_pipeline_and_after_save_load(components, tmp_path):
    expected = reference(pipeline(components))
    graph = template()
    out = graph.run({"prompt": PROMPT, "duration": 1.5}, seed=SEED)
    assert out["sample_rate"] == 16 and out["audio"].shape == (1, 2, 24)  # 1.5 s of 16 Hz stereo
    assert max_diff(out["audio"], expected) <= TOL
    graph.save(tmp_path / "saved")
    reloaded = wg.Graph.load(tmp_path / "saved")
    assert max_diff(reloaded.run({"prompt": PROMPT, "duration": 1.5}, seed=SEED)["audio"], expected) <= TOL


def test_negative_prompt_span_and_seed_as_the_pipeline(components):
    pipe, graph = pipeline(components), template()
    expected = reference(pipe, duration=1.0, start=0.25, negative_prompt="a quiet room")
    inputs = {"prompt": PROMPT, "negative_prompt": "a quiet room", "start": 0.25, "duration": 1.0}
    got = graph.run(inputs, seed=SEED)["audio"]
    assert got.shape == (1, 2, 16) and max_diff(got, expected) <= TOL
    # The negative prompt, the span and the seed each change the audio.
    assert max_diff(got, reference(pipe, duration=1.0, start=0.25)) > 1e-3
    assert max_diff(graph.run({"prompt": PROMPT, "duration": 1.0}, seed=SEED)["audio"], expected) > 1e-3
    assert max_diff(graph.run(inputs, seed=SEED + 1)["audio"], expected) > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guidance_as_the_pipeline_including_none_at_one(components, guidance):
    graph = template(steps=2, guidance_scale=guidance, duration=2.0)
    assert ("tok_neg" in graph.node_ids) == (guidance > 1)
    expected = reference(pipeline(components), duration=2.0, num_inference_steps=2, guidance_scale=guidance)
    # The template's duration is the input's default (None: the longest clip, as the pipeline's default end).
    assert max_diff(graph.run({"prompt": PROMPT}, seed=SEED)["audio"], expected) <= TOL
    assert template(duration=None).input_ports()["duration"].default == 2.0


def test_from_a_save_pretrained_directory_through_family_detection(components, tmp_path):
    model = save_preset_pipeline(PRESET, tmp_path / "model")
    graph = wg.Graph.from_template("text_to_audio", model=str(model), steps=STEPS, guidance_scale=GUIDANCE)
    assert graph.block("dit").block_type == "backbone/stable_audio_dit"
    got = graph.run({"prompt": PROMPT, "duration": 1.5}, seed=SEED)["audio"]
    assert max_diff(got, reference(pipeline(components))) <= TOL
    # An image family has no audio graph, and this model no image one: each said plainly.
    with pytest.raises(wg.ConfigError, match="the sd family has no text_to_audio graph"):
        wg.Graph.from_template("text_to_audio", preset="tiny")
    with pytest.raises(wg.ConfigError, match="the stable-audio family has no text_to_image graph"):
        wg.Graph.from_template("text_to_image", model=str(model))


@pytest.mark.parametrize(
    ("inputs", "path", "message"),
    [
        ({"duration": 2.5}, "inputs.duration", f"longer than model 'preset:{PRESET}' makes: at most 2 s"),
        ({"duration": 0}, "inputs.duration", "more than 0 seconds"),
        ({"duration": -1.0, "start": 1.0}, "inputs.duration", "more than 0 seconds"),
        ({"duration": 1.0, "start": 1.5}, "inputs.start", "past the 2 s"),
    ],
)
def test_a_span_the_model_cannot_make_is_refused_before_any_weights(inputs, path, message):
    graph = template(steps=2)
    err = pytest.raises(wg.ConfigError, preflight, graph, {"prompt": PROMPT, **inputs}).value
    assert err.path == path and message in err.detail and "(node '" in err.detail
    assert not any(graph.block(node).model_loaded for node in ("te", "cond", "dit", "vae"))
    with pytest.raises(wg.ConfigError, match=message):  # a run without preflight is refused all the same
        graph.run({"prompt": PROMPT, **inputs}, seed=SEED)


@pytest.mark.parametrize(("options", "path"), [({"steps": 0}, "steps"), ({"solver": "ddim"}, "solver")])
def test_bad_options_are_refused_naming_them(options, path):
    with pytest.raises(wg.ConfigError) as info:
        template(**options)
    assert info.value.path == path


def test_on_ray_fused_equals_local(clean_hosts):
    from actors.model_host import host_name, list_hosts

    graph = template(steps=2)
    inputs = {"prompt": PROMPT, "negative_prompt": "a quiet room", "duration": 1.5}
    local = graph.run(inputs, seed=SEED)["audio"]
    remote = graph.run(inputs, seed=SEED, executor="ray", fuse_loops=True)
    assert remote["sample_rate"] == 16 and max_diff(remote["audio"], local) <= 1e-5
    # The whole denoising loop (the solver's Brownian tree with it) is one call on the DiT's host.
    hosts = list_hosts()
    assert next(h["calls"] for h in hosts if h["name"] == host_name(graph.block("dit"))) == 1
    # T5, the projection, the DiT and the VAE (tokenizers run inline); each loaded once.
    assert len(hosts) == 4 and all(h["loads"] == 1 for h in hosts)
