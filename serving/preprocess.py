"""How an image becomes what a model sees: the one copy, used by training and serving alike.

EXIF orientation, any mode to RGB (16-bit scaled down rather than clipped, alpha composited
on white), centre-crop to the model's shape (a square, or its width:height), PIL bilinear
resize. toolkit.data decodes training images with `prepare`, and serving/ decodes uploads
with it; the ONNX export writes `preprocessing_rules(size)` into every model's metadata and
the server refuses a model that asks for other rules, so training and serving cannot drift
apart.

Torch-free on purpose: the serving image has only Pillow and numpy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RESIZE_FILTER = Image.Resampling.BILINEAR
# The rules above, as written into each exported square model's metadata ("preprocessing").
PREPROCESSING = {"color": "RGB", "scale": "0..1", "resize": "bilinear", "crop": "center-square"}


def preprocessing_rules(size: tuple[int, int]) -> dict[str, str]:
    """The rules for a model taking (height, width) images: a square model's crop is the
    centred square (as every model before non-square sizes), another's the largest centred
    crop of its width:height."""
    height, width = size
    return {**PREPROCESSING, "crop": "center-square" if height == width else "center-aspect"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit greys are rescaled to 8 bits instead of clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: a transparent background is not "black" to a person.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def center_crop(image: Image.Image, aspect: float = 1.0) -> Image.Image:
    """The largest centred crop of width / height `aspect` (a square by default)."""
    w, h = image.size
    crop_w, crop_h = min(w, round(h * aspect)), min(h, round(w / aspect))
    if (crop_w, crop_h) == (w, h):
        return image
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def prepare(image: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """PIL image -> H×W×3 uint8 at `size` (a side, or (height, width))."""
    height, width = (size, size) if isinstance(size, int) else size
    image = center_crop(to_rgb(ImageOps.exif_transpose(image) or image), width / height)
    if image.size != (width, height):
        image = image.resize((width, height), RESIZE_FILTER)
    return np.asarray(image, dtype=np.uint8)
