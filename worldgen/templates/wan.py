"""Wan 2.x graph templates: text_to_video (`WanPipeline`) and image_to_video (Wan 2.1's
`WanImageToVideoPipeline`), the pipelines written out as task nodes:

    prompt -> tok -> te (UMT5 sequence) ------------------------------.
    negative_prompt (default "") -> tok_neg -> te_neg ---------------.|
    noise (video latent) -> schedule -> wan -> cfg -> solver -> vae -> video
                                         ^___________|  (the denoising loop)

Image to video adds the image's conditions: `image_enc` (CLIP vision, penultimate hidden states) into both
transformer calls, and `clip` -> `vae_enc` -> `cond` (the image as frame 0 of an otherwise empty clip, encoded,
with a first-frame mask) concatenated to the latent at every step. Wan 2.2's expand_timesteps models (TI2V-5B:
no image encoder) encode the image alone and put its latent in place of the first latent frame at timestep 0,
in every step (the transformer) and after the loop (`blend`). `te_neg` shares the block of `te`, so the
encoder is loaded once. The transformer runs twice per step (positive, negative) when guidance_scale > 1, as
the pipelines do.

They are tasks of the "wan" family (worldgen/templates/families.py): `text_to_video(model=<dir>)` finds the
family from model_index.json (WanPipeline / WanImageToVideoPipeline) as text_to_image does for images.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worldgen.errors import ConfigError
from worldgen.graph import Graph
from worldgen.templates.families import Family, family_components, model_index, read_config, register_family
from worldgen.templates.loop import add_denoising_loop

# The components a Wan graph loads, by subfolder, with the node that loads each (for errors).
_COMPONENT_NODES: dict[str, tuple[str, str]] = {
    "transformer": ("wan", "backbone/wan_transformer"),
    "vae": ("vae", "codec/wan_vae"),
    "text_encoder": ("te", "conditioner/umt5"),
    "tokenizer": ("tok", "tokenizer/umt5"),
    "scheduler": ("schedule", "solver"),
}
_I2V_NODES: dict[str, tuple[str, str]] = {
    "image_encoder": ("image_enc", "conditioner/clip_vision"),
    "image_processor": ("image_enc", "conditioner/clip_vision"),
}
# WanPipeline's own defaults (real checkpoints: 480x832, 81 frames, 50 steps, guidance 5, 512 UMT5 tokens).
PIPELINE_DEFAULTS: dict[str, Any] = {
    "height": 480,
    "width": 832,
    "frames": 81,
    "steps": 50,
    "guidance_scale": 5.0,
}
TEXT_TOKENS = 512
FLOW_SOLVERS = ("unipc", "flow_match_euler")  # Wan is a flow model: its two solvers in diffusers


@dataclass(frozen=True)
class WanSpec:
    """What a Wan graph is sized by, read from the model's component configs (no weights loaded)."""

    latent_channels: int  # the VAE's z_dim
    spatial: int  # the VAE's spatial scale factor
    temporal: int  # the VAE's temporal scale factor
    patch: tuple[int, int, int]  # the transformer's (frames, rows, columns) patch
    rope_positions: int  # the transformer's rope_max_seq_len: patches per axis it can place
    image_dim: int | None  # CLIP-vision hidden size (image to video), None: text to video
    scheduler_class: str
    flow_shift: float
    expand_timesteps: bool = False  # Wan 2.2 TI2V: a timestep per token, the image as the first latent frame

    @property
    def size_multiple(self) -> int:
        return self.spatial * self.patch[1]

    def noise_config(self, defaults: Mapping[str, int]) -> dict[str, Any]:
        """The size checks and defaults of the nodes sized by height, width and frames."""
        return {
            **defaults,
            "multiple_of": self.size_multiple,
            "temporal_scale_factor": self.temporal,
            "max_side": self.rope_positions * self.size_multiple,
            "max_frames": (self.rope_positions * self.patch[0] - 1) * self.temporal + 1,
        }


