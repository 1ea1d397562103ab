"""The GPU check of issue 15: parity, worldgen ÷ diffusers (local and on a GPU model host), torch.compile, memory.

Nothing is downloaded: real-size SD 1.5 and SDXL architectures (UNet, VAE, CLIP text encoders: diffusers' and
transformers' published config values, inline below) are built on the GPU with random weights.

  (a) parity    fp32 CPU vs GPU of the tiny presets (text_to_image `preset="tiny"`, and `sdxl-tiny`): max abs diff
  (b) speed     per image, worldgen ÷ the diffusers pipeline on the same components, same steps and seed, warm-up
                first, medians of interleaved runs (target <= 1.03): the local executor (on the very model
                objects the pipeline holds) and the Ray executor with the denoising loop fused on a model host
                that asks for a GPU share (`placement: {num_gpus: ...}`; it loads the same weights, saved once).
                SD 1.5 at 512 px, SDXL at 1024 px, in fp16 and bf16.
  (c) compile   the UNet's forward (one CFG batch) eager vs `torch.compile` (compiled once, timed after warm-up)
  (d) memory    torch.cuda.max_memory_allocated: text_to_image, image_to_image and inpaint graphs on one SD 1.5
                checkpoint (one copy of each model) vs one diffusers pipeline, each run once

    python bench/gpu_check.py             # one GPU, under 8 minutes
    python bench/gpu_check.py --quick     # SD 1.5 only, fewer runs (about 2 minutes)
    python bench/gpu_check.py --smoke     # the CPU: tiny presets, 64 px, fp32, no Ray (checks the script: seconds)
    python bench/gpu_check.py --smoke --ray   # ... with the Ray side too (starts a local Ray)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from gpu_families import SDXL_BASE, build_model, parity, timed  # noqa: E402 - this folder

TARGET = 1.03
PROMPT = "a photo of an old harbor at dawn"
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the components with weights (a host each)

# diffusers' published configs (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0), as the models need them
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "in_channels": 3,
    "out_channels": 3,
    "norm_num_groups": 32,
}
_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SD15 = {
    "family": "sd", "pipeline": "StableDiffusionPipeline", "size": 512, "guidance": 7.5,
    "extra": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "components": {
        "unet": ("diffusers.UNet2DConditionModel", {
            "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4,
            "layers_per_block": 2, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        }),
        "vae": ("diffusers.AutoencoderKL", {**_VAE, "sample_size": 512, "scaling_factor": 0.18215}),
        "text_encoder": ("transformers.CLIPTextModel", _CLIP_L),
        "scheduler": ("diffusers.PNDMScheduler", {**_SCHEDULER, "skip_prk_steps": True}),
    },
}  # fmt: skip
SDXL = {
    "family": "sdxl", "pipeline": "StableDiffusionXLPipeline", "size": 1024, "guidance": 5.0,
    "extra": {"force_zeros_for_empty_prompt": True},
    "components": {
        "unet": SDXL_BASE["components"]["unet"],  # the published SDXL UNet config, as gpu_families.py has it
        "vae": ("diffusers.AutoencoderKL", {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                                            "force_upcast": True}),
        "text_encoder": ("transformers.CLIPTextModel", {**_CLIP_L, "num_hidden_layers": 12}),
        "text_encoder_2": ("transformers.CLIPTextModelWithProjection", {
            **_CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
            "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
        }),
        "scheduler": SDXL_BASE["components"]["scheduler"],
    },
}  # fmt: skip
REAL = {"sd15": SD15, "sdxl": SDXL}
TINY = {"sd15": "tiny", "sdxl": "sdxl-tiny"}  # --smoke: the built-in presets of the same families


# ---- building ------------------------------------------------------------------------------------------
def _preset(name: str, smoke: bool) -> str:
    """The preset the graphs are built from: the family's tiny one (smoke), or one named after the real
    architecture, registered here so the templates size their graphs from the real configs."""
    if smoke:
        return TINY[name]
    from worldgen.models.presets import Component, Preset, register_preset
    from worldgen.models.tiny import clip_tokenizer_component

    spec = REAL[name]
    components = {sub: Component(cls, config) for sub, (cls, config) in spec["components"].items()}
    components["tokenizer"] = clip_tokenizer_component()
    if "text_encoder_2" in components:
        components["tokenizer_2"] = clip_tokenizer_component()
    extra = {k: v for k, v in spec["extra"].items() if v is not None}
    register_preset(
        Preset(f"{name}-gpu-check", spec["family"], spec["pipeline"], "real size", components, extra)
    )
    return f"{name}-gpu-check"


def pair(name: str, device: str, dtype: torch.dtype, steps: int, smoke: bool) -> dict[str, Any]:
    """The text_to_image graph and the diffusers pipeline on the same model objects, and how to run each."""
    import diffusers

    import worldgen as wg
    from worldgen.block import ModelBlock
    from worldgen.models.presets import build_preset_component, get_preset

    spec = REAL[name]
    preset = _preset(name, smoke)
    size = 64 if smoke else spec["size"]
    dtype_name = str(dtype).removeprefix("torch.")
    graph = wg.Graph.from_template("text_to_image", preset=preset, steps=steps, dtype=dtype_name)
    models: dict[str, Any] = {}
    for sub in get_preset(preset).components:
        if smoke or sub not in spec["components"]:
            models[sub] = build_preset_component(preset, sub)  # tokenizers (and everything when smoke)
            if isinstance(models[sub], torch.nn.Module):
                models[sub] = models[sub].to(device=device, dtype=dtype)
        else:
            models[sub] = build_model(*spec["components"][sub], device, dtype)
    for _, block in graph.blocks():
        if isinstance(block, ModelBlock) and block.config.model.subfolder in models:
            block.set_model(models[block.config.model.subfolder])
    extra = {**get_preset(preset).pipeline_extra, **spec["extra"]}
    pipe = getattr(diffusers, spec["pipeline"])(**models, **extra)
    pipe.set_progress_bar_config(disable=True)
    guidance = spec["guidance"]
    inputs = {"prompt": PROMPT, "height": size, "width": size, "guidance_scale": guidance}

    def run_local() -> torch.Tensor:
        return graph.run(inputs, seed=0)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
        ).images  # fmt: skip

    return {"graph": graph, "pipe": pipe, "models": models, "preset": preset, "size": size,
            "local": run_local, "diffusers": run_diffusers, "inputs": inputs}  # fmt: skip


def ray_runner(side: dict[str, Any], directory: Path | None, gpu_share: float) -> Callable[[], torch.Tensor]:
    """The same graph on the Ray executor, the denoising loop fused into one call on the UNet's model host. The
    hosts load the same weights (saved once to `directory`; smoke: the built-in preset) and each asks for a
    share of the GPU (`placement.num_gpus`)."""
    import worldgen as wg

    config = side["graph"].to_config()
    for node in config["nodes"].values():
        model = (node.get("config") or {}).get("model")
        if not isinstance(model, dict):
            continue
        if directory is not None:
            model["source"] = str(directory)
        if model.get("subfolder") in MODELS and gpu_share > 0:
            model["placement"] = {"num_gpus": gpu_share}
    graph = wg.Graph.from_config(config)
    inputs = side["inputs"]
    return lambda: graph.run(inputs, seed=0, executor="ray", fuse_loops=True)["image"]


# ---- measuring -----------------------------------------------------------------------------------------
def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu().nan_to_num() - b.float().cpu().nan_to_num()).abs().max().item()


def speed(
    name: str, dtype: torch.dtype, device: str, steps: int, repeats: int, smoke: bool, use_ray: bool
) -> dict[str, Any]:
    side = pair(name, device, dtype, steps, smoke)
    runners = {"local": side["local"], "diffusers": side["diffusers"]}
    saved = None
    if use_ray:
        if not smoke:  # the hosts load what the pipeline holds: its weights, written once
            saved = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
            side["pipe"].save_pretrained(saved, safe_serialization=True)
        runners["ray_fused"] = ray_runner(side, saved, 0.0 if smoke else 0.1)
    outputs = {key: fn() for key, fn in runners.items()}  # warm-up (and the hosts load), images compared
    diffs = {key: _diff(out, outputs["diffusers"]) for key, out in outputs.items() if key != "diffusers"}
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners.items())
    for i in range(repeats):
        for key, fn in order[i % len(order) :] + order[: i % len(order)]:  # rotate who goes first
            times[key].append(timed(fn, device))
    med = {key: statistics.median(t) for key, t in times.items()}
    if use_ray:
        from actors.model_host import unload_hosts

        unload_hosts()
    if saved is not None:
        import shutil

        shutil.rmtree(saved, ignore_errors=True)
    return {
        "name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "size": side["size"],
        "median_s": med,
        "ratios": {key: med[key] / med["diffusers"] for key in med if key != "diffusers"},
        "diffs": diffs,
        "unet": side["models"]["unet"],
    }


def compile_speedup(unet: torch.nn.Module, device: str, smoke: bool, calls: int) -> dict[str, float]:
    """The UNet's forward on one CFG batch (2 latents), eager vs compiled (compiled once; medians after warm-up).
    --smoke compiles with the eager backend: the code path without a C++ toolchain."""
    config = unet.config
    side = config.sample_size
    dtype = next(unet.parameters()).dtype
    sample = torch.randn(2, config.in_channels, side, side, device=device, dtype=dtype)
    context = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor(
                [[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2, device=device, dtype=dtype
            ),
        }
    step = torch.tensor(500, device=device)

    def median_of(fn: Callable[[], Any]) -> float:
        with torch.inference_mode():
            for _ in range(3):
                fn()
            return statistics.median(timed(fn, device) for _ in range(calls))

    eager = median_of(lambda: unet(sample, step, context, **kwargs))
    compiled_unet = torch.compile(unet, backend="eager" if smoke else "inductor")
    started = time.perf_counter()
    with torch.inference_mode():
        compiled_unet(sample, step, context, **kwargs)
    compile_s = time.perf_counter() - started
    compiled = median_of(lambda: compiled_unet(sample, step, context, **kwargs))
    return {
        "eager_ms": eager * 1e3,
        "compiled_ms": compiled * 1e3,
        "speedup": eager / compiled,
        "compile_s": compile_s,
    }


def memory(device: str, dtype: torch.dtype, steps: int, smoke: bool) -> dict[str, Any]:
    """Peak device memory of three graphs on one SD 1.5 checkpoint (each model once, pooled) vs one pipeline."""
    import diffusers
    import PIL.Image

    import worldgen as wg
    from worldgen.models import default_pool
    from worldgen.models.presets import save_preset_pipeline

    size = 64 if smoke else SD15["size"]
    directory = Path(tempfile.mkdtemp(prefix="gpu-check-memory-"))
    if smoke:
        save_preset_pipeline("tiny", directory)
    else:
        models = {
            sub: build_model(cls, config, "cpu", dtype) for sub, (cls, config) in SD15["components"].items()
        }
        from worldgen.models.tiny import build_tokenizer

        pipe = diffusers.StableDiffusionPipeline(**models, tokenizer=build_tokenizer(), **SD15["extra"])
        pipe.save_pretrained(directory, safe_serialization=True)
        del pipe, models
    image = PIL.Image.new("RGB", (size, size), (90, 120, 160))
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    base = {"prompt": PROMPT, "height": size, "width": size}
    dtype_name = str(dtype).removeprefix("torch.")
    runs = [
        ("text_to_image", base),
        ("image_to_image", {"prompt": PROMPT, "image": image}),
        ("inpaint", {"prompt": PROMPT, "image": image, "mask_image": mask}),
    ]

    def reset() -> None:
        default_pool().clear()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None

    reset()
    for template, inputs in runs:
        graph = wg.Graph.from_template(template, model=str(directory), steps=steps, dtype=dtype_name)
        graph.run(inputs, seed=0)
    graphs_gib, loads = peak(), default_pool().loads
    reset()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(directory, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    pipe_gib = peak()
    del pipe
    reset()
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    return {"three_graphs_gib": graphs_gib, "one_pipeline_gib": pipe_gib, "loads": loads}


# ---- the run -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU, tiny presets, 64 px, fp32 (seconds)")
    parser.add_argument("--quick", action="store_true", help="SD 1.5 only, fewer runs")
    parser.add_argument("--ray", action="store_true", help="with --smoke: the Ray side too (a local Ray)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (medians)")
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU here: nothing measured (--smoke runs the same code on the CPU)")
        return 0
    device = "cpu" if args.smoke else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # parity in true fp32
    torch.backends.cudnn.allow_tf32 = False
    steps, repeats = (2, 1) if args.smoke else (args.steps, 2 if args.quick else args.repeats)
    names = ["sd15"] if args.quick else ["sd15", "sdxl"]
    dtypes = [torch.float32] if args.smoke else [torch.float16, torch.bfloat16]
    use_ray = args.ray or not args.smoke
    started = time.perf_counter()
    if use_ray:
        import ray

        ray.init(address="local", logging_level="error", include_dashboard=False)  # never a running cluster
    where = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"gpu_check on {where}, torch {torch.__version__}; {steps} steps; medians of {repeats}")

    print("(a) fp32 parity of the tiny presets, CPU vs this device (max abs diff)")
    for family in ("sd", "sdxl"):
        print(f"    {family:5s} {parity(family, device):.3g}", flush=True)

    print(f"(b) per image, worldgen / diffusers (target <= {TARGET}); same components, steps and seed")
    header = f"    {'model':6s} {'dtype':9s} {'size':>5s} {'diffusers s':>12s} {'local s':>8s} {'ratio':>6s}"
    print(
        header + (f" {'ray fused s':>12s} {'ratio':>6s}" if use_ray else "") + "  max abs diff vs diffusers"
    )
    worst, unets = 0.0, {}
    for name in names:
        for dtype in dtypes:
            row = speed(name, dtype, device, steps, repeats, args.smoke, use_ray)
            unets.setdefault(name, row["unet"])
            med, ratios = row["median_s"], row["ratios"]
            worst = max(worst, *ratios.values())
            line = f"    {name:6s} {row['dtype']:9s} {row['size']:5d} {med['diffusers']:12.3f} {med['local']:8.3f}"
            line += f" {ratios['local']:6.3f}"
            if use_ray:
                line += f" {med['ray_fused']:12.3f} {ratios['ray_fused']:6.3f}"
            diffs = ", ".join(f"{k} {v:.2g}" for k, v in row["diffs"].items())
            print(f"{line}  {diffs}", flush=True)
        if not args.smoke:
            torch.cuda.empty_cache()
    print(f"    worst ratio {worst:.3f} (target <= {TARGET})")

    print("(c) torch.compile of the UNet (one CFG batch; compiled once, medians after warm-up)")
    for name, unet in list(unets.items())[: 1 if args.smoke else None]:  # smoke: tracing is the slow part
        row = compile_speedup(unet, device, args.smoke, calls=3 if args.smoke else 10)
        print(
            f"    {name:6s} eager {row['eager_ms']:.1f} ms, compiled {row['compiled_ms']:.1f} ms: speed-up "
            f"{row['speedup']:.2f}x (compiling took {row['compile_s']:.0f} s)",
            flush=True,
        )
    unets.clear()

    print(
        "(d) peak device memory: text_to_image + image_to_image + inpaint graphs on one checkpoint vs one pipeline"
    )
    row = memory(device, dtypes[0], steps, args.smoke)
    if row["three_graphs_gib"] is None:
        print(f"    n/a on the CPU (the three graphs loaded {row['loads']} models)")
    else:
        print(
            f"    three graphs {row['three_graphs_gib']:.2f} GiB, one pipeline {row['one_pipeline_gib']:.2f} GiB: "
            f"ratio {row['three_graphs_gib'] / row['one_pipeline_gib']:.2f} ({row['loads']} model loads)"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
