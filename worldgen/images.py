"""Image tensors to PIL images and PNG files (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldgen.storage_io import atomic_write


def png_bytes(picture: Any) -> bytes:
    """A PIL image encoded as PNG."""
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def to_pil(image: Any) -> list[Any]:
    """A (B, C, H, W) or (C, H, W) tensor or array in [0, 1] (C = 1, 3 or 4) -> one PIL image per batch item."""
    import numpy as np
    from PIL import Image

    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().to("cpu").float().numpy()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image tensor of shape (B, C, H, W) with C in 1, 3, 4; got {array.shape}"
        )
    array = np.nan_to_num(array, nan=0.0).clip(0.0, 1.0)
    array = (array * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)  # -> (B, H, W, C)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return [Image.fromarray(a[..., 0] if mode == "L" else a, mode=mode) for a in array]


def save_png(image: Any, directory: str | Path, stem: str) -> list[Path]:
    """Write each image of a batch as `<stem>.png` (one image) or `<stem>_<i>.png` (several); returns the paths."""
    directory = Path(directory)
    pictures = to_pil(image)
    paths = []
    for i, picture in enumerate(pictures):
        name = f"{stem}.png" if len(pictures) == 1 else f"{stem}_{i}.png"
        paths.append(atomic_write(directory / name, lambda tmp, p=picture: p.save(tmp, format="PNG")))
    return paths
