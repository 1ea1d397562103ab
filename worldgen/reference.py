"""Block 2's references: earlier images of a world that the Creator's pipeline is conditioned on, so a world keeps
its look (the same harbor, keeper and ship) from episode to episode.

A reference (state.Reference) names an episode of this world — `"previous"` or a number — and one of its images;
never a path: the image is read from the world's own storage (`WorldStorage.read_artifact`, which serves only the
world's own files), so a block 2 written by an LLM or sent over HTTP cannot make the server read anything else.
Its `control` picks the pipeline inputs the image and its scale feed (stage.REFERENCE_INPUTS):

    {"episode": "previous", "control": "img2img", "strength": 0.6}   ->  image=<episode's PNG>, strength=0.6

References are checked when block 2 is written (the Architect's output, a user's block 2) and resolved again when
the Creator runs, which then reads the images; a bad reference — an episode that does not exist or has no such
image, a pipeline without the control's input — is a ConfigError naming block 2's field before the Creator runs
anything.

The first episode has no previous one. A reference to `"previous"` is then skipped, with a note recorded in the
episode, when the pipeline can draw without that input: an Architect (an LLM especially) may ask for continuity
from the start, and failing the world's first step for a request that has nothing to refer to yet would only stop
it. A pipeline that cannot draw without the image (img2img's `image`) is an error naming it, since drawing without
would not be what block 2 asked for.
"""

from __future__ import annotations

from typing import Any

from worldgen.errors import ConfigError
from worldgen.stage import REFERENCE_INPUTS, Stage, reference_input
from worldgen.state import ArtifactRef, ImageRequest, ReferenceUse
from worldgen.storage import StorageError, UnsafePathError, WorldStorage

FIRST_EPISODE_NOTE = "no previous episode (this is the world's first): drawn without this reference"


def plan_references(
    generation: ImageRequest, creator: Stage, storage: WorldStorage, *, where: str
) -> list[ReferenceUse]:
    """What an image request's references will feed the pipeline it selects, checked against the pipeline and
    the world's episodes (no image is read). `where` names the request in errors (e.g. `state.generation.0`)."""
    if not generation.reference:
        return []
    pipeline = generation.pipeline
    engine = creator.item(pipeline)
    episodes = storage.episodes()
    uses = []
    counts: dict[str, int] = {}
    for i, ref in enumerate(generation.reference):
        at = f"{where}.reference.{i}"
        counts[ref.control] = counts.get(ref.control, 0) + 1
        image_name, scale_name, field = REFERENCE_INPUTS[ref.control]
        image_input = reference_input(image_name, counts[ref.control])
        scale_input = reference_input(scale_name, counts[ref.control])
        exposed = engine.exposed_inputs.get(image_input)
        if exposed is None:
            takers = [n for n, controls in creator.controls().items() if ref.control in controls]
            nth = "" if counts[ref.control] == 1 else f" (reference {counts[ref.control]} of this control)"
            raise ConfigError(
                f"control '{ref.control}'{nth} feeds input '{image_input}', which pipeline '{pipeline}' does not "
                f"take; pipelines that take control '{ref.control}': {', '.join(takers) or 'none'}",
                path=f"{at}.control",
            )
        number = _episode(ref.episode, episodes, at)
        if number is None:
            if not exposed.optional:
                raise ConfigError(
                    f"the world has no episode yet, so no previous image, and pipeline '{pipeline}' cannot draw "
                    f"without its input '{image_input}'; for the first episode choose a pipeline that draws "
                    "without a reference",
                    path=f"{at}.episode",
                )
            uses.append(ReferenceUse(control=ref.control, image=ref.image, note=FIRST_EPISODE_NOTE))
            continue
        artifact = _artifact(storage, number, ref.image, at)
        inputs: dict[str, Any] = {image_input: artifact.path}
        value, scale = getattr(ref, field), engine.exposed_inputs.get(scale_input)
        if value is not None and scale is None:
            raise ConfigError(
                f"pipeline '{pipeline}' takes no input '{scale_input}' to set the {field} of control "
                f"'{ref.control}'; leave `{field}` out to use the pipeline's own",
                path=f"{at}.{field}",
            )
        if value is None and scale is not None and scale.optional:
            value = scale.default  # fed and recorded as it is, so the episode says how strong the control was
        if value is not None:
            inputs[scale_input] = value
        uses.append(
            ReferenceUse(
                control=ref.control,
                episode=number,
                image=ref.image,
                artifact=artifact.path,
                sha256=artifact.sha256,
                inputs=inputs,
            )
        )
    return uses


def reference_inputs(
    uses: list[ReferenceUse], storage: WorldStorage, *, width: int, height: int, where: str
) -> dict[str, Any]:
    """The pipeline inputs of planned references: each image read from the world's storage as an RGB tensor
    (1, 3, height, width) in [0, 1] — resized to block 2's size when it differs, so block 2's size holds for every
    control — and the scales as given."""
    out: dict[str, Any] = {}
    for i, use in enumerate(uses):
        for name, value in use.inputs.items():  # the image input is recorded as the artifact's path
            is_image = value == use.artifact
            out[name] = (
                read_image(storage, value, width, height, f"{where}.reference.{i}") if is_image else value
            )
    return out


def episode_image(storage: WorldStorage, episode: str | int | None, image: int, at: str) -> ArtifactRef:
    """The `image`-th image of an earlier episode ("previous" or a number), which must exist (`at` names the
    field that asked for it in errors)."""
    number = _episode(episode, storage.episodes(), at)
    if number is None:
        raise ConfigError(
            'the world has no episode yet, so no "previous" image; start from an image of this step',
            path=f"{at}.episode",
        )
    return _artifact(storage, number, image, at)


def _episode(episode: str | int | None, episodes: list[int], at: str) -> int | None:
    """The episode number `episode` means (None: "previous" before the first episode)."""
    if episode == "previous":
        return episodes[-1] if episodes else None
    if episode not in episodes:
        have = f"episodes {episodes[0]} to {episodes[-1]}" if episodes else "no episode yet"
        raise ConfigError(
            f"episode {episode} does not exist (the world has {have}); refer to an earlier episode of "
            'this world by number, or "previous"',
            path=f"{at}.episode",
        )
    return episode


def _artifact(storage: WorldStorage, number: int, index: int, at: str) -> Any:
    """The index-th image artifact of episode `number` (an ArtifactRef, its path inside the world)."""
    try:
        state, _ = storage.load_episode(number)
    except StorageError as err:
        raise ConfigError(f"episode {number} cannot be read: {err}", path=f"{at}.episode") from None
    images = [a for a in state.artifacts or [] if a.kind == "image"]
    if not images:
        raise ConfigError(f"episode {number} has no image to refer to", path=f"{at}.episode")
    if index >= len(images):
        raise ConfigError(
            f"episode {number} has {len(images)} image(s) (0 to {len(images) - 1}), not image {index}",
            path=f"{at}.image",
        )
    return images[index]


def read_image(storage: WorldStorage, path: str, width: int, height: int, at: str) -> Any:
    """An episode's image as a (1, 3, height, width) float tensor in [0, 1], read only through the storage."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    try:
        data = storage.read_artifact(path)
    except (FileNotFoundError, UnsafePathError) as err:
        raise ConfigError(
            f"the referenced image {path} cannot be read: {err}", path=f"{at}.episode"
        ) from None
    with Image.open(io.BytesIO(data)) as picture:
        picture = picture.convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BICUBIC)
        array = np.asarray(picture, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
