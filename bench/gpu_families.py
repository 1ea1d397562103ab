"""GPU check of the model families: worldgen ÷ diffusers per image at real size, and fp32 GPU-vs-CPU parity.

Part 1 — parity: each family's `tiny` preset graph (SD, SDXL, SD3, Flux), 4 steps, run in float32 on the CPU and
then with its models moved to the GPU (TF32 off): the max abs difference of the images.

Part 2 — speed: real-size architectures with random weights, built on the GPU from their published configs
(nothing is downloaded): the SDXL base UNet (fp16, 1024x1024, 30 steps, guidance 5) and the Flux.1-schnell
transformer (bf16, 1024x1024, 4 steps; `--flux-layers` keeps fewer blocks when memory demands). Their text
encoders have the real widths but two layers (they run once per image); VAEs are real. The worldgen graph
(`text_to_image` template) and the diffusers pipeline run on the same model objects, interleaved, medians
compared (target <= 1.03).

    python bench/gpu_families.py                 # on a GPU machine, under 8 minutes
    python bench/gpu_families.py --smoke         # the same code path on the CPU, tiny sizes (seconds)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

TARGET = 1.03
PROMPT = "a photo of an old harbor at dawn"

_CLIP_SMALL = {
    "num_hidden_layers": 2,
    "intermediate_size": 3072,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
SDXL_BASE = {
    "pipeline": "StableDiffusionXLPipeline",
    "extra": {"force_zeros_for_empty_prompt": True},
    "size": 1024,
    "steps": 30,
    "guidance": 5.0,
    "dtype": torch.float16,
    "components": {
        "unet": ("diffusers.UNet2DConditionModel", {
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
        }),
        "vae": ("diffusers.AutoencoderKL", {
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2,
            "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
        }),
        "text_encoder": ("transformers.CLIPTextModel", {**_CLIP_SMALL, "hidden_size": 768, "num_attention_heads": 12}),
        "text_encoder_2": ("transformers.CLIPTextModelWithProjection", {
            **_CLIP_SMALL, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
            "projection_dim": 1280,
        }),
        "scheduler": ("diffusers.EulerDiscreteScheduler", {
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
        }),
    },
}  # fmt: skip
FLUX_SCHNELL = {
    "pipeline": "FluxPipeline",
    "extra": {},
    "call": {"max_sequence_length": 256},  # schnell's, as the graph is built
    "size": 1024,
    "steps": 4,
    "guidance": 0.0,
    "dtype": torch.bfloat16,
    "components": {
        "transformer": ("diffusers.FluxTransformer2DModel", {
            "attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
            "pooled_projection_dim": 768,
        }),
        "vae": ("diffusers.AutoencoderKL", {
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 16, "layers_per_block": 2,
            "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False,
        }),
        "text_encoder": ("transformers.CLIPTextModel", {**_CLIP_SMALL, "hidden_size": 768, "num_attention_heads": 12}),
        "text_encoder_2": ("transformers.T5EncoderModel", {
            "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 2, "vocab_size": 32128,
            "feed_forward_proj": "gated-gelu", "is_gated_act": True, "dense_act_fn": "gelu_new",
        }),
        "scheduler": ("diffusers.FlowMatchEulerDiscreteScheduler", {
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
        }),
    },
}  # fmt: skip
REAL = {"sdxl": SDXL_BASE, "flux": FLUX_SCHNELL}


# ---- building ------------------------------------------------------------------------------------------
def _class(path: str) -> type:
    import importlib

    library, _, name = path.partition(".")
    return getattr(importlib.import_module(library), name)


def _register_real_preset(family: str, spec: dict[str, Any]) -> str:
    """A preset named after the real architecture, so the template sizes its graph from the real configs."""
    from worldgen.models.presets import Component, Preset, register_preset
    from worldgen.models.tiny import clip_tokenizer_component, t5_tokenizer_component

    components = {name: Component(cls, config) for name, (cls, config) in spec["components"].items()}
    components["tokenizer"] = clip_tokenizer_component()
    components["tokenizer_2"] = t5_tokenizer_component() if family == "flux" else clip_tokenizer_component()
    name = f"{family}-gpu-real"
    register_preset(
        Preset(name, family, spec["pipeline"], "real-size, random weights", components, spec["extra"])
    )
    return name


def build_model(cls_path: str, config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """Construct directly on the device in the target dtype (a 12B transformer never exists in fp32 on the host)."""
    cls = _class(cls_path)
    if "Scheduler" in cls.__name__:
        return cls.from_config(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cls.config_class(**config)) if cls_path.startswith("transformers.") else cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def real_pair(
    family: str, device: str, smoke: bool, flux_layers: int | None
) -> tuple[Any, Any, dict[str, Any]]:
    """The template graph and the diffusers pipeline on the same models (real-size with random weights, built on
    the device; with `smoke`, the family's tiny preset on the CPU)."""
    import diffusers

    import worldgen as wg
    from worldgen.block import ModelBlock
    from worldgen.models.presets import build_preset_component, get_preset

    spec = {**REAL[family], "components": dict(REAL[family]["components"])}
    if family == "flux" and flux_layers is not None:
        cls, config = spec["components"]["transformer"]
        layers = {"num_layers": flux_layers, "num_single_layers": 2 * flux_layers}
        spec["components"]["transformer"] = (cls, {**config, **layers})
    if smoke:
        spec.update(size=64, steps=2, dtype=torch.float32)
        preset = f"{family}-tiny"
        spec["pipeline"], spec["extra"] = (
            get_preset(preset).pipeline_class,
            dict(get_preset(preset).pipeline_extra),
        )
    else:
        preset = _register_real_preset(family, spec)
    graph = wg.Graph.from_template("text_to_image", preset=preset, steps=spec["steps"])
    started = time.perf_counter()
    models: dict[str, Any] = {}
    for name in get_preset(preset).components:
        if smoke or name not in spec["components"]:
            models[name] = build_preset_component(preset, name)  # tokenizers (and everything when smoke)
        else:
            models[name] = build_model(*spec["components"][name], device, spec["dtype"])
    built_s = time.perf_counter() - started
    for _, block in graph.blocks():
        if isinstance(block, ModelBlock) and block.config.model.subfolder in models:
            block.set_model(models[block.config.model.subfolder])
    pipe = getattr(diffusers, spec["pipeline"])(**models, **spec["extra"])
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in models.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    return graph, pipe, {"spec": spec, "built_s": built_s, "params": params}


# ---- measuring -----------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def speed(family: str, device: str, smoke: bool, repeats: int, flux_layers: int | None) -> dict[str, Any]:
    graph, pipe, info = real_pair(family, device, smoke, flux_layers)
    spec = info["spec"]
    size, steps, guidance = spec["size"], spec["steps"], spec["guidance"]
    inputs = {"prompt": PROMPT, "height": size, "width": size, "guidance_scale": guidance}

    def run_worldgen() -> torch.Tensor:
        return graph.run(inputs, seed=0)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0), output_type="pt", **spec.get("call", {}),
        ).images  # fmt: skip

    ours, theirs = run_worldgen(), run_diffusers()  # warm-up, and the images compared
    diff = (ours.float().cpu().nan_to_num() - theirs.float().cpu().nan_to_num()).abs().max().item()
    times: dict[str, list[float]] = {"worldgen": [], "diffusers": []}
    for i in range(repeats):
        order = [("worldgen", run_worldgen), ("diffusers", run_diffusers)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "family": family,
        "dtype": str(spec["dtype"]).removeprefix("torch."),
        "size": size,
        "steps": steps,
        "params_billion": info["params"] / 1e9,
        "built_s": info["built_s"],
        "max_abs_diff": diff,
        "median_s": med,
        "ratio": med["worldgen"] / med["diffusers"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }


def parity(family: str, device: str) -> float:
    """fp32: the tiny preset's image on the CPU vs on `device` (max abs difference)."""
    import worldgen as wg
    from worldgen.block import ModelBlock

    graph = wg.Graph.from_template("text_to_image", preset="tiny", family=family, steps=4)
    inputs = {"prompt": PROMPT}
    on_cpu = graph.run(inputs, seed=0)["image"]
    for _, block in graph.blocks():
        if isinstance(block, ModelBlock) and isinstance(block.model, torch.nn.Module):
            block.set_model(block.model.to(device))
    on_device = graph.run(inputs, seed=0)["image"]
    for _, block in graph.blocks():  # back: the pooled models are shared with the next family's graph
        if isinstance(block, ModelBlock) and isinstance(block.model, torch.nn.Module):
            block.set_model(block.model.to("cpu"))
    return (on_cpu - on_device.cpu()).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="the CPU at test sizes (checks the script itself)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flux-layers", type=int, default=None, help="double blocks (single: twice as many)")
    parser.add_argument("--families", default="sdxl,flux")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU here: nothing measured (--smoke runs the same code on the CPU)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    if not args.smoke:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("Part 1: fp32 parity of the tiny presets, CPU vs this device (max abs diff)")
    for family in ("sd", "sdxl", "sd3", "flux"):
        print(f"  {family:5s} {parity(family, device):.3g}", flush=True)
    print(
        f"Part 2: real-size architectures, random weights: worldgen / diffusers per image (target <= {TARGET})"
    )
    worst = 0.0
    for family in args.families.split(","):
        row = speed(family, device, args.smoke, args.repeats, args.flux_layers)
        worst = max(worst, row["ratio"])
        med = row["median_s"]
        peak = f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        print(
            f"  {family:5s} {row['dtype']:8s} {row['size']}x{row['size']} {row['steps']:2d} steps, "
            f"{row['params_billion']:.2f}B params (built in {row['built_s']:.0f} s{peak}): worldgen "
            f"{med['worldgen']:.3f} s, diffusers {med['diffusers']:.3f} s, ratio {row['ratio']:.3f}; "
            f"images max abs diff {row['max_abs_diff']:.3g}",
            flush=True,
        )
    print(f"worst ratio {worst:.3f} (target <= {TARGET}); total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
