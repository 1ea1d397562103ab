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
    .venv/bin/python bench/graph_overhead.py --profile --what-if  # where the executor's time goes

`--profile` cProfiles both sides (rows for the executor's pieces, model calls for scale) and times the
executor-side pieces alone without a profiler; `--what-if` re-measures with one suspected cost patched out
in memory (no file is changed) to confirm the attribution.

Exit status: 0 (also when the ratio misses its target, unless --strict), 2 when the outputs differ.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
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
    ("gather_inputs", "worldgen/engine.py", "gather_inputs", None),
    ("  input_ports() dict building", "worldgen/block.py", "input_ports", None),
    ("  RngState.seeded (unfed rng ports)", "worldgen/rng.py", "seeded", None),
    ("call_node (incl. the block call)", "worldgen/execution/local.py", "call_node", None),
    ("  output_ports() dict building", "worldgen/block.py", "output_ports", None),
    ("loop_iterations", "worldgen/execution/local.py", "loop_iterations", None),
    ("check_inputs", "worldgen/execution/local.py", "check_inputs", None),
    ("_on_model (model.device + model.dtype)", "worldgen/nodes/diffusion.py", "_on_model", None),
    ("CFG block forward", "worldgen/nodes/diffusion.py", "forward", "worldgen/engine.py"),
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


def microbench_executor(g: Any, steps: int, reps: int = 200) -> dict[str, float]:
    """Per-step cost of each executor-side piece timed in isolation, without a profiler (µs per step).

    Replays one real run's values through `gather_inputs` for the loop's nodes, and the blocks' per-call
    bookkeeping (device/dtype lookups, solver state restore/snapshot, `inspect.signature`, RNG state) on
    real mid-schedule values.
    """
    from worldgen.engine import gather_inputs
    from worldgen.execution import RunCallback
    from worldgen.execution.local import check_inputs
    from worldgen.nodes.diffusion import _on_model
    from worldgen.rng import RngState

    class Record(RunCallback):
        def __init__(self) -> None:
            self.values: dict[str, dict[str, Any]] = {}

        def on_node_end(self, node_id: str, iteration: int | None, outputs: dict[str, Any]) -> None:
            if iteration is None or iteration <= steps // 2:
                self.values[node_id] = outputs

    rec = Record()
    inputs = check_inputs(g, {"prompt": PROMPT, "height": SIZE, "width": SIZE, "guidance_scale": GUIDANCE})
    g.run(inputs, seed=0, callbacks=[rec])
    values = rec.values
    (loop,) = g.plan().loops

    def per_call_us(fn: Any) -> float:
        for _ in range(5):
            fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6

    def unfed() -> RngState:
        return RngState.seeded(0)

    unet = g.block("unet").model
    sample = values["solver"]["model_input"]
    solver = g.block("solver")
    state = values["solver"]["state"]
    sched = solver._restore(state)
    out: dict[str, float] = {}
    out["_on_model x3 in the UNet block (device+dtype)"] = 3 * per_call_us(lambda: _on_model(sample, unet))
    out["gather_inputs (unet, cfg, solver)"] = sum(
        per_call_us(lambda n=n: gather_inputs(g, n, values, inputs, loop=loop, iteration=1, unfed_rng=unfed))
        for n in loop.order
    )
    out["  of which input_ports() x3"] = sum(per_call_us(g.block(n).input_ports) for n in loop.order)
    out["  of which RngState.seeded (unfed solver.rng)"] = per_call_us(unfed)
    out["output_ports() x3 (call_node's check)"] = sum(
        per_call_us(g.block(n).output_ports) for n in loop.order
    )
    out["solver _restore"] = per_call_us(lambda: solver._restore(state))
    out["solver _snapshot"] = per_call_us(lambda: solver._snapshot(sched))
    out["inspect.signature(scheduler.step)"] = per_call_us(lambda: inspect.signature(sched.step).parameters)
    if state.rng is not None:
        out["RngState .generator() + .of()"] = per_call_us(lambda: RngState.of(state.rng.generator()))
    return out


def _fast_on_model(value: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """What-if: the first parameter's device/dtype when the tensor already matches it (no hooks to honour);
    otherwise the model's own (slow, hook-aware) `.device`/`.dtype`."""
    first = next(model.parameters(), None)
    if (
        first is not None
        and value.device == first.device
        and value.dtype == first.dtype
        and not getattr(model, "_keep_in_fp32_modules", None)
    ):
        return value
    return value.to(device=model.device, dtype=model.dtype)


def what_if(
    run_wg: Any, run_df: Any, image_df: torch.Tensor, repeats: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Re-measure with `worldgen.nodes.diffusion._on_model` patched in memory (no file is changed)."""
    import worldgen.nodes.diffusion as nodes

    original = nodes._on_model
    nodes._on_model = _fast_on_model
    try:
        diff = (run_wg().float() - image_df.float()).abs().max().item()
        wg_times, df_times = measure(run_wg, run_df, repeats, warmup)
    finally:
        nodes._on_model = original
    med_wg, med_df = statistics.median(wg_times), statistics.median(df_times)
    return {
        "max_abs_diff": diff,
        "median_worldgen_ms": med_wg * 1e3,
        "median_diffusers_ms": med_df * 1e3,
        "ratio": med_wg / med_df,
        "median_paired_ratio": statistics.median(a / b for a, b in zip(wg_times, df_times, strict=True)),
        "overhead_ms_per_step": (med_wg - med_df) / steps * 1e3,
    }


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solver", choices=SOLVERS, default="ddim")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile both sides and time executor pieces alone"
    )
    parser.add_argument(
        "--what-if",
        action="store_true",
        help="also re-measure with the UNet block's device/dtype lookups made cheap (patched in memory only)",
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
        micro = microbench_executor(g, args.steps)
        print("\nExecutor-side pieces timed alone (no profiler), per denoising step:")
        for label, us in micro.items():
            print(f"  {label:48s} {us:9.1f} us")
        total_us = sum(us for label, us in micro.items() if not label.startswith("  "))
        print(f"  {'sum':48s} {total_us:9.1f} us   (measured overhead: {per_step_ms * 1e3:+.1f} us per step)")
        figures["profile"] = {
            s: {"total_ms_per_run": p["total_ms_per_run"], "rows": p["rows"]} for s, p in prof.items()
        }
        figures["executor_pieces_us_per_step"] = micro

    if args.what_if:
        wi = what_if(run_wg, run_df, image_df, args.repeats, 1, args.steps)
        print(
            "\nWhat-if (in memory only): the UNet block's _on_model() skips model.device/model.dtype when the "
            "tensor already matches the first parameter:"
        )
        print(
            f"  max abs diff {wi['max_abs_diff']:.3g}; worldgen {wi['median_worldgen_ms']:.1f} ms vs diffusers "
            f"{wi['median_diffusers_ms']:.1f} ms: ratio {wi['ratio']:.3f} (paired {wi['median_paired_ratio']:.3f}), "
            f"{wi['overhead_ms_per_step']:+.3f} ms per step"
        )
        figures["what_if_fast_on_model"] = wi

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
