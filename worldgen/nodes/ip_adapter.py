"""IP-Adapter (role `adapter`): a reference image's subject or style as extra cross-attention in the UNet.

diffusers does it in two places, and so does a graph:

- `adapter/ip_adapter` holds the CLIP vision encoder: the reference image in, its image embeds out (and the
  zeros, or the zero image's features, the negative branch of guidance takes), as the pipelines'
  `prepare_ip_adapter_image_embeds` makes them. Its output also names the adapter's weights file and the scale.
- `backbone/unet2d` takes that value on its `ip_adapter` port. On the host where the UNet lives it loads the
  adapter's weights on first use (`image_proj.*`: the image projection; `ip_adapter.*`: the decoupled
  cross-attention, converted exactly as `pipe.load_ip_adapter` does), keyed by the weights file, so several
  adapters can serve different graphs on one UNet. The cross-attention layers' processors are then stood in for
  by `_ImagePrompt`, which is the processor it replaced unless a call with an image prompt is running: such a
  call sets the UNet's image tokens for its duration only (`image_prompt`), so a graph without the adapter, and
  every other user of the shared UNet, gets exactly the plain UNet. A loop's later steps reuse the image tokens
  its first step projected, so a step pays a few identity checks for the adapter.

The stand-ins are not torch modules, so the UNet's state dict and config (what a checkpoint saves) never hold
an adapter. Weights: the original IP-Adapter (`image_proj.proj.weight`, image embeds; what the tests cover), and
by the same path Plus (`image_proj.latents`) and Full (`image_proj.proj.3.weight`), which project the encoder's
penultimate hidden states; the Face ID variants need face embeddings, not a CLIP encoder, and are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from worldgen.block import ModelBlock, ModelConfig, Work, inference
from worldgen.errors import ConfigError
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind


# ---- the adapter's weights ------------------------------------------------------------------------------
class IPAdapterWeights(BaseModel):
    """Where an IP-Adapter's weights file is: `load_ip_adapter(source, subfolder=..., weight_name=...)`'s
    arguments (a local folder, a hub id, or `preset:<name>`, whose weight name is a component of the preset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    weight_name: str
    subfolder: str = ""
    revision: str | None = None

    def key(self) -> str:
        """The identity of the weights on a UNet: one load per file, whoever uses it."""
        return "|".join((self.source, self.revision or "main", self.subfolder, self.weight_name))

    def location(self) -> str:
        return f"'{Path(self.subfolder, self.weight_name).as_posix()}' of '{self.source}'"


def read_weights(weights: IPAdapterWeights) -> dict[str, dict[str, torch.Tensor]]:
    """The weights file as diffusers' loader splits it: {"image_proj": {...}, "ip_adapter": {...}}; a
    ConfigError (at `weights`) when it cannot be read or has neither part."""
    from worldgen.models.presets import PRESET_PREFIX

    if weights.source.startswith(PRESET_PREFIX):
        flat = _preset_weights(weights)
    else:
        flat = _file_weights(_weights_file(weights))
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        if part in state and name:
            state[part][name] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        found = ", ".join(sorted(flat)[:4]) or "no tensors"
        raise ConfigError(
            f"{weights.location()} is no IP-Adapter weights file: expected `image_proj.*` and `ip_adapter.*` "
            f"keys, found {found}{' ...' if len(flat) > 4 else ''}",
            path="weights",
        )
    return state


def _preset_weights(weights: IPAdapterWeights) -> dict[str, torch.Tensor]:
    from worldgen.errors import ModelLoadError
    from worldgen.models.presets import PRESET_PREFIX, build_preset_component

    name = weights.source[len(PRESET_PREFIX) :]
    try:
        built = build_preset_component(name, Path(weights.subfolder, weights.weight_name).as_posix())
    except ModelLoadError as err:
        raise ConfigError(str(err), path="weights") from None
    if not isinstance(built, Mapping):
        raise ConfigError(f"{weights.location()} is a model, not a weights file", path="weights")
    return dict(built)


def _weights_file(weights: IPAdapterWeights) -> Path:
    """The weights file on this machine: in a local folder, or fetched from the hub (its local cache)."""
    folder = Path(weights.source).expanduser()
    if folder.is_dir():
        path = folder / weights.subfolder / weights.weight_name
        if not path.is_file():
            raise ConfigError(f"IP-Adapter weights file {path} does not exist", path="weights")
        return path
    if weights.source.startswith(("/", ".", "~")) or weights.source.count("/") > 1:  # a path, not a hub id
        raise ConfigError(
            f"cannot read IP-Adapter weights {weights.location()}: folder '{weights.source}' does not exist",
            path="weights",
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                weights.source,
                weights.weight_name,
                subfolder=weights.subfolder or None,
                revision=weights.revision,
            )
        )
    except Exception as err:
        raise ConfigError(
            f"cannot read IP-Adapter weights {weights.location()} (no local folder of that name, and not a hub "
            f"id in the local cache or reachable): {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            path="weights",
        ) from None


