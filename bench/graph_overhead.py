"""Overhead of worldgen's graph executors against the equivalent diffusers pipeline, per model family.

The local side runs the `text_to_image` template graph of the family's "small" preset; the diffusers side runs
the family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
FluxPipeline) built from the *same model objects in memory* (the graph's pooled components, matched by
subfolder; a fresh scheduler of the graph's solver class and config), with the same seed and settings (64x64,
20 steps). With `--ray` (the default for every family but SD, whose Ray figures are bench/ray_overhead.py's) a
third side runs the same graph on the Ray executor, its denoising loop fused on the backbone's model host.
Outputs are checked first (local vs diffusers <= 1e-4, Ray vs local <= 1e-5), so the only thing that differs
between the timings is the executor: worldgen's graph engine (input gathering, per-step solver state
snapshot/restore, one block call per node; for Ray, the actor calls) against diffusers' hand-written loop.

Runs are interleaved (the order rotates every round) so that drift (thermal, other processes) hits every side
equally; medians are compared. `--threads N` (default 1 with Ray, else untouched) sets OMP_NUM_THREADS in every
process, so the host actors run torch on as many threads as the driver.

    .venv/bin/python bench/graph_overhead.py                      # SD 1.x, DDIM, 7 repeats
    .venv/bin/python bench/graph_overhead.py --family flux        # Flux (schnell-like small preset), + Ray fused
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
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

TARGET = 1.05  # local / diffusers
RAY_TARGET = 1.10  # Ray fused / diffusers
PROMPT = "a photo of an old harbor at dawn"
SOLVERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m")
EQUAL_TOL, RAY_TOL = 1e-4, 1e-5


@dataclass(frozen=True)
class Family:
    preset: str
    size: int
    guidance: float
    sampler_choice: bool  # whether --solver applies (the flow families have one solver)
    pipeline_kwargs: tuple[tuple[str, Any], ...] = ()  # what the graph fixes at build time, told to diffusers


FAMILIES = {
    "sd": Family("small", 64, 7.5, True),
    "sdxl": Family("sdxl-small", 64, 5.0, True),
    "sd3": Family("sd3-small", 64, 7.0, False),
    "flux": Family("flux-small", 64, 0.0, False, (("max_sequence_length", 256),)),  # schnell's settings
}
# SD 1.x's settings, for bench/ray_overhead.py
PRESET, SIZE, GUIDANCE = FAMILIES["sd"].preset, FAMILIES["sd"].size, FAMILIES["sd"].guidance


# ---- setup ---------------------------------------------------------------------------------------------
def build(solver: str, steps: int, family: str = "sd") -> tuple[Any, Any]:
    """The template graph and the family's diffusers pipeline built from the graph's own loaded models."""
    import diffusers

    import worldgen as wg
    from worldgen.block import ModelBlock
    from worldgen.models.presets import get_preset

    settings = FAMILIES[family]
    options = {"solver": solver} if settings.sampler_choice else {}
    g = wg.Graph.from_template("text_to_image", preset=settings.preset, steps=steps, **options)
    components: dict[str, Any] = {}
    for node_id, block in g.blocks():
        if isinstance(block, ModelBlock) and block.config.model.subfolder:
            held = components.setdefault(block.config.model.subfolder, block.model)
            if held is not block.model:  # same objects on both sides, or the comparison is not the executor's
                raise RuntimeError(
                    f"graph node {node_id!r} holds another {block.config.model.subfolder} model"
                )
    solver_block = next(b for _, b in g.blocks() if b.role == "solver")
    template = solver_block.scheduler  # the solver's configured scheduler template (never stepped)
    components["scheduler"] = type(template).from_config(template.config)
    preset = get_preset(settings.preset)
    cls = getattr(diffusers, preset.pipeline_class)
    missing = set(preset.components) - set(components)
    if missing:
        raise RuntimeError(f"the graph holds no {sorted(missing)} for the {cls.__name__}")
    pipe = cls(**components, **preset.pipeline_extra)
    pipe.set_progress_bar_config(disable=True)
    return g, pipe


def check_preset_weights(g: Any, family: str = "sd") -> float:
    """Max abs difference between the graph's pooled weights and `preset_pipeline_components(preset)`
    (they are built separately, so this checks the pool loaded the very preset the brief names)."""
    import torch.nn as nn

    from worldgen.block import ModelBlock
    from worldgen.models.presets import preset_pipeline_components

    ref = preset_pipeline_components(FAMILIES[family].preset)
    worst = 0.0
    for _, block in g.blocks():
        if not isinstance(block, ModelBlock) or not isinstance(block.model, nn.Module):
            continue
        name = block.config.model.subfolder
        ours, theirs = block.model.state_dict(), ref[name].state_dict()
        if ours.keys() != theirs.keys():
            raise RuntimeError(f"{name}: the pooled model and the preset have different parameter names")
        for key, value in ours.items():
            worst = max(
                worst, (value.float() - theirs[key].float()).abs().max().item() if value.numel() else 0.0
            )
    return worst


def runners(g: Any, pipe: Any, steps: int, family: str = "sd") -> tuple[Any, Any]:
    settings = FAMILIES[family]
    size, guidance = settings.size, settings.guidance
    inputs = {"prompt": PROMPT, "height": size, "width": size, "guidance_scale": guidance}

    def run_worldgen() -> torch.Tensor:
        return g.run(inputs, seed=0)["image"]

    def run_diffusers() -> torch.Tensor:
        return pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
            **dict(settings.pipeline_kwargs),
        ).images

    return run_worldgen, run_diffusers


def ray_runner(g: Any, family: str = "sd") -> Any:
    """The graph on the Ray executor, its denoising loop fused on the backbone's host."""
    settings = FAMILIES[family]
    inputs = {
        "prompt": PROMPT,
        "height": settings.size,
        "width": settings.size,
        "guidance_scale": settings.guidance,
    }
    return lambda: g.run(inputs, seed=0, executor="ray", fuse_loops=True)["image"]


