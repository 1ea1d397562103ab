"""Vision-language task nodes (role `vlm`): artifacts (and an optional prompt) in, a description out.

The Philosopher uses them to say what the generated artifacts (world state block 3) actually show, one
numbered entry per artifact with its kind ("Image 1: …", "Video 2: …", "Audio 3: …"):

- `vlm/image_stats`: offline and deterministic, no model; states measurable properties of each image
  (size, dominant colours, brightness, contrast, colourfulness), of each clip (length, motion and where it
  goes, the same measures over its sampled frames) and of each sound (loudness, silence, brightness).
- `vlm/openai`: any OpenAI-compatible chat API that accepts image content parts; a clip goes as its sampled
  frames, a sound as its measures (text).
- `vlm/transformers`: a local transformers vision-to-text model (captioners such as ViT-GPT2 or BLIP, and
  chat VLMs whose processor has a chat template); a clip gets one caption per sampled frame.

Every block accepts `images` as file paths of any artifact kind (image, video, audio), a tensor (B, 3, H, W)
or (B, F, 3, H, W) in [0, 1], a PIL image, or a list of these (block-3 artifact references with a `path`
count as paths); `worldgen.nodes.vlm_media.read_media` reads them, `frames` says how many evenly spaced
frames of a clip are looked at. `as_pil_images` is the images-only reader other blocks use.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from worldgen.block import Block, BlockConfig, ModelBlock, ModelConfig, ModelRef
from worldgen.errors import ConfigError, ModelLoadError
from worldgen.nodes.llm import Message, OpenAIConfig, OpenAILLM
from worldgen.nodes.media_measures import clip_motion, describe_motion, describe_sound, sound_measures
from worldgen.nodes.vlm_media import MAX_FRAMES, Clip, Item, Picture, Sound, read_media
from worldgen.ports import Port, PortKind
from worldgen.registry import register_block

K = PortKind

VLM_INPUTS = (
    Port(
        "images",
        K.IMAGE,
        doc="block 3's files (image, video, audio paths / artifact references), PIL image(s), or a tensor "
        "(B, 3, H, W) or (B, F, 3, H, W) in [0, 1]",
    ),
    Port("prompt", K.TEXT, optional=True, doc="what to describe (default: the block's `prompt`)"),
    Port("context", K.JSON, optional=True, doc="variables for the `prompt` template (a mapping)"),
)
VLM_OUTPUTS = (
    Port("text", K.TEXT, doc="one description per artifact: 'Image i: …', 'Video i: …', 'Audio i: …' lines"),
)


def frames_field() -> Any:
    return Field(
        4,
        ge=1,
        le=MAX_FRAMES,
        description="how many evenly spaced frames of each video are looked at (first and last included)",
    )


# ---- inputs --------------------------------------------------------------------------------------------
def as_pil_images(images: Any) -> list[Any]:
    """Normalise the `images` port value to a list of PIL RGB images.

    Accepts a torch tensor or numpy array (B, C, H, W) / (C, H, W) in [0, 1], a PIL image, a file path
    (str or Path), an object or mapping with a `path` (a block-3 artifact reference), or a list/tuple of
    any of these (mixed, one level deep or nested).
    """
    if images is None:
        raise ConfigError("vlm: no images given (the `images` input is empty)")
    out: list[Any] = []
    _collect(images, out)
    if not out:
        raise ConfigError("vlm: no images given (the `images` input is an empty list)")
    return out


def _collect(value: Any, out: list[Any]) -> None:
    from PIL import Image

    from worldgen.images import to_pil

    if isinstance(value, Image.Image):
        out.append(value if value.mode == "RGB" else value.convert("RGB"))
    elif isinstance(value, (str, Path)):
        out.append(_open(Path(value)))
    elif isinstance(value, Mapping) and "path" in value:
        out.append(_open(Path(value["path"])))
    elif hasattr(value, "detach") or type(value).__module__ == "numpy":  # torch tensor / numpy array
        try:
            pictures = to_pil(value)
        except ValueError as err:
            raise ConfigError(f"vlm: {err}") from None
        out.extend(p if p.mode == "RGB" else p.convert("RGB") for p in pictures)
    elif isinstance(value, Sequence):
        for item in value:
            _collect(item, out)
    elif isinstance(getattr(value, "path", None), (str, Path)):  # ArtifactRef-like objects
        out.append(_open(Path(value.path)))
    else:
        raise ConfigError(
            f"vlm: cannot read an image from a {type(value).__name__}; expected a tensor (B, 3, H, W) in "
            "[0, 1], a PIL image, a file path or a list of these"
        )


def _open(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path.expanduser()) as img:
            return img.convert("RGB")  # convert() loads the pixels, so the file can be closed
    except FileNotFoundError:
        raise ConfigError(f"vlm: image file '{path}' does not exist") from None
    except OSError as err:
        raise ConfigError(f"vlm: cannot read image file '{path}': {err}") from None


def png_data_url(image: Any) -> str:
    """A PIL image as a `data:image/png;base64,…` URL (what OpenAI-compatible APIs take as an image part)."""
    from worldgen.images import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _numbered(items: Sequence[Item], descriptions: Sequence[str]) -> str:
    """'Image 1: …' / 'Video 2: …' / 'Audio 3: …' lines: each artifact numbered in order, with its kind."""
    kinds = {"image": "Image", "video": "Video", "audio": "Audio"}
    return "\n".join(
        f"{kinds[item.kind]} {i}: {d}" for i, (item, d) in enumerate(zip(items, descriptions, strict=True), 1)
    )


# ---- offline: measurable properties --------------------------------------------------------------------
# A fixed palette of common colour names (CSS hex values); measured colours are named by the nearest entry
# in CIELAB, so "red" means perceptually closest to #FF0000 among these, not an exact match.
PALETTE: dict[str, str] = {
    "black": "#000000",
    "dark gray": "#404040",
    "gray": "#808080",
    "silver": "#C0C0C0",
    "white": "#FFFFFF",
    "maroon": "#800000",
    "red": "#FF0000",
    "orange": "#FFA500",
    "brown": "#8B4513",
    "tan": "#D2B48C",
    "beige": "#F5F5DC",
    "yellow": "#FFFF00",
    "olive": "#808000",
    "green": "#008000",
    "lime": "#00FF00",
    "dark green": "#006400",
    "teal": "#008080",
    "cyan": "#00FFFF",
    "sky blue": "#87CEEB",
    "blue": "#0000FF",
    "navy": "#000080",
    "dark slate blue": "#483D8B",
    "purple": "#800080",
    "magenta": "#FF00FF",
    "pink": "#FFC0CB",
}

# Colours are clustered on a copy at most _THUMB pixels on its long side (nearest sampling); brightness,
# contrast and colourfulness are measured at full size up to _STATS_SIDE (on a box-filtered copy above it).
_THUMB = 64
_STATS_SIDE = 1024
_KMEANS_STEPS = 10


def _srgb_to_lab(rgb: Any) -> Any:
    """(N, 3) sRGB in [0, 1] -> (N, 3) CIELAB (D65)."""
    import numpy as np

    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ matrix.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


_PALETTE_LAB: Any = None


def _palette_lab() -> Any:
    global _PALETTE_LAB
    if _PALETTE_LAB is None:
        import numpy as np

        rgb = np.array([[int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)] for h in PALETTE.values()])
        _PALETTE_LAB = _srgb_to_lab(rgb)
    return _PALETTE_LAB


def colour_name(rgb: Sequence[float]) -> str:
    """The palette name nearest (in CIELAB) to an sRGB colour given in [0, 1]."""
    import numpy as np

    lab = _srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(1, 3))
    return list(PALETTE)[int(((_palette_lab() - lab) ** 2).sum(axis=1).argmin())]


def _median_cut(pixels: Any, k: int) -> Any:
    """Deterministic initial centres: split the most spread box at its median until there are k boxes."""
    import numpy as np

    boxes = [pixels]
    while len(boxes) < k:
        spreads = [float(np.ptp(b, axis=0).max()) if len(b) > 1 else 0.0 for b in boxes]
        i = int(np.argmax(spreads))
        if spreads[i] <= 1e-6:
            break  # every box is one colour
        box = boxes.pop(i)
        channel = int(np.ptp(box, axis=0).argmax())
        ordered = box[np.argsort(box[:, channel], kind="stable")]
        half = len(ordered) // 2
        boxes[i:i] = [ordered[:half], ordered[half:]]
    return np.stack([b.mean(axis=0) for b in boxes])


def _shrink(image: Any, side: int, resample: Any) -> Any:
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _nearest(pixels: Any, centres: Any) -> Any:
    """Index of the nearest centre for each pixel (squared distances through one matrix product)."""
    distances = (centres**2).sum(axis=1)[None, :] - 2.0 * pixels @ centres.T
    return distances.argmin(axis=1)


def dominant_colours(image: Any, max_colours: int = 3) -> list[tuple[str, str, float]]:
    """[(palette name, measured hex, share of pixels)], most common first (at most `max_colours`).

    Median-cut seeds a k-means (Lloyd) on a downsampled copy; clusters that get the same palette name are
    merged. Deterministic: no randomness, stable sorts, ties broken by name.
    """
    return pixel_colours(_thumb_pixels(image), max_colours)


def _thumb_pixels(image: Any) -> Any:
    """(N, 3) sRGB in [0, 1] of a copy at most _THUMB pixels on its long side."""
    import numpy as np
    from PIL import Image

    # Nearest sampling keeps real pixel colours (a box filter would average noise or texture into grey).
    thumb = _shrink(image, _THUMB, Image.Resampling.NEAREST)
    return np.asarray(thumb, dtype=np.float64).reshape(-1, 3) / 255.0


def pixel_colours(pixels: Any, max_colours: int = 3) -> list[tuple[str, str, float]]:
    """`dominant_colours` of (N, 3) sRGB pixels in [0, 1]."""
    import numpy as np

    k = min(max(2 * max_colours, 4), 12)
    centres = _median_cut(pixels, k)
    for _ in range(_KMEANS_STEPS):
        labels = _nearest(pixels, centres)
        counts = np.bincount(labels, minlength=len(centres))
        sums = np.stack(
            [np.bincount(labels, weights=pixels[:, c], minlength=len(centres)) for c in range(3)], 1
        )
        moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        converged = np.allclose(moved, centres, atol=1e-4)
        centres = moved
        if converged:
            break
    counts = np.bincount(_nearest(pixels, centres), minlength=len(centres))
    merged: dict[str, list[Any]] = {}
    for centre, count in zip(centres, counts, strict=True):
        if count == 0:
            continue
        name = colour_name(centre)
        total, weighted = merged.get(name, (0, np.zeros(3)))
        merged[name] = [total + int(count), weighted + centre * int(count)]
    ranked = sorted(merged.items(), key=lambda item: (-item[1][0], item[0]))[:max_colours]
    out = []
    for name, (count, weighted) in ranked:
        mean = np.clip(weighted / count, 0.0, 1.0)
        hex_code = "#" + "".join(f"{int(round(v * 255)):02X}" for v in mean)
        out.append((name, hex_code, count / len(pixels)))
    return out


def _word(value: float, scale: Sequence[tuple[float, str]], last: str) -> str:
    for limit, word in scale:
        if value < limit:
            return word
    return last


def image_stats(image: Any, max_colours: int = 3) -> dict[str, Any]:
    """Measurable properties of one PIL RGB image (the numbers `vlm/image_stats` puts into words).

    brightness: mean Rec. 709 luma of the (gamma-encoded) pixels, 0 = black, 1 = white;
    contrast: RMS contrast (standard deviation of that luma);
    colourfulness: Hasler & Süsstrunk (2003) metric M on the 0..255 scale (0 grey, ~110 extremely colourful);
    balance: how much brighter one half of the image is than the opposite half (luma difference).
    """
    import numpy as np
    from PIL import Image

    rgb = np.asarray(_shrink(image, _STATS_SIDE, Image.Resampling.BOX)).astype(np.float32)  # 0..255
    luma = rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    h, w = luma.shape
    halves = {
        "top": float(luma[: h // 2].mean() - luma[h - h // 2 :].mean()) if h > 1 else 0.0,
        "left": float(luma[:, : w // 2].mean() - luma[:, w - w // 2 :].mean()) if w > 1 else 0.0,
    }
    return {
        "width": image.width,
        "height": image.height,
        "colours": dominant_colours(image, max_colours),
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "colourfulness": colourfulness,
        "balance": halves,
    }


# (upper limit, word) pairs and the word above the last limit
_BRIGHTNESS_WORDS = (((0.2, "dark"), (0.4, "dim"), (0.65, "balanced")), "bright")
_CONTRAST_WORDS = (((0.02, "uniform"), (0.1, "low"), (0.25, "moderate")), "high")
_COLOURFULNESS_WORDS = (  # after Hasler & Süsstrunk's scale
    (
        (10, "not colourful"),
        (33, "slightly colourful"),
        (59, "moderately colourful"),
        (82, "quite colourful"),
    ),
    "highly colourful",
)


def describe_stats(stats: Mapping[str, Any]) -> str:
    """One sentence of measurable facts from `image_stats`."""
    w, h = stats["width"], stats["height"]
    shape = "square" if w == h else ("landscape" if w > h else "portrait")
    colours = ", ".join(f"{name} {hex_code} ({share:.0%})" for name, hex_code, share in stats["colours"])
    brightness, contrast, colourfulness = stats["brightness"], stats["contrast"], stats["colourfulness"]
    parts = [
        f"{w}×{h} pixels ({shape})",
        f"dominant colours: {colours}",
        f"brightness {brightness:.2f} ({_word(brightness, *_BRIGHTNESS_WORDS)})",
        f"contrast {contrast:.2f} ({_word(contrast, *_CONTRAST_WORDS)})",
        f"colourfulness {colourfulness:.0f} ({_word(colourfulness, *_COLOURFULNESS_WORDS)})",
    ]
    lighter = []
    for side, opposite, key in (("top", "bottom", "top"), ("left", "right", "left")):
        diff = stats["balance"][key]
        if abs(diff) >= 0.15:
            lighter.append(side if diff > 0 else opposite)
    if lighter:
        parts.append(f"brighter toward the {' and '.join(lighter)}")
    return "; ".join(parts) + "."


def clip_stats(clip: Clip, max_colours: int = 3) -> dict[str, Any]:
    """`image_stats` over a clip's sampled frames: brightness, contrast, colourfulness and balance are the
    frames' means, the dominant colours those of all their (thumbnail) pixels together; plus
    `first_brightness` / `last_brightness` (the first and last sampled frame's) and the clip's `motion`
    (measured over all its frames, worldgen.nodes.media_measures.clip_motion)."""
    import numpy as np

    per_frame = [image_stats(frame, max_colours) for frame in clip.frames]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "width": clip.frames[0].width,
        "height": clip.frames[0].height,
        "colours": pixel_colours(np.concatenate([_thumb_pixels(f) for f in clip.frames]), max_colours),
        "brightness": mean([s["brightness"] for s in per_frame]),
        "contrast": mean([s["contrast"] for s in per_frame]),
        "colourfulness": mean([s["colourfulness"] for s in per_frame]),
        "balance": {k: mean([s["balance"][k] for s in per_frame]) for k in ("top", "left")},
        "first_brightness": per_frame[0]["brightness"],
        "last_brightness": per_frame[-1]["brightness"],
        "motion": clip_motion(clip.all_frames or clip.frames),
    }


def describe_clip(clip: Clip, stats: Mapping[str, Any]) -> str:
    """A clip's length, motion and what its sampled frames show (the measures `describe_stats` gives)."""
    shown = ", ".join(str(i + 1) for i in clip.picked)
    parts = [clip.timing(), describe_motion(stats["motion"])]
    first, last = stats["first_brightness"], stats["last_brightness"]
    if abs(last - first) >= 0.1:
        parts.append(f"{'brightening' if last > first else 'darkening'} from {first:.2f} to {last:.2f}")
    frames = f"frame{'s' if len(clip.picked) != 1 else ''} {shown}"
    return "; ".join(parts) + f"; {frames} show: " + describe_stats(stats)


def describe_item(item: Item, max_colours: int = 3) -> str:
    """The offline description of one artifact (an image, a clip or a sound)."""
    if isinstance(item, Clip):
        return describe_clip(item, clip_stats(item, max_colours))
    if isinstance(item, Sound):
        return describe_sound(sound_measures(item.samples, item.rate))
    return describe_stats(image_stats(item.image, max_colours))


class ImageStatsConfig(BlockConfig):
    max_colours: int = Field(3, ge=1, le=8, description="how many dominant colours to name per image")
    frames: int = frames_field()


@register_block
class ImageStatsVLMBlock(Block):
    """Offline describer: per image its size, dominant colours (named, with hex and share), brightness,
    contrast and colourfulness; per video its length, motion (how much, and where it goes) and those measures
    over `frames` evenly spaced frames; per sound its length, rate, channels, loudness (RMS and peak dBFS),
    silent share and spectral centroid. Deterministic, no model, a few milliseconds per artifact. `prompt`
    and `context` are accepted (so it can stand in for a real VLM) and ignored."""

    block_type = "vlm/image_stats"
    Config = ImageStatsConfig
    INPUTS = VLM_INPUTS
    OUTPUTS = VLM_OUTPUTS

    def forward(self, images: Any, prompt: str | None = None, context: Any = None) -> dict[str, Any]:
        items = read_media(images, self.config.frames)
        return {"text": _numbered(items, [describe_item(item, self.config.max_colours) for item in items])}


# ---- remote: OpenAI-compatible chat with image parts ---------------------------------------------------
DEFAULT_PROMPT = "Describe precisely what these images show."


class OpenAIVLMConfig(OpenAIConfig):
    prompt: str | None = Field(
        DEFAULT_PROMPT,
        description="the instruction sent with the artifacts (Jinja template, rendered with `context`)",
    )
    temperature: float | None = Field(
        0.0, ge=0.0, le=2.0, description="0: as deterministic as the API allows; None: the backend's default"
    )
    detail: Literal["low", "high", "auto"] = Field(
        "auto", description="image detail the API looks at (low: cheaper, a 512 px overview)"
    )
    frames: int = frames_field()


@register_block
class OpenAIVLMBlock(OpenAILLM):
    """Any OpenAI-compatible chat endpoint that reads images: one user message holding the (rendered)
    prompt as a text part, then each artifact named by a text part ("Image 1", "Video 2: frames 1, 4, 7, 9 of
    9, 8 fps, 1.1 s", "Audio 3: …") and followed by its pictures as `image_url` parts (base64 PNG data URLs):
    an image's one, a clip's `frames` sampled frames; a sound has none, its text part states its measures.

    Why one user message and not one per artifact: chat templates of several open VLMs served through
    OpenAI-compatible servers (Gemma, Mistral, ...) refuse two user messages in a row; text parts between
    the pictures name each artifact just as well. Why no spectrogram picture for a sound: general VLMs are
    not trained to read spectrograms, so one would add image tokens and guesses, not facts the measures lack.

    Shares everything else with `llm/openai`: the key as an `${env:NAME}` reference (never stored, logged or
    sent anywhere but the endpoint), one cached client per endpoint, retries, errors naming the endpoint, and
    `output: json` with schema validation (then `data` holds the object).
    """

    block_type = "vlm/openai"
    Config = OpenAIVLMConfig
    INPUTS = (*VLM_INPUTS, Port("system", K.TEXT, optional=True, doc="the system prompt (overrides config)"))
    OUTPUTS = (
        Port("text", K.TEXT, doc="the model's answer (one text about all the artifacts)"),
        Port("data", K.JSON, doc="output=json: the parsed (and validated) object; else None"),
    )

    def forward(
        self,
        images: Any,
        prompt: str | None = None,
        context: Mapping[str, Any] | None = None,
        system: str | None = None,
    ) -> dict[str, Any]:
        parts = self.artifact_parts(read_media(images, self.config.frames))
        return self.complete(context, prompt, system, artifact_parts=parts)

    def artifact_parts(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        """The content parts that show `items`: per artifact a text part naming it, then its pictures."""
        parts: list[dict[str, Any]] = []
        for number, item in enumerate(items, start=1):
            if isinstance(item, Sound):
                measures = describe_sound(sound_measures(item.samples, item.rate))
                text = f"{item.label(number)} (a sound: its measures, not the sound itself): {measures}"
                parts.append({"type": "text", "text": text})
                continue
            parts.append({"type": "text", "text": item.label(number)})
            pictures = item.frames if isinstance(item, Clip) else [item.image]
            parts += [
                {"type": "image_url", "image_url": {"url": png_data_url(p), "detail": self.config.detail}}
                for p in pictures
            ]
        return parts

    def image_messages(
        self, messages: list[Message], parts: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """`messages` with the artifacts' parts attached to the first user message (after its text)."""
        out: list[dict[str, Any]] = []
        attached = False
        for message in messages:
            if message["role"] == "user" and not attached:
                message = {"role": "user", "content": [{"type": "text", "text": message["content"]}, *parts]}
                attached = True
            out.append(message)
        return out

    def generate(self, messages: list[Message], **call: Any) -> str:
        return super().generate(self.image_messages(messages, call.get("artifact_parts") or ()), **call)


# ---- local: transformers vision-to-text ----------------------------------------------------------------
class TransformersVLMConfig(ModelConfig):
    prompt: str | None = Field(
        None,
        description="instruction (Jinja template rendered with `context`): chat VLMs get it with each image "
        f"(default '{DEFAULT_PROMPT}'); processors that take text get it as the caption's prefix; "
        "plain captioners (image processor + tokenizer) ignore it",
    )
    max_new_tokens: int = Field(48, ge=1, description="most tokens generated per image (per frame of a clip)")
    frames: int = frames_field()
    processor_subfolder: str | None = Field(
        None,
        description="where the processor/tokenizer files are inside the model's source (default: its root)",
    )
    architecture: str | None = Field(
        None,
        description="transformers model class name (e.g. 'BlipForConditionalGeneration'); default: the one "
        "AutoModelForImageTextToText picks for the checkpoint's config",
    )

    @field_validator("architecture")
    @classmethod
    def _known_class(cls, value: str | None) -> str | None:
        if value is not None:
            import transformers

            if not isinstance(getattr(transformers, value, None), type):
                raise ValueError(f"transformers has no model class '{value}'")
        return value


class _Processors:
    """How one checkpoint turns an image (and text) into model inputs, and tokens back into text."""

    def __init__(self, image: Any, tokenizer: Any, combined: bool):
        self.image, self.tokenizer, self.combined = image, tokenizer, combined


@register_block
class TransformersVLMBlock(ModelBlock):
    """A local transformers vision-to-text model (shared through the model pool): captioners such as
    VisionEncoderDecoder (ViT-GPT2) or BLIP, and chat VLMs whose processor has a chat template. Greedy
    decoding, one `generate` per image: the same images give the same text."""

    block_type = "vlm/transformers"
    lora_targets = None  # not False: it takes an adapter, on the targets `lora_target_modules` finds
    Config = TransformersVLMConfig
    default_subfolder = None
    INPUTS = VLM_INPUTS
    OUTPUTS = VLM_OUTPUTS

    def __init__(self, config: BlockConfig | Mapping[str, Any] | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self._processors: _Processors | None = None
        self._processors_from_assets = False
        self._model_cls: type | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if not self._processors_from_assets:
            state["_processors"] = None  # reloaded through the pool where the block runs
        return state

    # ---- loading -------------------------------------------------------------------------------------
    def model_class(self) -> type:
        # The concrete class (e.g. VisionEncoderDecoderModel), not AutoModelForImageTextToText: the loaders
        # apply dtype/device and rebuild saved architectures only for PreTrainedModel subclasses.
        if self._model_cls is None:
            ref = self.config.model
            options = {"subfolder": ref.subfolder} if ref.subfolder else {}
            if ref.revision and not Path(ref.source).expanduser().is_dir():
                options["revision"] = ref.revision
            self._model_cls = self._resolve_class(str(Path(ref.source).expanduser()), **options)
        return self._model_cls

    def _resolve_class(self, source: str, **options: Any) -> type:
        from transformers import AutoModelForImageTextToText

        if self.config.architecture:
            import transformers

            return getattr(transformers, self.config.architecture)
        if source.startswith("preset:"):
            raise ModelLoadError(
                f"{self.block_type}: there is no built-in vision-to-text preset ('{source}'); give a local "
                "transformers directory or a hub id, or use vlm/image_stats offline"
            )
        try:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(source, **options)
        except Exception:  # noqa: BLE001 - the loader reports a missing/odd model clearly
            return AutoModelForImageTextToText
        try:
            return AutoModelForImageTextToText._model_mapping[type(model_config)]
        except KeyError:
            raise ModelLoadError(
                f"{self.block_type}: model '{source}' is a '{model_config.model_type}' model, which "
                "AutoModelForImageTextToText does not know as vision-to-text; set `architecture` to its "
                "transformers class name"
            ) from None

    def lora_target_modules(self) -> str:
        """The language model's attention projections, as peft targets them for the language model's own
        architecture (a ViT -> GPT-2 captioner: the decoder's `c_attn`, self- and cross-attention), as a regex
        over full module names: the image encoder has `q_proj`-like names too and stays untouched. peft has no
        default for the composite model (`vision-encoder-decoder`, `llava`, ...), so None would not do."""
        import re

        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model = self.model
        language = model.get_decoder() if hasattr(model, "get_decoder") else None
        prefix = next((name for name, module in model.named_modules() if module is language), None)
        kind = getattr(getattr(language, "config", None), "model_type", None)
        names = DEFAULTS.get(kind) if prefix is not None else None
        if not names:
            raise ConfigError(
                f"{self.block_type}: no LoRA targets known for model '{self.config.model.source}' (its language "
                f"model: {kind or 'not found'}); leave this block out of training with `lora.nodes`/`lora.roles`"
            )
        scope = re.escape(prefix) + r"\." if prefix else ""
        return rf"{scope}(.*\.)?({'|'.join(re.escape(n) for n in names)})"

    def processor_ref(self) -> ModelRef:
        ref = self.config.model
        return ModelRef(source=ref.source, revision=ref.revision, subfolder=self.config.processor_subfolder)

    @property
    def processors(self) -> _Processors:
        if self._processors is None:
            from worldgen.models.pool import default_pool

            pool, ref = default_pool(), self.processor_ref()
            self._processors = self._pick_processors(lambda cls: pool.get(ref, cls))
        return self._processors

    def _pick_processors(self, load: Any) -> _Processors:
        """AutoProcessor when the checkpoint has a full processor (image + text), else its image processor
        and tokenizer (AutoProcessor returns just the tokenizer for e.g. VisionEncoderDecoder captioners)."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        processor = load(AutoProcessor)
        if isinstance(processor, ProcessorMixin):
            return _Processors(processor, processor.tokenizer, combined=True)
        tokenizer = processor if isinstance(processor, PreTrainedTokenizerBase) else load(AutoTokenizer)
        return _Processors(load(AutoImageProcessor), tokenizer, combined=False)

    def save_assets(self, directory: Path) -> None:
        super().save_assets(directory)
        processors = self.processors
        processors.image.save_pretrained(directory / "processor")
        if not processors.combined:
            processors.tokenizer.save_pretrained(directory / "processor")

    def load_assets(self, directory: Path) -> None:
        if directory.exists() and self._model_cls is None and (directory / "config.json").is_file():
            self._model_cls = self._resolve_class(str(directory))
        super().load_assets(directory)
        if (directory / "processor").is_dir():
            self._processors = self._pick_processors(lambda cls: cls.from_pretrained(directory / "processor"))
            self._processors_from_assets = True

    # ---- describing ----------------------------------------------------------------------------------
    def forward(self, images: Any, prompt: str | None = None, context: Any = None) -> dict[str, Any]:
        items = read_media(images, self.config.frames)
        prompt = self.instruction(prompt, context)
        return {"text": _numbered(items, [self.describe_item(item, prompt) for item in items])}

    def describe_item(self, item: Item, prompt: str | None = None) -> str:
        """An image's caption; a clip's length and motion, then one caption per sampled frame ("frame 4: …");
        a sound's measures (a vision model cannot hear it).

        One caption per frame rather than one for a grid of frames: captioners are trained on single
        pictures at their input size (a grid is out of their distribution, each frame a quarter of the
        pixels), and the frames' captions in order tell what changes; the cost is `frames` greedy runs."""
        if isinstance(item, Sound):
            return describe_sound(sound_measures(item.samples, item.rate))
        if isinstance(item, Picture):
            return self.describe(item.image, prompt)
        motion = describe_motion(clip_motion(item.all_frames or item.frames))
        captions = [
            f"frame {i + 1}: {self.describe(f, prompt)}"
            for i, f in zip(item.picked, item.frames, strict=True)
        ]
        return "; ".join([item.timing(), motion, *captions])

    def instruction(self, prompt: str | None, context: Mapping[str, Any] | None) -> str | None:
        """The prompt `describe` gets: the `prompt` input, else the config's template rendered with `context`."""
        if prompt is None and self.config.prompt:
            from worldgen.prompts import render_prompt

            prompt = render_prompt(self.config.prompt, dict(context or {}))
        return prompt

    def describe(self, image: Any, prompt: str | None = None) -> str:
        """The model's text for one PIL image (greedy)."""
        import copy

        import torch

        model, processors = self.model, self.processors  # the model first: its errors are the clearer ones
        if processors.combined:
            processor = processors.image
            if getattr(processor, "chat_template", None):
                content = [{"type": "image"}, {"type": "text", "text": prompt or DEFAULT_PROMPT}]
                prompt = processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            inputs = dict(processor(images=[image], text=[prompt] if prompt else None, return_tensors="pt"))
        else:
            inputs = {"pixel_values": processors.image(images=[image], return_tensors="pt").pixel_values}
        device, dtype = self.placement()
        inputs = {
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        settings = copy.deepcopy(model.generation_config)
        settings.update(do_sample=False, num_beams=1, max_new_tokens=self.config.max_new_tokens)
        for name in ("temperature", "top_p", "top_k"):
            setattr(settings, name, None)
        tokenizer = processors.tokenizer
        if settings.pad_token_id is None:
            candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, settings.eos_token_id)
            settings.pad_token_id = next((c for c in candidates if c is not None), None)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=settings)[0]
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None:  # decoder-only models echo the prompt: keep only the new tokens
            n = prompt_ids.shape[1]
            if output.shape[0] >= n and torch.equal(output[:n].to(prompt_ids.device), prompt_ids[0]):
                output = output[n:]
        return tokenizer.decode(output, skip_special_tokens=True).strip() or "(the model produced no text)"
