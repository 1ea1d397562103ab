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
        assert g.block(node).model is component, (
            f"graph node {node!r} and the pipeline hold different objects"
        )
    assert g.block("tok_neg").model is pipe.tokenizer and g.block("te_neg").model is pipe.text_encoder
    return g, pipe


def check_preset_weights(g: Any) -> float:
    """Max abs difference between the graph's pooled weights and `preset_pipeline_components(PRESET)`
    (they are built separately, so this checks the pool loaded the very preset the brief names)."""
    from worldgen.models.tiny import preset_pipeline_components

    ref = preset_pipeline_components(PRESET)
    worst = 0.0
    for node, name in (("unet", "unet"), ("vae", "vae"), ("te", "text_encoder")):
        ours, theirs = g.block(node).model.state_dict(), ref[name].state_dict()
        assert ours.keys() == theirs.keys(), f"{name}: different parameter names"
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
# (label, filename fragment, function name): cumulative times picked out of the cProfile stats.
_MODEL_ROWS = (
    ("UNet forward (model)", "unet_2d_condition.py", "forward"),
    ("VAE decode (model)", "autoencoder_kl.py", "decode"),
    ("text encoder (model)", "modeling_clip.py", "forward"),
    ("scheduler.step (shared math)", "scheduling_", "step"),
    ("scheduler.scale_model_input", "scheduling_", "scale_model_input"),
)
_EXECUTOR_ROWS = (
    ("run_local (whole run)", "worldgen/execution/local.py", "run_local"),
    ("gather_inputs", "worldgen/engine.py", "gather_inputs"),
    ("  input_ports() dict building", "worldgen/block.py", "input_ports"),
    ("  Engine.plan (cached)", "worldgen/engine.py", "plan"),
    ("call_node", "worldgen/execution/local.py", "call_node"),
    ("  output_ports() dict building", "worldgen/block.py", "output_ports"),
    ("loop_iterations", "worldgen/execution/local.py", "loop_iterations"),
    ("check_inputs", "worldgen/execution/local.py", "check_inputs"),
    ("SchedulerSolver._step", "worldgen/nodes/diffusion.py", "_step"),
    ("  _restore (state -> scheduler)", "worldgen/nodes/diffusion.py", "_restore"),
    ("  _snapshot (scheduler -> state)", "worldgen/nodes/diffusion.py", "_snapshot"),
    ("  inspect.signature", "inspect.py", "signature"),
    ("  RngState.of / generator", "worldgen/rng.py", "of"),
    ("SchedulerSolver.scheduler (template)", "worldgen/nodes/diffusion.py", "scheduler"),
    ("ModelBlock.model (property)", "worldgen/block.py", "model"),
)