# ---- timing --------------------------------------------------------------------------------------------
def timed(fn: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(sides: dict[str, Any], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings; the order of the sides rotates every round."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(sides[name]))
    return times


def unet_call_ms(g: Any, size: int, calls: int = 20) -> float:
    """Median time of one batched (CFG, batch 2) UNet call at this resolution, on the shared UNet."""
    unet = g.block("unet").model
    te = g.block("te").model
    cfg = unet.config
    latent = size // g.block("vae").scale_factor
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
def _threads_arg(argv: list[str]) -> int | None:  # needed before Ray starts its workers
    for i, arg in enumerate(argv):
        if arg.startswith("--threads"):
            return int(arg.split("=", 1)[1] if "=" in arg else argv[i + 1])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="sd")
    parser.add_argument("--solver", choices=SOLVERS, default="ddim", help="SD and SDXL only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    ray_side = parser.add_mutually_exclusive_group()
    ray_side.add_argument(
        "--ray", dest="ray", action="store_true", default=None, help="add the Ray fused side"
    )
    ray_side.add_argument("--no-ray", dest="ray", action="store_false", help="local and diffusers only")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every process (default: 1 with Ray; 0: untouched)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile both sides (where the executor's time goes)"
    )
    parser.add_argument("--top", type=int, default=15, help="rows of the cProfile listings")
    parser.add_argument(
        "--json", action="store_true", help="print the figures as JSON (the table goes to stderr)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a ratio is above its target")
    args = parser.parse_args(argv)
    use_ray = args.family != "sd" if args.ray is None else args.ray
    threads = args.threads if args.threads is not None else (1 if use_ray else 0)
    if threads > 0:  # every process alike: Ray starts its workers on OMP_NUM_THREADS
        os.environ["OMP_NUM_THREADS"] = os.environ["WORLDGEN_TORCH_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    settings = FAMILIES[args.family]

    real_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # human-readable output to stderr, JSON alone on stdout

    g, pipe = build(args.solver, args.steps, args.family)
    solver = args.solver if settings.sampler_choice else "flow_match_euler"
    print(
        f"worldgen graph executor vs diffusers {type(pipe).__name__}: preset '{settings.preset}', "
        f"{settings.size}x{settings.size}, {args.steps} steps, guidance {settings.guidance}, solver {solver}"
    )
    print(
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, load average {_load()}"
    )
    weight_diff = check_preset_weights(g, args.family)
    run_wg, run_df = runners(g, pipe, args.steps, args.family)
    sides = {"worldgen": run_wg, "diffusers": run_df}
    if use_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), logging_level="warning")
        sides["ray_fused"] = ray_runner(g, args.family)
    try:
        return _compare(args, g, sides, weight_diff, real_stdout, settings)
    finally:
        if use_ray:
            from actors.model_host import unload_hosts

            unload_hosts()
            ray.shutdown()


def _compare(
    args: Any, g: Any, sides: dict[str, Any], weight_diff: float, real_stdout: Any, settings: Family
) -> int:
    out = {name: fn() for name, fn in sides.items()}  # also the first (cold) Ray run: hosts start and load
    print(
        "same model objects on the local and diffusers sides: yes; graph weights vs "
        f"preset_pipeline_components('{settings.preset}'): max abs diff {weight_diff:.3g}"
    )
    image_wg, image_df = out["worldgen"], out["diffusers"]
    if image_wg.shape != image_df.shape:
        print(
            f"FAIL: output shapes differ: worldgen {tuple(image_wg.shape)} vs diffusers {tuple(image_df.shape)}"
        )
        return 2
    diff = (image_wg.float() - image_df.float()).abs().max().item()
    print(
        f"outputs {tuple(image_wg.shape)}: max abs diff worldgen vs diffusers = {diff:.3g} (tolerance {EQUAL_TOL:g})"
    )
    ray_diff = None
    if "ray_fused" in out:
        ray_diff = (out["ray_fused"].float() - image_wg.float()).abs().max().item()
        print(f"  max abs diff Ray fused vs local = {ray_diff:.3g} (tolerance {RAY_TOL:g})")
    if not diff <= EQUAL_TOL or (ray_diff is not None and not ray_diff <= RAY_TOL):
        print("FAIL: the sides compute different images; a timing comparison would be meaningless")
        return 2

    times = measure(sides, args.repeats, args.warmup)
    wg_times, df_times = times["worldgen"], times["diffusers"]
    med = {name: statistics.median(t) for name, t in times.items()}
    med_wg, med_df = med["worldgen"], med["diffusers"]
    ratio = med_wg / med_df
    ray_ratio = med["ray_fused"] / med_df if "ray_fused" in med else None
    paired = statistics.median(a / b for a, b in zip(wg_times, df_times, strict=True))
    per_step_ms = (med_wg - med_df) / args.steps * 1e3
    unet_ms = unet_call_ms(g, settings.size) if args.family == "sd" else None
    figures: dict[str, Any] = {
        "family": args.family,
        "solver": args.solver if settings.sampler_choice else "flow_match_euler",
        "preset": settings.preset,
        "size": settings.size,
        "steps": args.steps,
        "guidance_scale": settings.guidance,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "max_abs_diff": diff,
        "max_abs_diff_ray": ray_diff,
        "median_ms": {name: m * 1e3 for name, m in med.items()},
        "min_ms": {name: min(t) * 1e3 for name, t in times.items()},
        "ratio": ratio,
        "ray_fused_ratio": ray_ratio,
        "ratio_of_minima": min(wg_times) / min(df_times),
        "median_paired_ratio": paired,
        "target": TARGET,
        "ray_target": RAY_TARGET,
        "overhead_ms_per_run": (med_wg - med_df) * 1e3,
        "overhead_ms_per_step": per_step_ms,
        "unet_call_ms": unet_ms,
        "times_ms": {name: [x * 1e3 for x in t] for name, t in times.items()},
    }

    print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up runs each:")
    print(
        f"  {'':30s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'median ms/step':>15s} {'/diffusers':>11s}"
    )
    labels = {
        "worldgen": "worldgen (graph, local exec.)",
        "diffusers": "diffusers (pipeline)",
        "ray_fused": "worldgen (Ray, loop fused)",
    }
    for name, t in times.items():
        print(
            f"  {labels[name]:30s} {med[name] * 1e3:10.1f} {min(t) * 1e3:9.1f} {max(t) * 1e3:9.1f} "
            f"{med[name] * 1e3 / args.steps:15.2f} {med[name] / med_df:11.3f}"
        )
    if unet_ms is not None:
        print(
            f"  {'UNet call (batch 2, CFG)':30s} {unet_ms:10.2f}   x {args.steps} steps = {unet_ms * args.steps:.1f} ms per run"
        )
    print(
        f"  overhead worldgen - diffusers: {(med_wg - med_df) * 1e3:+.1f} ms per run = {per_step_ms:+.3f} ms per step"
    )
    print(
        f"  ratio of medians {ratio:.3f}, ratio of minima {figures['ratio_of_minima']:.3f}, median paired ratio {paired:.3f}"
    )
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.25:
        print(
            f"  WARNING: the slowest run of a side took {spread:.1f}x its fastest: the machine was busy "
            f"(load average now {_load()}); trust the minima / paired ratio, or rerun with more --repeats"
        )

    if args.profile:
        prof = profile_sides(sides["worldgen"], sides["diffusers"])
        print_profile(prof, args.steps, args.top)
        figures["profile"] = {
            s: {"total_ms_per_run": p["total_ms_per_run"], "rows": p["rows"]} for s, p in prof.items()
        }

    print(f"\nratio worldgen local/diffusers = {ratio:.3f} (target <= {TARGET})")
    if ray_ratio is not None:
        print(f"ratio worldgen Ray fused/diffusers = {ray_ratio:.3f} (target <= {RAY_TARGET})")
    if args.json:
        sys.stdout = real_stdout
        print(json.dumps(figures, indent=2))
    missed = ratio > TARGET or (ray_ratio is not None and ray_ratio > RAY_TARGET)
    return 1 if args.strict and missed else 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
