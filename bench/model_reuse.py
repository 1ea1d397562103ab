"""Model reuse: peak memory and loads of three worldgen graphs on one checkpoint vs diffusers pipelines.

A random-initialised SD-family checkpoint (several hundred MB of fp32 weights, so that weights dominate the
process baseline) is written once with `save_pretrained` into a temporary directory. Each scenario then runs in
its own fresh Python process (so peaks do not mix) and reports its peak RSS (`ru_maxrss`) as JSON:

  baseline         python + imports of torch, diffusers, transformers and worldgen only
  one_pipeline     one StableDiffusionPipeline.from_pretrained(dir), run once
  three_pipelines  three independent from_pretrained pipelines (txt2img, img2img, txt2img), each run once
  three_graphs     text_to_image, image_to_image and text_to_image (solver euler) templates on the same
                   directory; every model-holding block's `.model` touched, each graph run once
  one_controlnet_pipeline   one StableDiffusionControlNetPipeline (the checkpoint + its ControlNet), run once
  adapter_graphs   three text_to_image graphs on the same base: one with LoRA file A, one with LoRA file B
                   (each on the UNet and the text encoder), one with the ControlNet; each run once

Every run is 2 steps at 64x64. Graph loads come from `default_pool().loads`; a pipeline loads its 5 components.
Targets: three graphs cost no more than one pipeline above baseline (<= 1.1x) with 1 load per component; the
adapter graphs no more than one ControlNet pipeline (<= 1.15x): LoRA files are adapters on the shared base, the
ControlNet is loaded once.

    .venv/bin/python bench/model_reuse.py [--dir DIR (reuse/keep the checkpoint)] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

TARGET = 1.1
ADAPTER_TARGET = 1.15
SCENARIOS = (
    "baseline",
    "one_pipeline",
    "three_pipelines",
    "three_graphs",
    "one_controlnet_pipeline",
    "adapter_graphs",
)
LORA_RANK = 8
PROMPT = "a photo of an old harbor at dawn"
RUN = {"height": 64, "width": 64, "steps": 2}

UNET = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "sample_size": 32,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
}
VAE = {
    "block_out_channels": [64, 128, 256, 256],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "sample_size": 256,
}
TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 6, "num_attention_heads": 12}


def write_checkpoint(path: Path) -> int:
    """Save the random SD-family pipeline to `path`; returns its number of fp32 weight bytes."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from worldgen.models.tiny import PRESETS, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    text_config = CLIPTextConfig(
        **TEXT,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    sched = {k: v for k, v in PRESETS["small"]["scheduler"].items() if k != "class"}
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tok,
        scheduler=DDIMScheduler.from_config(sched),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _write_adapters(pipe, path)
    return sum(p.numel() * 4 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def _write_adapters(pipe: Any, path: Path) -> None:
    """A ControlNet for the checkpoint's UNet (`controlnet/`) and two LoRA files on its UNet and text encoder
    (`lora_a.safetensors`, `lora_b.safetensors`, diffusers format) next to it."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    ControlNetModel.from_unet(pipe.unet).save_pretrained(path / "controlnet", safe_serialization=True)
    for seed, name in ((1, "lora_a"), (2, "lora_b")):
        torch.manual_seed(seed)
        layers = {}
        for component, targets in (
            ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
            ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"]),
        ):
            model = getattr(pipe, component)
            config = LoraConfig(
                r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, init_lora_weights=False
            )
            inject_adapter_in_model(config, model, adapter_name=name)
            layers[component] = get_peft_model_state_dict(model, adapter_name=name)
        StableDiffusionPipeline.save_lora_weights(
            path,
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers["text_encoder"],
            weight_name=f"{name}.safetensors",
        )


def scenario(name: str, path: str) -> dict[str, Any]:
    """Run one scenario in this (fresh) process; returns its figures."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel  # noqa: F401

    import worldgen as wg
    from worldgen.models.pool import default_pool

    image = torch.rand(1, 3, RUN["height"], RUN["width"], generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    figures: dict[str, Any] = {"scenario": name}
    loaded = started
    if name in ("one_pipeline", "three_pipelines"):
        classes = [StableDiffusionPipeline]
        if name == "three_pipelines":
            classes += [StableDiffusionImg2ImgPipeline, StableDiffusionPipeline]
        pipes = [
            cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False) for cls in classes
        ]
        loaded = time.perf_counter()
        for pipe in pipes:
            pipe.set_progress_bar_config(disable=True)
            img2img = isinstance(pipe, StableDiffusionImg2ImgPipeline)
            extra = {"image": image} if img2img else {"height": RUN["height"], "width": RUN["width"]}
            pipe(PROMPT, num_inference_steps=RUN["steps"], output_type="pt", **extra)
        figures["loads"] = sum(1 for pipe in pipes for c in pipe.components.values() if c is not None)
    elif name == "three_graphs":
        graphs = [
            wg.Graph.from_template("text_to_image", model=path),
            wg.Graph.from_template("image_to_image", model=path),
            wg.Graph.from_template("text_to_image", model=path, solver="euler"),
        ]
        objects = {
            id(m) for g in graphs for _, b in g.blocks() if (m := getattr(b, "model", None)) is not None
        }
        loaded = time.perf_counter()
        for g in graphs:
            img2img = g.name == "image_to_image"
            extra = {"image": image} if img2img else {"height": RUN["height"], "width": RUN["width"]}
            g.run({"prompt": PROMPT, "steps": RUN["steps"], **extra}, seed=0)
        pool = default_pool()
        figures |= {"loads": pool.loads, "distinct_model_objects": len(objects), "pool_keys": pool.keys()}
    elif name == "one_controlnet_pipeline":
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        controlnet = ControlNetModel.from_pretrained(f"{path}/controlnet")
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            path, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
        )
        loaded = time.perf_counter()
        pipe.set_progress_bar_config(disable=True)
        pipe(PROMPT, image=image, num_inference_steps=RUN["steps"], output_type="pt", **_size())
        figures["loads"] = sum(1 for c in pipe.components.values() if c is not None)
    elif name == "adapter_graphs":
        graphs = [
            wg.Graph.from_template("text_to_image", model=path, lora=f"{path}/lora_a.safetensors"),
            wg.Graph.from_template("text_to_image", model=path, lora=f"{path}/lora_b.safetensors"),
            wg.Graph.from_template("text_to_image", model=path, controlnet={"model": f"{path}/controlnet"}),
        ]
        objects = {
            id(m) for g in graphs for _, b in g.blocks() if (m := getattr(b, "model", None)) is not None
        }
        loaded = time.perf_counter()
        for g in graphs:
            extra = {"control_image": image} if "control_image" in g.exposed_inputs else {}
            g.run({"prompt": PROMPT, "steps": RUN["steps"], **_size(), **extra}, seed=0)
        pool = default_pool()
        figures |= {"loads": pool.loads, "distinct_model_objects": len(objects), "pool_keys": pool.keys()}
    figures |= {"load_s": loaded - started, "run_s": time.perf_counter() - loaded}
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # Cross-check: this process image's own high-water mark (ru_maxrss also carries the parent's peak
    # across fork+exec; the parent stays small, so both should agree).
    status = Path("/proc/self/status")
    if status.exists():
        hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
        figures["vm_hwm_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else None
    return figures


def _size() -> dict[str, int]:
    return {"height": RUN["height"], "width": RUN["width"]}


def _child(name: str, path: Path) -> dict[str, Any]:
    """Run `--scenario name` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, __file__, "--scenario", name, "--dir", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"FAIL: scenario {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="checkpoint directory: reused when it exists, else written and kept")
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout (the table to stderr)")
    # internal: one child run (a scenario, or writing the checkpoint)
    parser.add_argument("--scenario", choices=(*SCENARIOS, "write"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario == "write":
        print(json.dumps({"weight_bytes": write_checkpoint(Path(args.dir))}))
        return 0
    if args.scenario:
        print(json.dumps(scenario(args.scenario, args.dir)))
        return 0
    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr

    started = time.perf_counter()
    path = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wg-model-reuse-")) / "sd"
    try:
        # Everything heavy runs in children and this process stays small: a forked child starts with its
        # parent's peak RSS, and Linux carries it across exec into the child's ru_maxrss.
        if not (path / "lora_b.safetensors").exists():
            written = _child("write", path)["weight_bytes"]
            print(f"wrote a random SD-family checkpoint: {written / 2**20:.0f} MiB of fp32 weights")
        size = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
        print(
            f"checkpoint {path}: {size / 2**20:.0f} MiB of safetensors ({time.perf_counter() - started:.0f} s)"
        )
        results = {name: _child(name, path) for name in SCENARIOS}
    finally:
        if not args.dir:
            shutil.rmtree(path.parent, ignore_errors=True)

    base = results["baseline"]["peak_rss_mb"]
    print(
        f"\n  {'scenario':16s} {'peak RSS MiB':>13s} {'above baseline':>15s} {'VmHWM MiB':>10s} {'loads':>6s} "
        f"{'load s':>7s} {'run s':>6s}"
    )
    for name, r in results.items():
        print(
            f"  {name:16s} {r['peak_rss_mb']:13.0f} {r['peak_rss_mb'] - base:15.0f} {r.get('vm_hwm_mb') or 0:10.0f} "
            f"{r.get('loads', '-')!s:>6s} {r.get('load_s', 0):7.1f} {r.get('run_s', 0):6.1f}"
        )
    graphs, one, three = results["three_graphs"], results["one_pipeline"], results["three_pipelines"]
    total = graphs["peak_rss_mb"] / one["peak_rss_mb"]
    above = (graphs["peak_rss_mb"] - base) / (one["peak_rss_mb"] - base)
    print(
        f"  three_graphs: {graphs['distinct_model_objects']} distinct model objects; "
        f"pool keys: {[(k[0].split('|')[2], k[1].split('.')[-1]) for k in graphs['pool_keys']]}"
    )
    print(
        f"  three_graphs/one_pipeline: total peak {total:.3f}, above baseline {above:.3f}; "
        f"three_pipelines/one_pipeline above baseline {(three['peak_rss_mb'] - base) / (one['peak_rss_mb'] - base):.3f}"
    )
    print(f"  total runtime {time.perf_counter() - started:.0f} s")
    print(
        f"\nratio three_graphs/one_pipeline (above baseline) = {above:.3f} (target <= {TARGET}); "
        f"loads = {graphs['loads']} (target 1 per component)"
    )
    adapters, controlnet_pipe = results["adapter_graphs"], results["one_controlnet_pipeline"]
    adapter_total = adapters["peak_rss_mb"] / controlnet_pipe["peak_rss_mb"]
    adapter_above = (adapters["peak_rss_mb"] - base) / (controlnet_pipe["peak_rss_mb"] - base)
    print(
        f"  adapter_graphs (2 LoRA files + 1 ControlNet on one base): {adapters['distinct_model_objects']} distinct "
        f"model objects; pool keys: {[(k[0].split('|')[2], k[1].split('.')[-1]) for k in adapters['pool_keys']]}"
    )
    print(
        f"ratio adapter_graphs/one_controlnet_pipeline: total peak {adapter_total:.3f}, above baseline "
        f"{adapter_above:.3f} (target <= {ADAPTER_TARGET}); loads = {adapters['loads']} (target 1 per component)"
    )
    if args.json:
        sys.stdout = real_stdout
        print(
            json.dumps(
                {
                    "results": results,
                    "ratio_total": total,
                    "ratio_above_baseline": above,
                    "adapter_ratio_total": adapter_total,
                    "adapter_ratio_above_baseline": adapter_above,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