def wan_spec(ref: Mapping[str, Any], task: str) -> WanSpec:
    """The model's Wan spec; a ConfigError naming the node and its `model` field when a component the graph
    needs is missing, before any weights load."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    present = family_components(ref["source"], ref.get("revision"))
    needed = dict(_COMPONENT_NODES)
    transformer = read_config(ref, "transformer", WanTransformer3DModel) if "transformer" in present else None
    if task == "image_to_video" and transformer is not None and transformer.get("image_dim") is not None:
        needed.update(_I2V_NODES)
    for subfolder, (node, block_type) in needed.items():
        if subfolder not in present:
            raise ConfigError(
                f"node '{node}' ({block_type}) needs the model's '{subfolder}', and '{ref['source']}' has none",
                path=f"nodes.{node}.config.model",
            )
    assert transformer is not None
    vae = read_config(ref, "vae", AutoencoderKLWan)
    index = model_index(ref["source"], ref.get("revision"))
    scheduler_entry = index.get("scheduler") or [None, ""]
    scheduler_class = str(scheduler_entry[-1]).rsplit(".", 1)[-1]
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = read_config(ref, "scheduler", FlowMatchEulerDiscreteScheduler)
    flow_shift = scheduler.get("flow_shift") if "UniPC" in scheduler_class else scheduler.get("shift")
    return WanSpec(
        latent_channels=int(vae["z_dim"]),
        spatial=int(vae.get("scale_factor_spatial") or 8),
        temporal=int(vae.get("scale_factor_temporal") or 4),
        patch=tuple(transformer["patch_size"]),  # type: ignore[arg-type]
        rope_positions=int(transformer.get("rope_max_seq_len") or 1024),
        image_dim=transformer.get("image_dim"),
        scheduler_class=scheduler_class,
        flow_shift=float(flow_shift if flow_shift is not None else 1.0),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
    )


def _solver(spec: WanSpec, solver: str | None) -> tuple[str, dict[str, Any]]:
    """The solver block type and its scheduler overrides. Unset: the checkpoint's own scheduler. UniPC runs with
    flow sigmas and the model's shift (as Wan's checkpoints configure it), flow-match Euler with that shift."""
    if solver is None:
        solver = "unipc" if "UniPC" in spec.scheduler_class else "flow_match_euler"
    if solver not in FLOW_SOLVERS:
        raise ConfigError(
            f"Wan is a flow-matching model: solver must be one of {', '.join(FLOW_SOLVERS)}, got {solver!r}",
            path="solver",
        )
    if solver == "unipc":
        flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": spec.flow_shift}
        return "solver/unipc", flow
    return "solver/flow_match_euler", {"shift": spec.flow_shift}


def _defaults(ref: Mapping[str, Any]) -> dict[str, int]:
    """Default height, width and frames: a tiny preset's own (the pipeline's 480x832 would not fit it)."""
    from worldgen.models.presets import PRESET_PREFIX

    if ref["source"].startswith(PRESET_PREFIX):
        from worldgen.models.tiny_wan import DEFAULT_VIDEO

        return dict(DEFAULT_VIDEO)
    return {k: PIPELINE_DEFAULTS[k] for k in ("height", "width", "frames")}


def _add_text_nodes(g: Graph, ref: dict[str, Any], max_sequence_length: int) -> None:
    tokens = {"model": {**ref, "subfolder": "tokenizer"}, "max_length": max_sequence_length}
    g.add_node("tokenizer/umt5", id="tok", config=tokens, auto_connect=False)
    g.add_node(
        "conditioner/umt5",
        id="te",
        config={"model": {**ref, "subfolder": "text_encoder"}},
        auto_connect=False,
    )
    g.add_node(g.block("tok"), id="tok_neg", auto_connect=False)
    g.add_node(g.block("te"), id="te_neg", auto_connect=False)
    for tok, te in (("tok", "te"), ("tok_neg", "te_neg")):
        g.add_edge(f"{tok}.token_ids", f"{te}.token_ids")
        g.add_edge(f"{tok}.attention_mask", f"{te}.attention_mask")
    g.expose_input("prompt", "tok.text")
    g.expose_input("negative_prompt", "tok_neg.text", default="")  # as the pipelines' `negative_prompt or ""`


def _graph(
    task: str,
    ref: dict[str, Any],
    solver: str | None,
    steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    frames: int | None,
    max_sequence_length: int,
) -> tuple[Graph, WanSpec]:
    """The graph both tasks share: text, noise, the denoising loop and the decoder."""
    spec = wan_spec(ref, task)
    if not 1 <= max_sequence_length <= TEXT_TOKENS:
        raise ConfigError(
            f"max_sequence_length must be 1 to {TEXT_TOKENS}, got {max_sequence_length}",
            path="max_sequence_length",
        )
    solver_type, overrides = _solver(spec, solver)
    defaults = _defaults(ref)
    given = {"height": height, "width": width, "frames": frames}
    defaults.update({k: v for k, v in given.items() if v is not None})
    sized = spec.noise_config(defaults)
    g = Graph(task)
    # The noise runs first, so a size or frame count the model cannot take is refused before any model loads.
    noise = {**sized, "channels": spec.latent_channels, "scale_factor": spec.spatial}
    g.add_node("latent/video_noise", id="noise", config=noise, auto_connect=False)
    sized_nodes = ["noise"]
    if task == "image_to_video":  # the first frame is resized to the clip's size
        clip = {**sized, "first_frame_only": spec.expand_timesteps}
        g.add_node("video/first_frame_clip", id="clip", config=clip, auto_connect=False)
        sized_nodes.append("clip")
    for port in ("height", "width", "frames"):
        g.expose_input(port, [f"{node}.{port}" for node in sized_nodes], default=None)
    _add_text_nodes(g, ref, max_sequence_length)
    add_denoising_loop(
        g,
        solver=solver_type,
        solver_config={
            "model": {**ref, "subfolder": "scheduler"},
            "scheduler": overrides,
            "num_inference_steps": steps,
        },
        backbone="backbone/wan_transformer",
        backbone_id="wan",
        backbone_config={
            "model": {**ref, "subfolder": "transformer"},
            "expand_timesteps": spec.expand_timesteps,
        },
        conditions=[("te.embedding", "condition"), ("te_neg.embedding", "condition_uncond")],
        cfg_config={"scale": guidance_scale},
    )
    g.add_edge("noise.latent", "schedule.latent")
    g.add_edge("noise.rng", "schedule.rng")
    g.add_node(
        "codec/wan_vae",
        id="vae",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "decode"},
        auto_connect=False,
    )
    if not (task == "image_to_video" and spec.expand_timesteps):
        g.add_edge("solver.latent", "vae.latent")  # (Wan 2.2 image to video puts its first frame back first)
    g.expose_input("guidance_scale", ["wan.guidance_scale", "cfg.scale"], default=guidance_scale)
    g.expose_output("video", "vae.video")
    return g, spec


def wan_text_to_video(
    ref: dict[str, Any],
    *,
    solver: str | None = None,
    steps: int = PIPELINE_DEFAULTS["steps"],
    guidance_scale: float = PIPELINE_DEFAULTS["guidance_scale"],
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    max_sequence_length: int = TEXT_TOKENS,
) -> Graph:
    """Wan text to video (`WanPipeline`): prompt -> video (B, F, C, H, W) in [0, 1]. `solver` unset: the
    checkpoint's scheduler (UniPC with flow sigmas for Wan 2.1); height/width multiples of 16, frames 4k+1."""
    spec = wan_spec(ref, "text_to_video")
    if _in_channels(ref) != spec.latent_channels:
        raise ConfigError(
            f"'{ref['source']}' is a Wan 2.1 image-to-video model (its transformer takes the first-frame "
            "condition's channels): use image_to_video",
            path="model",
        )
    g, _ = _graph(
        "text_to_video", ref, solver, steps, guidance_scale, height, width, frames, max_sequence_length
    )
    return g


