"""Flux ControlNet on the Flux graph (worldgen/templates/flux_controlnet.py): the graph gives what
FluxControlNetPipeline gives on the same components, seed and settings, with one ControlNet, with two
(FluxMultiControlNetModel) acting in parts of the steps under true CFG, and on Ray; bad specs and control
images are refused naming the option or node and the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetPipeline, FluxMultiControlNetModel
from PIL import Image

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.errors import ConfigError
from worldgen.models.presets import build_preset_component, preset_pipeline
from worldgen.preflight import preflight
from worldgen.templates.flux_controlnet import attach_flux_controlnet

TOL = 1e-4  # graph vs pipeline
RAY_TOL = 1e-5  # Ray vs local
STEPS, SEED = 2, 0
SIZE = {"height": 32, "width": 48}  # not square: a swapped packing of the control latent would show
REF = {"source": "preset:flux-tiny", "dtype": "float32"}
TINY, UNION = "flux-controlnet-tiny", "flux-controlnet-union-tiny"


def picture(seed: int, height: int = 72, width: int = 88) -> Image.Image:
    """A random RGB picture of another size than the generation's (and no multiple of 16): both sides
    resize it to the generation size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(controlnet, **call) -> torch.Tensor:
    """FluxControlNetPipeline's image on flux-tiny's components with `controlnet`."""
    pipe = FluxControlNetPipeline(**preset_pipeline("flux-tiny").components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": STEPS, "guidance_scale": 0.0, "max_sequence_length": 256, **SIZE, **call}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="pt", **call).images


def controlled(specs) -> wg.Graph:
    """The Flux graph with ControlNets, through the `controlnet:` template option (as a config names it)."""
    return wg.Graph.from_template("text_to_image", preset="flux-tiny", steps=STEPS, controlnet=specs)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_one_controlnet_matches_the_pipeline_and_after_save_load(tmp_path):
    control = picture(1)
    expected = reference(build_preset_component(TINY, "controlnet"), control_image=control)
    graph = controlled({"model": f"preset:{TINY}", "scale": 0.7})
    inputs = {"prompt": PROMPT, "control_image": control, "controlnet_scale": 1.0, **SIZE}
    got = graph.run(inputs, seed=SEED)["image"]
    assert diff(got, expected) <= TOL
    # The control acts: without it (scale 0) the image is another one, and the spec's scale is the default.
    assert diff(graph.run({**inputs, "controlnet_scale": 0.0}, seed=SEED)["image"], expected) > 0.05
    scaled = reference(
        build_preset_component(TINY, "controlnet"), control_image=control, controlnet_conditioning_scale=0.7
    )
    del inputs["controlnet_scale"]
    assert diff(graph.run(inputs, seed=SEED)["image"], scaled) <= TOL

    graph.save(tmp_path / "controlled")  # as a world keeps its graphs
    assert diff(wg.Graph.load(tmp_path / "controlled").run(inputs, seed=SEED)["image"], scaled) <= TOL


def test_two_controlnets_in_parts_of_the_steps_with_true_cfg_match_the_multi_pipeline():
    controls = [picture(1), picture(2, 32, 48)]
    multi = FluxMultiControlNetModel(
        [build_preset_component(TINY, "controlnet"), build_preset_component(UNION, "controlnet")]
    )
    cfg = {"negative_prompt": "blurry, dark", "true_cfg_scale": 2.0}
    expected = reference(
        multi,
        control_image=controls,
        control_mode=[None, 2],
        controlnet_conditioning_scale=[0.7, 1.3],
        # Over 4 steps the first acts in steps 0-2, the second in 1-3: both (summed) in steps 1 and 2.
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[0.75, 1.0],
        num_inference_steps=4,
        **cfg,
    )
    graph = controlled(
        [
            {"model": f"preset:{TINY}", "scale": 0.7, "end": 0.75},
            {"model": f"preset:{UNION}", "scale": 1.3, "start": 0.25, "mode": 2},
        ]
    )
    assert {"control_image_2", "controlnet_scale_2", "control_mode_2"} <= set(graph.exposed_inputs)
    assert "control_mode" not in graph.exposed_inputs  # the first is no union ControlNet
    inputs = {"prompt": PROMPT, "control_image": controls[0], "control_image_2": controls[1], **SIZE, **cfg}
    inputs["steps"] = 4
    assert diff(graph.run(inputs, seed=SEED)["image"], expected) <= TOL


def test_image_to_image_with_a_controlnet_matches_the_img2img_pipeline():
    init, control = picture(3, 40, 56), picture(1)  # the init image is cut down to 32x48 on both sides
    components = dict(preset_pipeline("flux-tiny").components)
    for optional in ("image_encoder", "feature_extractor"):  # this pipeline takes no IP-Adapter
        components.pop(optional, None)
    pipe = FluxControlNetImg2ImgPipeline(**components, controlnet=build_preset_component(TINY, "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        image=init,
        control_image=control,
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=0.0,
        controlnet_conditioning_scale=0.7,
        max_sequence_length=256,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
        **SIZE,
    ).images
    graph = wg.Graph.from_template(
        "image_to_image",
        preset="flux-tiny",
        steps=4,
        strength=0.6,
        controlnet={"model": f"preset:{TINY}", "scale": 0.7},
    )
    inputs = {"prompt": PROMPT, "image": init, "control_image": control}
    assert diff(graph.run(inputs, seed=SEED)["image"], expected) <= TOL


def test_controlnet_graph_on_ray_equals_local(clean_hosts):
    from actors.model_host import host_name, list_hosts

    graph = controlled({"model": f"preset:{TINY}", "scale": 0.7})
    inputs = {"prompt": PROMPT, "control_image": picture(1), **SIZE}
    local = graph.run(inputs, seed=SEED)["image"]
    # The loop holds two weight-holding models (ControlNet, transformer) on two hosts: it runs fused on the
    # transformer's host, which calls the ControlNet's host once per step (each model loaded once).
    assert diff(graph.run(inputs, seed=SEED, executor="ray")["image"], local) <= RAY_TOL
    calls = {h["name"]: h["calls"] for h in list_hosts()}
    assert calls[host_name(graph.block("controlnet"))] == STEPS
    assert calls[host_name(graph.block("flux"))] == 1


@pytest.mark.parametrize(
    "spec, path, message",
    [
        ({"model": f"preset:{TINY}", "start": 0.6, "end": 0.4}, "controlnet.end", "end must be above start"),
        ({"model": f"preset:{TINY}", "strength": 1}, "controlnet.strength", "Extra inputs"),
        ({"scale": 1}, "controlnet.model", "Field required"),
        ({"model": f"preset:{TINY}", "mode": 1}, "controlnet.mode", "no union ControlNet"),
        (
            [{"model": f"preset:{TINY}"}, {"model": f"preset:{TINY}", "scale": -1}],
            "controlnet.1.scale",
            "greater",
        ),
        ({"model": "preset:flux-tiny"}, "controlnet.model", "node 'controlnet'.*no component 'controlnet'"),
    ],
)
def test_bad_specs_name_the_option_and_field(spec, path, message):
    with pytest.raises(ConfigError, match=message) as err:
        controlled(spec)
    assert err.value.path == path


def test_a_controlnet_saved_as_a_directory_is_its_root(tmp_path):
    # A FluxControlNetModel repository (as InstantX's) keeps its config.json at the root: no subfolder.
    build_preset_component(TINY, "controlnet").save_pretrained(tmp_path / "cn")
    graph = controlled({"model": str(tmp_path / "cn"), "scale": 0.5})
    model = graph.block("controlnet").config.model
    assert model.source == str(tmp_path / "cn") and model.subfolder is None
    assert graph.exposed_inputs["controlnet_scale"].default == 0.5
    with pytest.raises(ConfigError, match="node 'controlnet'.*cannot read") as err:
        controlled({"model": str(tmp_path / "missing")})
    assert err.value.path == "controlnet.model"


def test_a_controlnet_of_another_width_is_refused_before_weights_load():
    graph = wg.Graph.from_template("text_to_image", preset="flux-small", steps=STEPS)
    with pytest.raises(ConfigError) as err:
        attach_flux_controlnet(graph, {"model": f"preset:{TINY}"}, {"source": "preset:flux-small"})
    assert err.value.path == "controlnet.model"
    assert "node 'controlnet' (adapter/flux_controlnet)" in str(err.value)
    assert "num_attention_heads x attention_head_dim 32, but the Flux transformer" in str(err.value)
    with pytest.raises(ConfigError, match="text_to_image and image_to_image graphs"):
        attach_flux_controlnet(graph, {"model": f"preset:{TINY}"}, REF, task="inpaint")


@pytest.mark.parametrize("image", [torch.rand(1, 4, 32, 48), Image.new("L", (48, 32))])
def test_a_control_image_that_is_not_rgb_is_refused_naming_the_node(image):
    graph = controlled({"model": f"preset:{TINY}"})
    inputs = {"prompt": PROMPT, "control_image": image, **SIZE}
    # Before a run (a server's check) no weights load; in a run the node says it too.
    with pytest.raises(ConfigError, match="control image must be RGB") as err:
        preflight(graph, inputs)
    assert "node 'control_prep'" in str(err.value) and err.value.path == "inputs.control_image"
    weights = [b for _, b in graph.blocks() if isinstance(b, wg.ModelBlock) and b.role != "tokenizer"]
    assert not [b for b in weights if b.model_loaded]
    with pytest.raises(ConfigError, match="control image must be RGB") as err:
        graph.run(inputs, seed=SEED)
    assert "node 'control_prep'" in str(err.value) and err.value.path == "image"


def test_a_union_controlnet_without_a_mode_is_refused_before_weights_load():
    graph = controlled({"model": f"preset:{UNION}"})
    inputs = {"prompt": PROMPT, "control_image": picture(1), **SIZE}
    with pytest.raises(ConfigError, match="union ControlNet needs control_mode, one of 0 to 3") as err:
        preflight(graph, inputs)
    assert "node 'controlnet'" in str(err.value) and err.value.path == "inputs.control_mode"
    preflight(graph, {**inputs, "control_mode": 1})
    assert not graph.block("controlnet").model_loaded
