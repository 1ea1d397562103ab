"""Stable Audio Open's graph: `StableAudioPipeline` written out as task nodes (worldgen/nodes/stable_audio.py).

    prompt          -> tok     -> te (T5, masked) --.
    negative_prompt -> tok_neg -> te (the same) ----+--> cond (projection: text + seconds) --.
    start, duration --------------------------------'                                        v
    noise -> schedule -> dit -> cfg -> solver (cosine DPM-Solver) -> vae (Oobleck, cut to the span) -> audio
                         ^__________________|  (the denoising loop)

Inputs: prompt, negative_prompt (none: the pipeline's all-zero negative branch), duration (seconds; the clip
runs from `start`, default 0, to start + duration, the pipeline's audio_start_in_s / audio_end_in_s), steps,
guidance_scale. Outputs: audio (B, channels, samples) in [-1, 1] and sample_rate. A duration the model cannot
make is refused before any weights load (by the `vae` node, from the DiT's and the VAE's configs).
"""

from __future__ import annotations

from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.templates.families import Family, family_components, read_config, register_family
from worldgen.templates.loop import add_denoising_loop

# node id -> the model_index.json component it loads (what a missing one is reported as).
_REQUIRED = {
    "tok": "tokenizer",
    "te": "text_encoder",
    "cond": "projection_model",
    "dit": "transformer",
    "schedule": "scheduler",
    "vae": "vae",
}


def _check_components(ref: dict[str, Any]) -> None:
    source = ref["source"]
    have = family_components(source, ref.get("revision"))
    for node, field in _REQUIRED.items():
        if field not in have:
            raise ConfigError(
                f"node '{node}' needs the model's `{field}` component, and '{source}' has none (model_index.json "
                "names no such component); a Stable Audio pipeline needs all of: "
                + ", ".join(_REQUIRED.values()),
                path=f"{node}.model",
            )


def max_seconds(ref: dict[str, Any]) -> float:
    """The longest clip the model makes (the pipeline's max_audio_length_in_s), from the DiT's and the VAE's
    configs (no weights load)."""
    from diffusers import AutoencoderOobleck, StableAudioDiTModel

    from worldgen.nodes.stable_audio import longest_clip

    dit = read_config(ref, "transformer", StableAudioDiTModel)
    return longest_clip(read_config(ref, "vae", AutoencoderOobleck), int(dit["sample_size"]))


def stable_audio_text_to_audio(
    ref: dict[str, Any],
    *,
    steps: int = 100,
    guidance_scale: float = 7.0,
    duration: float | None = None,
    start: float = 0.0,
) -> Graph:
    """Stable Audio Open text to audio (`StableAudioPipeline`): prompt -> audio, sample_rate. `duration` is the
    default clip length in seconds (None: the longest the model makes, as the pipeline's default end) and
    `start` where it starts; both are also inputs of the graph."""
    from diffusers import StableAudioDiTModel

    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}", path="steps")
    if guidance_scale < 0:
        raise ConfigError(f"guidance_scale must be at least 0, got {guidance_scale}", path="guidance_scale")
    _check_components(ref)
    dit = read_config(ref, "transformer", StableAudioDiTModel)
    if duration is None:
        duration = max_seconds(ref) - start
    guided = guidance_scale > 1  # as the pipeline: no negative branch at a scale <= 1

    def model(subfolder: str) -> dict[str, Any]:
        return {**ref, "subfolder": subfolder}

    g = Graph("text_to_audio")
    g.add_node(
        "tokenizer/t5", id="tok", config={"model": model("tokenizer"), "truncate": False}, auto_connect=False
    )
    g.add_node(
        "conditioner/stable_audio_t5", id="te", config={"model": model("text_encoder")}, auto_connect=False
    )
    g.add_node(
        "conditioner/stable_audio_projection",
        id="cond",
        config={"model": model("projection_model"), "guidance": guided},
        auto_connect=False,
    )
    g.add_edge("tok.token_ids", "te.token_ids")
    g.add_edge("tok.attention_mask", "te.attention_mask")
    g.add_edge("te.embedding", "cond.embedding")
    g.add_edge("tok.attention_mask", "cond.attention_mask")
    g.expose_input("prompt", "tok.text")
    if guided:
        # An optional prompt: none gives no tokens, and the projection's zeros stand in, as in the pipeline.
        config = {"model": model("tokenizer"), "truncate": False, "optional": True}
        g.add_node("tokenizer/t5", id="tok_neg", config=config, auto_connect=False)
        g.add_node(g.block("te"), id="te_neg", auto_connect=False)  # the same encoder, loaded once
        g.add_edge("tok_neg.token_ids", "te_neg.token_ids")
        g.add_edge("tok_neg.attention_mask", "te_neg.attention_mask")
        g.add_edge("te_neg.embedding", "cond.embedding_uncond")
        g.add_edge("tok_neg.attention_mask", "cond.attention_mask_uncond")
        g.expose_input("negative_prompt", "tok_neg.text", default=None)

    noise = {
        "channels": int(dit["in_channels"]),
        "length": int(dit["sample_size"]),
        "dtype": ref.get("dtype", "float32"),
    }
    g.add_node("latent/audio_noise", id="noise", config=noise, auto_connect=False)
    conditions = [("cond.condition", "condition"), ("cond.global_condition", "global_condition")]
    if guided:
        conditions += [
            ("cond.condition_uncond", "condition_uncond"),
            ("cond.global_condition_uncond", "global_condition_uncond"),
        ]
    add_denoising_loop(
        g,
        solver="solver/cosine_dpm",
        solver_config={"model": model("scheduler"), "num_inference_steps": steps},
        backbone="backbone/stable_audio_dit",
        backbone_id="dit",
        backbone_config={"model": model("transformer")},
        conditions=conditions,
        cfg_config={"scale": guidance_scale},
    )
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")  # the solver's Brownian tree is seeded by the run's generator
    vae = {"model": model("vae"), "latent_length": int(dit["sample_size"])}
    g.add_node("codec/oobleck", id="vae", config=vae, auto_connect=False)
    g.add_edge("solver.latent", "vae.latent")
    g.expose_input("duration", ["cond.duration", "vae.duration"], default=duration)
    g.expose_input("start", ["cond.start", "vae.start"], default=start)
    if guided:
        g.expose_input("guidance_scale", "cfg.scale", default=guidance_scale)
    g.expose_output("audio", "vae.audio")
    g.expose_output("sample_rate", "vae.sample_rate")
    return g


register_family(
    Family(
        "stable-audio",
        pipelines=("StableAudioPipeline",),
        text_to_audio=stable_audio_text_to_audio,
        description="Stable Audio Open: latent DiT, T5 + seconds conditioning, Oobleck VAE, 44.1 kHz stereo",
    )
)
