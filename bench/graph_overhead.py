"""Overhead of worldgen's local graph executor against the equivalent diffusers pipeline.

Both sides run text-to-image on the *same model objects in memory* (the graph's pooled UNet, VAE, text
encoder and tokenizer; a fresh scheduler of the graph's solver class and config), the same seed and the same
settings (64x64 on the "small" preset, 20 steps, guidance 7.5). Their outputs are checked equal first, so the
only thing that differs between the two timings is the executor: worldgen's graph engine (input gathering,
per-step solver state snapshot/restore, one block call per node) against diffusers' hand-written loop.

Runs are interleaved (worldgen, diffusers, diffusers, worldgen, ...: the order alternates every round) so
that drift (thermal, other processes) hits both sides equally; medians are compared.

    .venv/bin/python bench/graph_overhead.py                      # DDIM, 7 repeats
    .venv/bin/python bench/graph_overhead.py --solver dpmpp_2m --repeats 11 --profile
    .venv/bin/python bench/graph_overhead.py --json               # figures as JSON on stdout

`--profile` cProfiles both sides (rows for the executor's pieces, model calls for scale).

Exit status: 0 (also when the ratio misses its target, unless --strict), 2 when the outputs differ.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

TARGET = 1.05
PRESET = "small"
SIZE = 64
GUIDANCE = 7.5
PROMPT = "a photo of an old harbor at dawn"
SOLVERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m")
EQUAL_TOL = 1e-4


# ---- setup ---------------------------------------------------------------------------------------------
def build(solver: str, steps: int) -> tuple[Any, Any]:
    """The template graph and a StableDiffusionPipeline built from the graph's own loaded models."""
    from diffusers import StableDiffusionPipeline

    import worldgen as wg

    g = wg.Graph.from_template("text_to_image", preset=PRESET, solver=solver, steps=steps)
    template = g.block("schedule").scheduler  # the solver's configured scheduler template (never stepped)
    scheduler = type(template).from_config(template.config)
    pipe = StableDiffusionPipeline(
        vae=g.block("vae").model,
        text_encoder=g.block("te").model,
        tokenizer=g.block("tok").model,
        unet=g.block("unet").model,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # Same objects, not equal copies: the comparison must be the executor and nothing else.
    for node, component in (
        ("unet", pipe.unet),
        ("vae", pipe.vae),
        ("te", pipe.text_encoder),
        ("tok", pipe.tokenizer),
    ):
        if g.block(node).model is not component:
            raise RuntimeError(f"graph node {node!r} and the pipeline hold different objects")
    if g.block("tok_neg").model is not pipe.tokenizer or g.block("te_neg").model is not pipe.text_encoder:
        raise RuntimeError("the negative-prompt nodes do not share the pipeline's tokenizer/text encoder")
    return g, pipe


def check_preset_weights(g: Any) -> float:
    """Max abs difference between the graph's pooled weights and `preset_pipeline_components(PRESET)`
    (they are built separately, so this checks the pool loaded the very preset the brief names)."""
    from worldgen.models.tiny import preset_pipeline_components

    ref = preset_pipeline_components(PRESET)
    worst = 0.0
    for node, name in (("unet", "unet"), ("vae", "vae"), ("te", "text_encoder")):
        ours, theirs = g.block(node).model.state_dict(), ref[name].state_dict()
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"{name}: the pooled model and the preset have different parameter names")
        for key, value in ours.items():
            worst = max(
                worst, (value.float() - theirs[key].float()).abs().max().item() if value.numel() else 0.0
            )
    return worst


def runners(g: Any, pipe: Any, steps: int) -> tuple[Any, Any]:
    inputs = {"prompt": PROMPT, "height": SIZE, "width": SIZE, "guidance_scale": GUIDANCE}

    def run_worldgen() -> torch.Tensor:
        return g.run(inputs, seed=0)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        ).images

    return run_worldgen, run_diffusers


