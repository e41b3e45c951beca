"""How an image becomes what a model sees: the one copy, used by training and serving alike.

EXIF orientation, any mode to RGB (16-bit scaled down rather than clipped, alpha composited
on white), centre-crop to a square, PIL bilinear resize. toolkit.data decodes training images
with `prepare`, and serving/ decodes uploads with it; the ONNX export writes PREPROCESSING
into every model's metadata and the server refuses a model that asks for other rules, so
training and serving cannot drift apart.

Torch-free on purpose: the serving image has only Pillow and numpy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RESIZE_FILTER = Image.Resampling.BILINEAR
# The rules above, as written into each exported model's metadata ("preprocessing").
PREPROCESSING = {"color": "RGB", "scale": "0..1", "resize": "bilinear", "crop": "center-square"}


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


def center_square(image: Image.Image) -> Image.Image:
    """The largest centred square (models are trained on square images)."""
    w, h = image.size
    if w == h:
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare(image: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """PIL image -> H×W×3 uint8 at `size` (a side, or (height, width))."""
    height, width = (size, size) if isinstance(size, int) else size
    image = center_square(to_rgb(ImageOps.exif_transpose(image) or image))
    if image.size != (width, height):
        image = image.resize((width, height), RESIZE_FILTER)
    return np.asarray(image, dtype=np.uint8)
