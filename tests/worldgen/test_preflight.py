"""worldgen.preflight: a run checked against its blocks' own constraints and a server's budgets before it runs,
on the tiny diffusion graphs (no weights are loaded by the checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import worldgen as wg
from tests.conftest import PROMPT
from worldgen.limits import LimitExceeded, Limits
from worldgen.preflight import preflight

ROOT = Path(__file__).resolve().parents[2]
T2I = ROOT / "configs" / "graphs" / "text_to_image_tiny.yaml"
INPUTS = {"prompt": PROMPT, "steps": 2, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def t2i():
    return wg.Graph.from_config(T2I)


@pytest.fixture(scope="module")
def i2i():
    return wg.Graph.from_template("image_to_image", preset="tiny", steps=2)


def refused(engine, inputs, **options) -> wg.ConfigError:
    with pytest.raises(wg.ConfigError) as info:
        preflight(engine, inputs, **options)
    return info.value


def test_good_inputs_pass_and_no_weights_are_loaded(t2i, i2i):
    preflight(t2i, INPUTS, limits=Limits())
    preflight(t2i, {"prompt": [PROMPT]}, limits=Limits())  # a one-item list is a batch of one
    preflight(i2i, {"prompt": PROMPT, "image": torch.rand(1, 3, 32, 32)}, limits=Limits())
    for graph in (t2i, i2i):
        assert not any(
            block.model_loaded for _, block in graph.named_blocks() if isinstance(block, wg.ModelBlock)
        )


@pytest.mark.parametrize(
    ("inputs", "path", "message"),
    [
        ({"steps": 1001}, "inputs.steps", "steps must be 1 to 1000"),
        ({"steps": 0}, "inputs.steps", "steps must be 1 to 1000"),  # ran with the default 20 before
        ({"height": 0}, "inputs.height", "positive multiples of 2, got 0x32"),
        ({"width": -8}, "inputs.width", "positive multiples of 2, got 32x-8"),
        ({"width": 31}, "inputs.width", "positive multiples of 2, got 32x31"),
        ({"prompt": []}, "inputs.prompt", "an empty list of prompts"),
        ({"prompt": ["a", "b"]}, "inputs.prompt", "2 items, but the batch is 1 (set by noise.batch_size)"),
        ({"prompt": ["a"], "negative_prompt": ["x", "y"]}, "inputs.negative_prompt", "2 items"),
    ],
)
def test_text_to_image_refusals_name_the_input(t2i, inputs, path, message):
    err = refused(t2i, {**INPUTS, **inputs})
    assert err.path == path and message in err.detail


@pytest.mark.parametrize(
    ("inputs", "path", "message"),
    [
        (
            {"image": torch.rand(2, 3, 32, 32), "prompt": ["a", "b", "c"]},
            "inputs.prompt",
            "3 items, but the batch is 2 (set by inputs.image)",
        ),
        ({"image": torch.rand(1, 5, 32, 32)}, "inputs.image", "(B, 3, H, W)"),
        ({"image": torch.rand(1, 3, 32, 32).long()}, "inputs.image", "float tensor"),
        ({"image": torch.rand(1, 3, 3, 3)}, "inputs.image", "at least 4x4 pixels"),
        ({"strength": 1.5}, "inputs.strength", "strength must be 0 to 1"),
        ({"strength": 0.1}, "inputs.strength", "leaves no denoising step"),
    ],
)
def test_image_to_image_refusals_name_the_input(i2i, inputs, path, message):
    err = refused(i2i, {"prompt": PROMPT, "image": torch.rand(1, 3, 32, 32), **inputs})
    assert err.path == path and message in err.detail


def test_each_refusal_was_a_failure_mid_run_before(t2i, i2i):
    # What the checks stand in for: the same inputs fail inside the run, after models have loaded and run.
    for graph, inputs in [
        (t2i, {**INPUTS, "steps": 1001}),
        (t2i, {**INPUTS, "height": -8}),
        (t2i, {**INPUTS, "prompt": ["a", "b"]}),
        (i2i, {"prompt": PROMPT, "image": torch.rand(1, 3, 2, 2)}),
    ]:
        with pytest.raises(wg.WorldgenError):
            graph.run(inputs, seed=0)


def test_the_smallest_image_the_encoder_takes_runs(i2i):
    out = i2i.run({"prompt": PROMPT, "image": torch.rand(1, 3, 4, 4)}, seed=0)
    assert out["image"].shape == (1, 3, 4, 4)


def test_one_prompt_conditions_a_batch_of_images_as_a_repeated_prompt_list(i2i):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    preflight(i2i, {"prompt": PROMPT, "image": images})
    one = i2i.run({"prompt": PROMPT, "image": images}, seed=4)["image"]
    repeated = i2i.run({"prompt": [PROMPT, PROMPT], "image": images}, seed=4)["image"]
    assert one.shape == (2, 3, 32, 32)
    assert torch.allclose(one, repeated, atol=1e-6)


def test_iterations_past_the_schedule_are_a_config_error_not_an_index_error(t2i):
    with pytest.raises(wg.ConfigError, match="the schedule has 2 steps and all have run"):
        t2i.run(INPUTS, seed=0, iterations=3)


@pytest.mark.parametrize(
    ("limits", "inputs", "options", "limit"),
    [
        ({"max_iterations": 5}, {}, {"iterations": 6}, "max_iterations"),
        ({"max_image_side": 16}, {}, {}, "max_image_side"),
        ({"max_steps": 1}, {}, {}, "max_steps"),
        ({"max_pixel_steps": 32 * 32 * 2 - 1}, {}, {}, "max_pixel_steps"),
        ({"max_prompt_chars": 10}, {"negative_prompt": "n" * 8}, {}, "max_prompt_chars"),
    ],
)
def test_budgets_name_their_limit(t2i, limits, inputs, options, limit):
    with pytest.raises(LimitExceeded, match=f"limit '{limit}'") as info:
        preflight(t2i, {**INPUTS, **inputs}, limits=Limits(**limits), **options)
    assert info.value.limit == limit
    preflight(t2i, {**INPUTS, **inputs}, **options)  # no limits: only the graph's own constraints


def test_iterations_bound_the_pixel_steps(t2i):
    limits = Limits(max_pixel_steps=32 * 32 * 2)
    with pytest.raises(LimitExceeded, match="max_pixel_steps"):
        preflight(t2i, {**INPUTS, "steps": 3}, limits=limits)
    preflight(t2i, {**INPUTS, "steps": 3}, limits=limits, iterations=2)  # the loop stops after two


def test_a_batch_counts_against_max_count(i2i):
    with pytest.raises(LimitExceeded, match=r"count 3 is over 2 \(limit 'max_count'\)"):
        preflight(i2i, {"prompt": PROMPT, "image": torch.rand(3, 3, 32, 32)}, limits=Limits(max_count=2))


def test_a_pipeline_checks_each_graph_it_holds(t2i):
    pipeline = wg.Pipeline.from_config(
        {
            "kind": "pipeline",
            "name": "two_drafts",
            "graphs": {"a": t2i.to_config(), "b": t2i.to_config()},
            "inputs": {"prompt": ["a.prompt", "b.prompt"], "steps": "a.steps", "height": "b.height"},
            "outputs": {"a": "a.image", "b": "b.image"},
        }
    )
    preflight(pipeline, {"prompt": PROMPT, "steps": 2, "height": 32}, limits=Limits())
    err = refused(pipeline, {"prompt": PROMPT, "height": 31})
    assert err.path == "inputs.b.height" and "got 31x32" in err.detail
    with pytest.raises(LimitExceeded, match="height 4096 is over 2048"):
        preflight(pipeline, {"prompt": PROMPT, "height": 4096}, limits=Limits())