def wan_image_to_video(
    ref: dict[str, Any],
    *,
    solver: str | None = None,
    steps: int = PIPELINE_DEFAULTS["steps"],
    guidance_scale: float = PIPELINE_DEFAULTS["guidance_scale"],
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    max_sequence_length: int = TEXT_TOKENS,
) -> Graph:
    """Wan image to video (`WanImageToVideoPipeline`): image (its first frame, resized to height x width),
    prompt -> video. Wan 2.1: the image also conditions both transformer calls through CLIP vision, its encoded
    clip and a first-frame mask are concatenated to the latent; Wan 2.2 (`expand_timesteps`, no image encoder):
    the image's latent is the first latent frame, at timestep 0."""
    spec = wan_spec(ref, "image_to_video")
    channels = spec.latent_channels if spec.expand_timesteps else 2 * spec.latent_channels + spec.temporal
    if channels != _in_channels(ref):
        raise ConfigError(
            f"'{ref['source']}' is no image-to-video model: its transformer does not take the first-frame "
            "condition's channels (use text_to_video, or a Wan image-to-video checkpoint)",
            path="model",
        )
    g, spec = _graph(
        "image_to_video", ref, solver, steps, guidance_scale, height, width, frames, max_sequence_length
    )
    g.add_node(
        "codec/wan_vae",
        id="vae_enc",
        config={"model": {**ref, "subfolder": "vae"}, "mode": "encode"},
        auto_connect=False,
    )
    g.add_edge("clip.video", "vae_enc.video")
    if spec.expand_timesteps:
        # Wan 2.2: the image's latent is the first latent frame (timestep 0) in every step and after the loop.
        g.add_node("latent/wan_first_frame_blend", id="blend", auto_connect=False)
        g.add_edge("vae_enc.latent", "wan.first_frame")
        g.add_edge("solver.latent", "blend.latent")
        g.add_edge("vae_enc.latent", "blend.first_frame")
        g.add_edge("blend.latent", "vae.latent")
    else:
        g.add_node(
            "latent/wan_i2v_condition",
            id="cond",
            config={"temporal_scale_factor": spec.temporal},
            auto_connect=False,
        )
        g.add_edge("vae_enc.latent", "cond.latent")
        g.add_edge("cond.condition", "wan.latent_condition")
    image_targets = ["clip.image"]
    if spec.image_dim is not None:
        g.add_node(
            "conditioner/clip_vision",
            id="image_enc",
            config={"model": {**ref, "subfolder": "image_encoder"}},
            auto_connect=False,
        )
        g.add_edge("image_enc.embedding", "wan.image_embeds")
        image_targets.append("image_enc.image")
    g.expose_input("image", image_targets)
    return g


def _in_channels(ref: Mapping[str, Any]) -> int:
    from diffusers import WanTransformer3DModel

    return int(read_config(ref, "transformer", WanTransformer3DModel)["in_channels"])


register_family(
    Family(
        "wan",
        pipelines=("WanPipeline", "WanImageToVideoPipeline"),
        text_to_video=wan_text_to_video,
        image_to_video=wan_image_to_video,
        description="Wan 2.x video: 3D transformer on video latents, UMT5 conditioning (and CLIP vision for "
        "image to video), flow matching (UniPC or Euler)",
    )
)