# ---- timing --------------------------------------------------------------------------------------------
def timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(run_wg: Any, run_df: Any, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Interleaved timings; the order inside each round alternates (AB, BA, AB, ...)."""
    for _ in range(warmup):
        run_wg()
        run_df()
    wg_times: list[float] = []
    df_times: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            wg_times.append(timed(run_wg))
            df_times.append(timed(run_df))
        else:
            df_times.append(timed(run_df))
            wg_times.append(timed(run_wg))
    return wg_times, df_times


def unet_call_ms(g: Any, calls: int = 20) -> float:
    """Median time of one batched (CFG, batch 2) UNet call at this resolution, on the shared UNet."""
    unet = g.block("unet").model
    te = g.block("te").model
    cfg = unet.config
    latent = SIZE // g.block("vae").scale_factor
    gen = torch.Generator("cpu").manual_seed(1)
    sample = torch.randn(2, cfg.in_channels, latent, latent, generator=gen)
    cond = torch.randn(2, te.config.max_position_embeddings, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor(500)
    times = []
    with torch.no_grad():
        for i in range(calls + 3):
            start = time.perf_counter()
            unet(sample, t, encoder_hidden_states=cond, return_dict=False)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---- profile -------------------------------------------------------------------------------------------
# (label, filename fragment, function name, caller filename fragment or None): cumulative times picked out of
# the cProfile stats. With a caller fragment only the calls made from matching files are counted.
_MODEL_ROWS = (
    ("UNet forward (model)", "unet_2d_condition.py", "forward", None),
    ("VAE decode (model)", "autoencoder_kl.py", "decode", None),
    ("text encoder (model)", "modeling_clip.py", "forward", None),
    ("scheduler.step (shared math)", "scheduling_", "step", None),
    ("ModelMixin.device lookups", "diffusers/models/modeling_utils.py", "device", None),
    ("ModelMixin.dtype lookups", "diffusers/models/modeling_utils.py", "dtype", None),
)
_EXECUTOR_ROWS = (
    ("run_local (whole run)", "worldgen/execution/local.py", "run_local", None),
    ("gather_inputs", "worldgen/plan.py", "gather_inputs", None),
    ("  input_ports() dict building", "worldgen/block.py", "input_ports", None),
    ("  RngState.seeded (unfed rng ports)", "worldgen/rng.py", "seeded", None),
    ("call_node (incl. the block call)", "worldgen/execution/local.py", "call_node", None),
    ("  output_ports() dict building", "worldgen/block.py", "output_ports", None),
    ("loop_iterations", "worldgen/execution/local.py", "loop_iterations", None),
    ("check_inputs", "worldgen/execution/local.py", "check_inputs", None),
    ("ModelBlock.placement (device/dtype)", "worldgen/block.py", "placement", None),
    ("SchedulerSolver._step (incl. step math)", "worldgen/nodes/diffusion.py", "_step", None),
    ("  _restore (state -> scheduler)", "worldgen/nodes/diffusion.py", "_restore", None),
    ("  _snapshot (scheduler -> state)", "worldgen/nodes/diffusion.py", "_snapshot", None),
    ("  inspect.signature (from worldgen)", "inspect.py", "signature", "worldgen/"),
    ("  RngState.of", "worldgen/rng.py", "of", None),
    ("  RngState.generator", "worldgen/rng.py", "generator", None),
)


def _lookup(
    stats: pstats.Stats, fragment: str, func: str, caller: str | None = None
) -> tuple[int, float, float]:
    """(calls, tottime, cumtime) summed over the functions matching `fragment`/`func`
    (only over calls from files matching `caller` when given)."""
    calls, tot, cum = 0, 0.0, 0.0
    for (filename, _line, name), (_cc, nc, tt, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name != func or fragment not in filename.replace("\\", "/"):
            continue
        if caller is None:
            calls, tot, cum = calls + nc, tot + tt, cum + ct
            continue
        for (caller_file, _l, _n), entry in callers.items():
            if caller in caller_file.replace("\\", "/"):
                calls, tot, cum = calls + entry[1], tot + entry[2], cum + entry[3]
    return calls, tot, cum


def profile_sides(run_wg: Any, run_df: Any, runs: int = 3) -> dict[str, Any]:
    """cProfile `runs` worldgen runs, and as many diffusers runs for the same model-side rows."""
    result: dict[str, Any] = {}
    for side, fn in (("worldgen", run_wg), ("diffusers", run_df)):
        prof = cProfile.Profile()
        gc.collect()
        prof.enable()
        for _ in range(runs):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        rows = {}
        for label, frag, func, caller in _MODEL_ROWS + (_EXECUTOR_ROWS if side == "worldgen" else ()):
            calls, tot, cum = _lookup(stats, frag, func, caller)
            if calls:
                rows[label] = {"calls": calls / runs, "cum_ms": cum / runs * 1e3, "self_ms": tot / runs * 1e3}
        total = stats.total_tt  # type: ignore[attr-defined]
        result[side] = {"total_ms_per_run": total / runs * 1e3, "rows": rows, "stats": stats}
    return result


def print_profile(prof: dict[str, Any], steps: int, top: int) -> None:
    wg, df = prof["worldgen"], prof["diffusers"]
    print("\nProfile (cProfile, per run; the profiler inflates Python-heavy code: read these as shares)")
    print(
        f"  total under the profiler: worldgen {wg['total_ms_per_run']:.1f} ms, diffusers {df['total_ms_per_run']:.1f} ms"
    )
    print(f"  {'worldgen side':44s} {'calls':>6s} {'cum ms':>9s} {'self ms':>8s} {'cum ms/step':>12s}")
    for label, row in wg["rows"].items():
        print(
            f"  {label:44s} {row['calls']:6.0f} {row['cum_ms']:9.2f} {row['self_ms']:8.2f} {row['cum_ms'] / steps:12.3f}"
        )
    print(f"  {'diffusers side':44s}")
    for label, row in df["rows"].items():
        print(
            f"  {label:44s} {row['calls']:6.0f} {row['cum_ms']:9.2f} {row['self_ms']:8.2f} {row['cum_ms'] / steps:12.3f}"
        )

    def outside(side: dict[str, Any]) -> float:
        models = sum(side["rows"].get(label, {}).get("cum_ms", 0.0) for label, *_ in _MODEL_ROWS[:3])
        return side["total_ms_per_run"] - models

    print(
        f"  time outside the UNet/VAE/text-encoder calls: worldgen {outside(wg):.1f} ms, "
        f"diffusers {outside(df):.1f} ms per run"
    )
    stats: pstats.Stats = wg["stats"]
    for title, sort, restrict in (
        (
            f"Top {top} worldgen functions by cumulative time (over all profiled runs)",
            "cumulative",
            (r"worldgen[/\\]", top),
        ),
        (f"Top {top} functions by self time, worldgen side (models included)", "tottime", (top,)),
    ):
        stream = io.StringIO()
        stats.stream = stream  # type: ignore[attr-defined]
        stats.sort_stats(sort).print_stats(*restrict)
        print(f"\n{title}:")
        print(_trim_pstats(stream.getvalue()))


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.replace(sys.prefix, "<venv>") for line in lines[start:] if line.strip())


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solver", choices=SOLVERS, default="ddim")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile both sides (where the executor's time goes)"
    )
    parser.add_argument("--top", type=int, default=15, help="rows of the cProfile listings")
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON (the table goes to stderr)"
    )
    parser.add_argument("--strict", action="store_true", help=f"exit 1 when the ratio is above {TARGET}")
    args = parser.parse_args(argv)

    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # human-readable output to stderr, JSON alone on stdout

    print(
        f"worldgen graph executor vs diffusers StableDiffusionPipeline: preset '{PRESET}', {SIZE}x{SIZE}, "
        f"{args.steps} steps, guidance {GUIDANCE}, solver {args.solver}"
    )
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()} (default, untouched), "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, load average {_load()}"
    )

    g, pipe = build(args.solver, args.steps)
    weight_diff = check_preset_weights(g)
    run_wg, run_df = runners(g, pipe, args.steps)
    image_wg, image_df = run_wg(), run_df()
    print(
        "same model objects on both sides: yes; graph weights vs "
        f"preset_pipeline_components('{PRESET}'): max abs diff {weight_diff:.3g}"
    )
    if image_wg.shape != image_df.shape:
        print(
            f"FAIL: output shapes differ: worldgen {tuple(image_wg.shape)} vs diffusers {tuple(image_df.shape)}"
        )
        return 2
    diff = (image_wg.float() - image_df.float()).abs().max().item()
    print(
        f"outputs {tuple(image_wg.shape)}: max abs diff worldgen vs diffusers = {diff:.3g} (tolerance {EQUAL_TOL:g})"
    )
    if not diff <= EQUAL_TOL:
        print("FAIL: the two sides compute different images; a timing comparison would be meaningless")
        return 2

    wg_times, df_times = measure(run_wg, run_df, args.repeats, args.warmup)
    unet_ms = unet_call_ms(g)
    med_wg, med_df = statistics.median(wg_times), statistics.median(df_times)
    ratio = med_wg / med_df
    paired = statistics.median(a / b for a, b in zip(wg_times, df_times, strict=True))
    per_step_ms = (med_wg - med_df) / args.steps * 1e3
    figures: dict[str, Any] = {
        "solver": args.solver,
        "preset": PRESET,
        "size": SIZE,
        "steps": args.steps,
        "guidance_scale": GUIDANCE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "max_abs_diff": diff,
        "median_worldgen_ms": med_wg * 1e3,
        "median_diffusers_ms": med_df * 1e3,
        "min_worldgen_ms": min(wg_times) * 1e3,
        "min_diffusers_ms": min(df_times) * 1e3,
        "ratio": ratio,
        "ratio_of_minima": min(wg_times) / min(df_times),
        "median_paired_ratio": paired,
        "target": TARGET,
        "overhead_ms_per_run": (med_wg - med_df) * 1e3,
        "overhead_ms_per_step": per_step_ms,
        "unet_call_ms": unet_ms,
        "unet_ms_per_run": unet_ms * args.steps,
        "worldgen_ms": [t * 1e3 for t in wg_times],
        "diffusers_ms": [t * 1e3 for t in df_times],
    }

    print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up runs each:")
    print(f"  {'':30s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'median ms/step':>15s}")
    for name, times in (("worldgen (graph, local exec.)", wg_times), ("diffusers (pipeline)", df_times)):
        med = statistics.median(times)
        print(
            f"  {name:30s} {med * 1e3:10.1f} {min(times) * 1e3:9.1f} {max(times) * 1e3:9.1f} "
            f"{med * 1e3 / args.steps:15.2f}"
        )
    print(
        f"  {'UNet call (batch 2, CFG)':30s} {unet_ms:10.2f}   x {args.steps} steps = {unet_ms * args.steps:.1f} ms per run"
    )
    print(
        f"  overhead worldgen - diffusers: {(med_wg - med_df) * 1e3:+.1f} ms per run = {per_step_ms:+.3f} ms per step "
        f"({per_step_ms / unet_ms * 100:+.1f}% of one UNet call)"
    )
    print(
        f"  ratio of medians {ratio:.3f}, ratio of minima {figures['ratio_of_minima']:.3f}, median paired ratio {paired:.3f}"
    )
    spread = max(max(t) / min(t) for t in (wg_times, df_times))
    if spread > 1.25:
        print(
            f"  WARNING: the slowest run of a side took {spread:.1f}x its fastest: the machine was busy "
            f"(load average now {_load()}); trust the minima / paired ratio, or rerun with more --repeats"
        )

    if args.profile:
        prof = profile_sides(run_wg, run_df)
        print_profile(prof, args.steps, args.top)
        figures["profile"] = {
            s: {"total_ms_per_run": p["total_ms_per_run"], "rows": p["rows"]} for s, p in prof.items()
        }

    print(f"\nratio worldgen/diffusers = {ratio:.3f} (target <= {TARGET})")
    if args.json:
        sys.stdout = real_stdout
        print(json.dumps(figures, indent=2))
    return 1 if args.strict and ratio > TARGET else 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
