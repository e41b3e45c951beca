"""Decode one image file into an RGB uint8 array of a given square size.

The same rules serve training data and (mirrored in serving/) uploads: EXIF orientation, any
mode to RGB (16-bit scaled down, not clipped), centre-crop to a square, bilinear resize.
Grey, grey+alpha, palette, CMYK, RGBA and 16-bit (grey or RGB) files are all valid input.

A file that cannot be decoded (missing, empty, not an image, truncated, damaged) raises
`UnreadableImage`, which names the file and says why in a few words (`reason`), so the data
loader can list every bad file at once instead of stopping at the first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from toolkit.errors import ToolkitError, first_line

RESIZE_FILTER = Image.Resampling.BILINEAR
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


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
    w, h = image.size
    if w == h:
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> H×W×3 uint8 at `size`×`size`."""
    image = center_square(to_rgb(ImageOps.exif_transpose(image) or image))
    if image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTER)
    return np.asarray(image, dtype=np.uint8)


class UnreadableImage(ToolkitError):
    """An image file that cannot be decoded; `reason` says why without repeating the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read image '{path}': {reason}")
        self.path, self.reason = path, reason


def load_image(path: Path, size: int) -> np.ndarray:
    """Read a file -> H×W×3 uint8; any decoding problem is an UnreadableImage naming the file."""
    try:
        with Image.open(path) as image:
            image.seek(0)  # first frame of an animation
            return prepare(image, size)
    except Exception as exc:
        # Pillow's format plugins raise many types on malformed input (OSError and its
        # UnidentifiedImageError, SyntaxError, ValueError, EOFError, struct.error, ...): a data
        # file is input, never code, so whatever decoding it raises is that file's fault.
        raise UnreadableImage(path, failure_reason(path, exc)) from exc


def failure_reason(path: Path, exc: BaseException) -> str:
    """A few words on why `path` did not decode, for a list of bad files."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        # Pillow says the same for an empty file and for text renamed .png; the user's fix differs.
        if _size(path) == 0:
            return "empty file (0 bytes)"
        return "not an image (no format Pillow reads; a renamed or non-image file?)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({first_line(exc)})"
    text = first_line(exc)
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"damaged image ({type(exc).__name__}: {text})"


def _size(path: Path) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None