def _lookup(stats: pstats.Stats, fragment: str, func: str) -> tuple[int, float, float]:
    """(calls, tottime, cumtime) summed over functions matching `fragment`/`func` (no double counting
    of recursion: cProfile's cumtime already excludes nested calls of the same function)."""
    calls, tot, cum = 0, 0.0, 0.0
    for (filename, _line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == func and fragment in filename.replace("\\", "/"):
            calls, tot, cum = calls + nc, tot + tt, cum + ct
    return calls, tot, cum


def profile_worldgen(run_wg: Any, run_df: Any, steps: int, runs: int = 3) -> dict[str, Any]:
    """cProfile `runs` worldgen runs (and as many diffusers runs, for the same rows on its side)."""
    result: dict[str, Any] = {}
    for side, fn in (("worldgen", run_wg), ("diffusers", run_df)):
        prof = cProfile.Profile()
        gc.collect()
        prof.enable()
        for _ in range(runs):
            fn()
        prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt  # type: ignore[attr-defined]
        rows = {}
        for label, frag, func in _MODEL_ROWS + (_EXECUTOR_ROWS if side == "worldgen" else ()):
            calls, tot, cum = _lookup(stats, frag, func)
            if calls:
                rows[label] = {
                    "calls_per_run": calls / runs,
                    "ms_per_run": cum / runs * 1e3,
                    "self_ms_per_run": tot / runs * 1e3,
                }
        result[side] = {"total_ms_per_run": total / runs * 1e3, "rows": rows, "stats": stats}
    return result


def print_profile(prof: dict[str, Any], steps: int, top: int) -> None:
    wg, df = prof["worldgen"], prof["diffusers"]
    print("\nProfile (cProfile, per run; the profiler inflates Python-heavy code, so read these as shares):")
    print(
        f"  total under profiler: worldgen {wg['total_ms_per_run']:.1f} ms, diffusers {df['total_ms_per_run']:.1f} ms"
    )
    print(
        f"  {'function':40s} {'calls':>7s} {'cum ms':>9s} {'self ms':>8s} {'ms/step':>8s}   (worldgen side)"
    )
    for label, row in wg["rows"].items():
        print(
            f"  {label:40s} {row['calls_per_run']:7.0f} {row['ms_per_run']:9.2f} {row['self_ms_per_run']:8.2f} "
            f"{row['ms_per_run'] / steps:8.3f}"
        )
    print(f"  {'same rows on the diffusers side':40s}")
    for label, row in df["rows"].items():
        print(
            f"  {label:40s} {row['calls_per_run']:7.0f} {row['ms_per_run']:9.2f} {row['self_ms_per_run']:8.2f}"
        )

    def model_ms(side: dict[str, Any]) -> float:
        return sum(side["rows"].get(label, {}).get("ms_per_run", 0.0) for label, _, _ in _MODEL_ROWS[:3])

    print(
        "  outside the three models: worldgen "
        f"{wg['total_ms_per_run'] - model_ms(wg):.1f} ms, diffusers {df['total_ms_per_run'] - model_ms(df):.1f} ms per run"
    )

    stream = io.StringIO()
    stats: pstats.Stats = wg["stats"]
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(r"worldgen[/\\]", top)
    print(f"\nTop {top} worldgen functions by cumulative time (totals over the profiled runs):")
    print(_trim_pstats(stream.getvalue()))
    stream = io.StringIO()
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    print(f"Top {top} functions by self time, worldgen side (models included):")
    print(_trim_pstats(stream.getvalue()))


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line for line in lines[start:] if line.strip())