def _file_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # h94's .bin files hold the two parts already split; flatten them like the safetensors ones.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read IP-Adapter weights file {path}: {err}", path="weights") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"IP-Adapter weights file {path} holds no state dict", path="weights")
    return {
        f"{part}.{key}": value
        for part, tensors in state.items()
        if isinstance(tensors, Mapping)
        for key, value in tensors.items()
    }


def uses_hidden_states(image_proj: Mapping[str, Any]) -> bool:
    """Whether an adapter projects the encoder's penultimate hidden states (Plus, Full) rather than its image
    embeds (the original), by its projection's keys, as diffusers decides."""
    return "proj.weight" not in image_proj


def check_fits(state: Mapping[str, Mapping[str, Any]], unet: Any, where: str) -> None:
    """A ConfigError (at `ip_adapter`) unless the weights fit this UNet: it has cross-attention, and the file
    has the decoupled cross-attention of each of its layers, at its widths. diffusers would fail inside its loader
    (or silently misplace weights) instead."""
    from worldgen.models.tiny_ip_adapter import cross_attention_layers

    image_proj, attention = state["image_proj"], state["ip_adapter"]
    if "perceiver_resampler.proj_in.weight" in image_proj or (
        "norm.weight" in image_proj and "proj.weight" not in image_proj and "latents" not in image_proj
    ):
        raise ConfigError(
            f"{where} is a Face ID IP-Adapter (it takes face embeddings, not a CLIP image encoder's); supported: "
            "the original, Plus and Full IP-Adapters",
            path="ip_adapter",
        )
    if any("_lora." in key for key in attention):
        raise ConfigError(
            f"{where} carries LoRA weights (Face ID), which are not supported", path="ip_adapter"
        )
    layers = cross_attention_layers(unet)
    not_cross = [name for name, attn in layers if not attn.is_cross_attention]
    if not layers or not_cross:
        raise ConfigError(
            "an IP-Adapter needs a backbone with cross-attention (it adds image attention beside the text's), "
            f"and this UNet's attention layers {', '.join(not_cross[:3]) or '(none)'} attend to no text",
            path="ip_adapter",
        )
    numbered = sorted({int(key.split(".", 1)[0]) for key in attention if key.split(".", 1)[0].isdigit()})
    expected = [2 * i + 1 for i in range(len(layers))]
    if numbered != expected:
        raise ConfigError(
            f"{where} was made for another UNet: it has image attention for {len(numbered)} layers (keys "
            f"{_short(numbered)}), this UNet has {len(layers)} cross-attention layers (keys {_short(expected)})",
            path="ip_adapter",
        )
    for i, (name, attn) in enumerate(layers):
        for part in ("to_k_ip", "to_v_ip"):
            key = f"{2 * i + 1}.{part}.weight"
            if key not in attention:
                raise ConfigError(f"{where} has no `ip_adapter.{key}`", path="ip_adapter")
            got = tuple(attention[key].shape)
            want = (attn.to_q.in_features, attn.to_k.in_features)
            if got != want:
                raise ConfigError(
                    f"{where} does not fit this UNet: `ip_adapter.{key}` is {got}, but layer {name} takes "
                    f"{want} (hidden width, cross-attention width {want[1]}): made for another model?",
                    path="ip_adapter",
                )


def _short(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers[:4])) + (", ..." if len(numbers) > 4 else "") if numbers else "none"


# ---- what travels from the encoder to the backbone ---------------------------------------------------------
@dataclass(frozen=True)
class ImagePrompt:
    """One IP-Adapter's part of a backbone call: the reference image's embeds (1, images, D) or hidden states
    (1, images, tokens, D), the negative branch's, the adapter's weights and its scale."""

    embeds: torch.Tensor
    uncond_embeds: torch.Tensor
    weights: IPAdapterWeights
    scale: float


class IPAdapterConfig(ModelConfig):
    """`model` is the CLIP vision encoder (CLIPVisionModelWithProjection); `weights` the adapter's file."""

    weights: IPAdapterWeights
    scale: float = Field(1.0, description="the image prompt's weight when the `scale` input is not given")


