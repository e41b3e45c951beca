"""Opening an image a stranger sent: `open_upload` refuses empty, non-image, truncated, tiny
and decompression-bomb files with an `ImageError` whose message says what was wrong.

What a decoded upload then becomes is serving.preprocess's business, the same code the
training data goes through.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Decoders we trust with a stranger's bytes: the formats toolkit reads for training (JPEG
# covers multi-picture phone JPEGs too). Pillow can open more (EPS even shells out to
# Ghostscript), which a public upload box must not.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, TIFF, WebP or PPM"

# A 50-megapixel phone photo still fits; a header claiming more is refused before decoding.
MAX_PIXELS = 50_000_000
# Below this a picture holds too little for any class to mean anything.
MIN_SIDE = 8


class ImageError(ValueError):
    """An upload that cannot be classified; the message is meant for the person uploading."""


def open_upload(source: str | Path | bytes, name: str = "the upload") -> Image.Image:
    """Open and fully decode the first frame of an uploaded image, or raise ImageError.

    `source` is a file path or the file's bytes; `name` is how messages refer to it.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if not data:
        raise ImageError(f"{name} is empty (0 bytes); upload a {FORMAT_NAMES} image")
    try:
        # Pillow warns above its own pixel limit; we check our (lower) limit explicitly below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not a {FORMAT_NAMES} image") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (twice ours) fired while reading the header.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(_too_large(name, int(claimed.group(1)) if claimed else None)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name} is a damaged image ({_first_line(exc)})") from None
    _check_dimensions(image, name)
    return _decode_first_frame(image, name)


def _check_dimensions(image: Image.Image, name: str) -> None:
    """Refuse by header alone: a bomb must be stopped before its pixels are allocated."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(_too_large(name, width * height, f"{width}×{height} pixels, "))
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name} is only {width}×{height} pixels; a picture needs at least "
            f"{MIN_SIDE}×{MIN_SIDE} pixels to be classified"
        )


def _decode_first_frame(image: Image.Image, name: str) -> Image.Image:
    """Load pixel data now, so truncation is reported here rather than deep in resizing."""
    try:
        image.seek(0)  # an animation is classified by its first frame
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = _first_line(exc)
        if "truncated" in message.lower():
            raise ImageError(f"{name} is truncated ({message}); upload the whole file") from None
        raise ImageError(f"{name} is a damaged image ({message})") from None
    return image


def _too_large(name: str, pixels: int | None, dims: str = "") -> str:
    claimed = "far too many pixels" if pixels is None else f"{dims}{pixels / 1e6:,.0f} megapixels"
    return (
        f"{name} claims {claimed} (a decompression bomb?); the limit is "
        f"{MAX_PIXELS / 1e6:.0f} megapixels"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