def microbench_executor(g: Any, steps: int, reps: int = 200) -> dict[str, float]:
    """Per-step cost of each executor-side piece timed in isolation, without a profiler (µs).

    Replays one real run's values through `gather_inputs` for the loop's nodes, and the solver's state
    bookkeeping (`_restore`, `_snapshot`, `inspect.signature`, `RngState`) on a real mid-schedule state.
    """
    from worldgen.engine import gather_inputs
    from worldgen.execution import RunCallback
    from worldgen.execution.local import check_inputs
    from worldgen.rng import RngState

    class Record(RunCallback):
        def __init__(self) -> None:
            self.values: dict[str, dict[str, Any]] = {}
            self.mid: dict[str, dict[str, Any]] = {}

        def on_node_end(self, node_id: str, iteration: int | None, outputs: dict[str, Any]) -> None:
            self.values[node_id] = outputs
            if iteration == steps // 2:
                self.mid[node_id] = outputs

    rec = Record()
    inputs = check_inputs(g, {"prompt": PROMPT, "height": SIZE, "width": SIZE, "guidance_scale": GUIDANCE})
    g.run(inputs, seed=0, callbacks=[rec])
    values = {**rec.values, **rec.mid}
    (loop,) = g.plan().loops

    def per_call_us(fn: Any) -> float:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6

    def unfed() -> RngState:
        return RngState.seeded(0)

    out: dict[str, float] = {}
    out["gather_inputs (all loop nodes)"] = sum(
        per_call_us(lambda n=n: gather_inputs(g, n, values, inputs, loop=loop, iteration=1, unfed_rng=unfed))
        for n in loop.order
    )
    out["input_ports() (all loop nodes)"] = sum(per_call_us(g.block(n).input_ports) for n in loop.order)
    out["output_ports() (all loop nodes)"] = sum(per_call_us(g.block(n).output_ports) for n in loop.order)
    solver = g.block("solver")
    state = values["solver"]["state"]
    sched = solver._restore(state)
    out["solver _restore"] = per_call_us(lambda: solver._restore(state))
    out["solver _snapshot"] = per_call_us(lambda: solver._snapshot(sched))
    out["inspect.signature(scheduler.step)"] = per_call_us(lambda: inspect.signature(sched.step).parameters)
    if state.rng is not None:
        out["RngState generator + of"] = per_call_us(lambda: RngState.of(state.rng.generator()))
    cfg_in = {
        "pred_cond": values["unet"]["pred"],
        "pred_uncond": values["unet"]["pred_uncond"],
        "scale": GUIDANCE,
    }
    out["cfg block (math a pipeline does inline)"] = per_call_us(lambda: g.block("cfg")(**cfg_in))
    return out


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solver", choices=SOLVERS, default="ddim")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per side first")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the worldgen side and time executor pieces"
    )
    parser.add_argument("--top", type=int, default=20, help="rows of the cProfile listings")
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
        f"python {platform.python_version()}, {platform.machine()}"
    )

    g, pipe = build(args.solver, args.steps)
    weight_diff = check_preset_weights(g)
    run_wg, run_df = runners(g, pipe, args.steps)
    image_wg, image_df = run_wg(), run_df()
    if image_wg.shape != image_df.shape:
        print(
            f"FAIL: output shapes differ: worldgen {tuple(image_wg.shape)} vs diffusers {tuple(image_df.shape)}"
        )
        return 2
    diff = (image_wg.float() - image_df.float()).abs().max().item()
    print(
        f"same model objects: yes; graph weights vs preset_pipeline_components('{PRESET}'): max abs diff {weight_diff:.3g}"
    )
    print(
        f"outputs: {tuple(image_wg.shape)}, max abs diff worldgen vs diffusers = {diff:.3g} (tolerance {EQUAL_TOL:g})"
    )
    if not diff <= EQUAL_TOL:
        print("FAIL: the two sides compute different images; a timing comparison would be meaningless")
        return 2

    wg_times, df_times = measure(run_wg, run_df, args.repeats, args.warmup)
    unet_ms = unet_call_ms(g)
    med_wg, med_df = statistics.median(wg_times), statistics.median(df_times)
    ratio = med_wg / med_df
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
        "target": TARGET,
        "overhead_ms_per_run": (med_wg - med_df) * 1e3,
        "overhead_ms_per_step": per_step_ms,
        "unet_call_ms": unet_ms,
        "unet_ms_per_run": unet_ms * args.steps,
        "worldgen_ms": [t * 1e3 for t in wg_times],
        "diffusers_ms": [t * 1e3 for t in df_times],
    }

    print(f"\n{args.repeats} interleaved runs per side after {args.warmup} warm-up runs each:")
    print(f"  {'':28s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'ms/step':>8s}")
    for name, times in (("worldgen (graph, local)", wg_times), ("diffusers (pipeline)", df_times)):
        med = statistics.median(times)
        print(
            f"  {name:28s} {med * 1e3:10.1f} {min(times) * 1e3:9.1f} {max(times) * 1e3:9.1f} "
            f"{med * 1e3 / args.steps:8.2f}"
        )
    print(
        f"  {'UNet call (batch 2, CFG)':28s} {unet_ms:10.2f}   x {args.steps} steps = {unet_ms * args.steps:.1f} ms per run"
    )
    print(
        f"  overhead worldgen - diffusers: {(med_wg - med_df) * 1e3:+.1f} ms per run, {per_step_ms:+.3f} ms per step "
        f"({per_step_ms / unet_ms * 100:+.1f}% of a UNet call); ratio of minima {figures['ratio_of_minima']:.3f}"
    )

    if args.profile:
        prof = profile_worldgen(run_wg, run_df, args.steps)
        print_profile(prof, args.steps, args.top)
        micro = microbench_executor(g, args.steps)
        print("Executor pieces timed in isolation (no profiler), per denoising step:")
        for label, us in micro.items():
            print(f"  {label:42s} {us:9.1f} us")
        executor_only = sum(v for k, v in micro.items() if not k.startswith("cfg block"))
        print(
            f"  {'sum (executor bookkeeping, excl. cfg math)':42s} {executor_only:9.1f} us"
            f"   vs measured overhead {per_step_ms * 1e3:+.1f} us/step"
        )
        figures["profile"] = {
            side: {"total_ms_per_run": p["total_ms_per_run"], "rows": p["rows"]} for side, p in prof.items()
        }
        figures["executor_pieces_us_per_step"] = micro

    print(f"\nratio worldgen/diffusers = {ratio:.3f} (target <= {TARGET})")
    if args.json:
        sys.stdout = real_stdout
        print(json.dumps(figures, indent=2))
    return 1 if args.strict and ratio > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