@register_block
class IPAdapterBlock(ModelBlock):
    """The IP-Adapter's image encoder: reference image(s) -> the image prompt a `backbone/unet2d` attends to.
    Several images for one adapter become several image prompts side by side, as in diffusers."""

    block_type = "adapter/ip_adapter"
    Config = IPAdapterConfig
    default_subfolder = "image_encoder"
    INPUTS = (
        Port(
            "image",
            K.IMAGE,
            doc="the reference: tensor (B, 3, H, W) in [0, 1], PIL image(s), or PNG path(s) / artifact reference(s)",
        ),
        Port("scale", K.SCALAR, optional=True, doc="the image prompt's weight (default: the config's)"),
    )
    OUTPUTS = (Port("ip_adapter", K.EMBEDDING, doc="the image prompt for a backbone's `ip_adapter` input"),)

    def model_class(self) -> type:
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection

    def check_inputs(self, inputs: Mapping[str, Any]) -> Work:
        if inputs.get("image") is not None:
            _pictures(inputs["image"])
        if "scale" in inputs:
            _scale(inputs["scale"], self.config.scale)
        return Work()

    @inference
    def forward(self, image: Any, scale: float | None = None) -> dict[str, Any]:
        from transformers import CLIPImageProcessor

        pictures = _pictures(image)
        scale = _scale(scale, self.config.scale)
        encoder = self.model
        device, dtype = self.placement()
        # As `load_ip_adapter` makes the pipeline's feature extractor when it has none: CLIP preprocessing at the
        # encoder's image size.
        size = encoder.config.image_size
        pixels = CLIPImageProcessor(size=size, crop_size=size)(pictures, return_tensors="pt").pixel_values
        pixels = pixels.to(device=device, dtype=dtype)
        if uses_hidden_states(self._image_proj_keys()):
            embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds
            uncond = torch.zeros_like(embeds)
        prompt = ImagePrompt(embeds[None], uncond[None], self.config.weights, scale)
        return {"ip_adapter": prompt}

    def _image_proj_keys(self) -> dict[str, Any]:
        """The projection's keys (which encoder output the adapter projects), read once per block."""
        keys = self.__dict__.get("_image_proj")
        if keys is None:
            keys = read_weights(self.config.weights)["image_proj"]
            keys = self.__dict__["_image_proj"] = dict.fromkeys(keys)
        return keys

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_image_proj", None)
        return state


def _pictures(image: Any) -> list[Any]:
    """The reference image(s) as PIL RGB images; a ConfigError at `image` for anything that is not an image."""
    from worldgen.nodes.vision import as_pil_images

    if image is None:
        raise ConfigError("no reference image given", path="image")
    if isinstance(image, torch.Tensor) and (image.dim() not in (3, 4) or image.shape[-3] != 3):
        raise ConfigError(
            f"image must be a tensor (B, 3, H, W) or (3, H, W) in [0, 1], got shape {tuple(image.shape)}",
            path="image",
        )
    try:
        return as_pil_images(image)
    except ConfigError as err:
        message = err.detail.removeprefix("vlm: ")
        raise ConfigError(f"not a reference image: {message}", path="image") from None


def _scale(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"scale must be a number (the image prompt's weight), got {value!r}", path="scale")
    return float(value)


# ---- the backbone's side ---------------------------------------------------------------------------------
class _Slot:
    """The image prompt active on one UNet during a call: (processors by layer, projected image tokens)."""

    active: tuple[list[Any], list[torch.Tensor]] | None = None


class _ImagePrompt:
    """Stands in for one cross-attention layer's processor: the replaced processor, except while a call with an
    image prompt runs, when it is that adapter's IPAdapterAttnProcessor2_0 given the text and image tokens
    (what diffusers' UNet passes it after `encoder_hid_proj`). Not a torch module: it is invisible to the
    UNet's state dict."""

    def __init__(self, original: Any, slot: _Slot, index: int):
        self.original, self.slot, self.index = original, slot, index

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.slot.active is None:
            extra = {} if temb is None else {"temb": temb}
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, *args, **extra, **kwargs
            )
        processors, tokens = self.slot.active
        return processors[self.index](
            attn,
            hidden_states,
            encoder_hidden_states=(encoder_hidden_states, tokens),
            attention_mask=attention_mask,
        )


@dataclass
class _Loaded:
    """Adapters loaded on a UNet, for one combination of weights files on one device and dtype."""

    processors: list[Any]  # an IPAdapterAttnProcessor2_0 per cross-attention layer
    projection: Any  # MultiIPAdapterImageProjection


@dataclass
class _UNetAdapters:
    slot: _Slot
    stand_ins: list[tuple[Any, _ImagePrompt]]  # (Attention module, its stand-in)
    loaded: dict[tuple, _Loaded]
    # The last call's (prompts, batch, guided, loaded, image tokens): a denoising loop passes the same prompt
    # at every step, so only its first step projects it and sets the scales.
    last: tuple | None = None


def _adapters_on(unet: Any) -> _UNetAdapters:
    """The UNet's IP-Adapter state, kept on the model object (its users share it)."""
    state = unet.__dict__.get("_worldgen_ip_adapters")
    if state is None:
        state = unet.__dict__["_worldgen_ip_adapters"] = _UNetAdapters(_Slot(), [], {})
    return state


def _stand_in(unet: Any, state: _UNetAdapters) -> None:
    """Put the stand-ins in: on the first call with an image prompt (once its weights were found to fit), and
    again if something replaced the UNet's processors since."""
    from worldgen.models.tiny_ip_adapter import cross_attention_layers

    if not state.stand_ins or any(attn.processor is not stand_in for attn, stand_in in state.stand_ins):
        layers = [attn for _, attn in cross_attention_layers(unet)]
        state.stand_ins = [
            (
                attn,
                attn.processor
                if isinstance(attn.processor, _ImagePrompt)
                else _ImagePrompt(attn.processor, state.slot, i),
            )
            for i, attn in enumerate(layers)
        ]
        for attn, stand_in in state.stand_ins:
            attn.set_processor(stand_in)


def _load(unet: Any, weights: Sequence[IPAdapterWeights], device: Any, dtype: Any) -> _Loaded:
    """Build the adapters' processors and projection from their files, as `UNet2DConditionModel.
    _load_ip_adapter_weights` does (its own converters: the same layers, the same key mapping)."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    from worldgen.models.tiny_ip_adapter import cross_attention_layers

    states = []
    for w in weights:
        try:
            state = read_weights(w)
        except ConfigError as err:  # on the backbone, the weights came in through its `ip_adapter` input
            raise ConfigError(err.detail, path="ip_adapter") from None
        check_fits(state, unet, w.location())
        states.append(state)
    # diffusers' converters read the layers' current processors only for the self-attention ones (which it
    # rebuilds and we drop) and for their class (xformers or not): ours stand in for SDPA ones.
    converted = UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers(
        unet, states, low_cpu_mem_usage=False
    )
    processors = [converted[name].to(device=device, dtype=dtype) for name, _ in cross_attention_layers(unet)]
    layers = [
        UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            unet, state["image_proj"], low_cpu_mem_usage=False
        )
        for state in states
    ]
    projection = MultiIPAdapterImageProjection(layers).to(device=device, dtype=dtype).eval()
    return _Loaded(processors, projection)


def _prompts(value: Any) -> list[ImagePrompt]:
    prompts = list(value) if isinstance(value, (list, tuple)) else [value]
    for prompt in prompts:
        if not isinstance(prompt, ImagePrompt):
            raise ConfigError(
                f"ip_adapter takes what an adapter/ip_adapter node gives, got a {type(prompt).__name__}",
                path="ip_adapter",
            )
    return prompts


@contextmanager
def image_prompt(block: ModelBlock, value: Any, batch: int, guided: bool) -> Iterator[None]:
    """For the duration of one `backbone/unet2d` call: the UNet attends to the image prompt(s) in `value` (an
    ImagePrompt, or a list of them for several adapters), for `batch` latents, both guidance branches when
    `guided` (negative first, as the pipelines batch them). Nothing changes when `value` is None."""
    if value is None:
        yield
        return
    prompts = _prompts(value)
    unet = block.model
    device, dtype = block.placement()
    state = _adapters_on(unet)
    key = (tuple(p.weights.key() for p in prompts), str(device), str(dtype))
    if key not in state.loaded:
        state.loaded[key] = _load(unet, [p.weights for p in prompts], device, dtype)
    loaded = state.loaded[key]
    _stand_in(unet, state)
    last = state.last
    if last is not None and last[1:3] == (batch, guided) and last[3] is loaded and _same(last[0], prompts):
        tokens = last[4]
    else:
        scales = [p.scale for p in prompts]  # one per adapter, as set_ip_adapter_scale sets them
        for processor in loaded.processors:
            processor.scale = list(scales)
        with torch.no_grad():
            embeds = [_batched(p, batch, guided).to(device=device, dtype=dtype) for p in prompts]
            tokens = loaded.projection(embeds)
        state.last = (prompts, batch, guided, loaded, tokens)
    state.slot.active = (loaded.processors, tokens)
    try:
        yield
    finally:
        state.slot.active = None


def _same(before: Sequence[ImagePrompt], now: Sequence[ImagePrompt]) -> bool:
    """The very same prompt objects (the memo holds them, so an identity cannot be reused by another)."""
    return len(before) == len(now) and all(a is b for a, b in zip(before, now, strict=True))


def _batched(prompt: ImagePrompt, batch: int, guided: bool) -> torch.Tensor:
    """One adapter's image embeds for the backbone's batch: each latent takes the reference (the pipelines
    repeat it per image), the negative branch's first when guided."""
    embeds = prompt.embeds.expand(batch, *prompt.embeds.shape[1:])
    if not guided:
        return embeds
    return torch.cat([prompt.uncond_embeds.expand(batch, *prompt.uncond_embeds.shape[1:]), embeds])
