"""How an image becomes what a model sees: the one copy, used by training and serving alike.

EXIF orientation, any mode to RGB (16-bit scaled down rather than clipped, alpha composited
on white), centre-crop to the model's shape (a square, or its width:height), then a resize:
PIL bilinear of the whole crop by default, or what a pretrained model's weights were trained
with (timm's interpolation, and its crop_pct as the centred share of the crop that is kept).
toolkit.data decodes training images with `prepare`, and serving/ decodes uploads with it;
the ONNX export writes `Resize.rules()` into every model's metadata and the server reads them
back with `Resize.from_rules`, refusing rules it does not implement, so training and serving
cannot drift apart.

Torch-free on purpose: the serving image has only Pillow and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# The resize filters a model may ask for, by the names timm's pretrained configs use.
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# The rules every model's metadata carries ("preprocessing"); the crop is "center-square"
# for a square model, "center-aspect" (the largest centred crop of its width:height) else.
PREPROCESSING = {"color": "RGB", "scale": "0..1", "resize": "bilinear", "crop": "center-square"}


@dataclass(frozen=True)
class Resize:
    """How an image is brought to a model's input size."""

    size: tuple[int, int]  # (height, width)
    interpolation: str = "bilinear"
    # The centred share of each side of the crop that is kept before resizing: timm's
    # crop_pct (0.875 for most ImageNet weights: resize to size / 0.875, centre-crop size).
    crop_fraction: float = 1.0

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation '{self.interpolation}' is not one of {', '.join(INTERPOLATIONS)}"
            )
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop fraction {self.crop_fraction} is not in (0, 1]")

    def rules(self) -> dict:
        """The rules as metadata records them; a model with the defaults records exactly
        what every model before pretrained preprocessing did."""
        height, width = self.size
        rules = {
            **PREPROCESSING,
            "resize": self.interpolation,
            "crop": "center-square" if height == width else "center-aspect",
        }
        if self.crop_fraction != 1.0:
            rules["crop_fraction"] = self.crop_fraction
        return rules

    @classmethod
    def from_rules(cls, size: tuple[int, int], rules: dict) -> Resize:
        """The Resize a model's metadata asks for; ValueError names a rule not implemented."""
        if not isinstance(rules, dict):
            raise ValueError(f"preprocessing {rules!r} is not a set of rules")
        resize = cls(
            tuple(size), rules.get("resize", "bilinear"), float(rules.get("crop_fraction", 1.0))
        )
        if rules != resize.rules():
            raise ValueError(
                f"preprocessing {rules} is not what this code implements for a "
                f"{size[1]}x{size[0]} input ({resize.rules()})"
            )
        return resize


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


def center_crop(image: Image.Image, aspect: float = 1.0, fraction: float = 1.0) -> Image.Image:
    """The centred `fraction` of each side of the largest centred crop of width / height
    `aspect` (a square, whole, by default)."""
    w, h = image.size
    crop_w, crop_h = min(w, round(h * aspect)), min(h, round(w / aspect))
    if fraction != 1.0:
        crop_w, crop_h = max(1, round(crop_w * fraction)), max(1, round(crop_h * fraction))
    if (crop_w, crop_h) == (w, h):
        return image
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def prepare(image: Image.Image, size: int | tuple[int, int] | Resize) -> np.ndarray:
    """PIL image -> H×W×3 uint8 at `size` (a side, (height, width), or a Resize)."""
    if not isinstance(size, Resize):
        size = Resize((size, size) if isinstance(size, int) else tuple(size))
    height, width = size.size
    image = to_rgb(ImageOps.exif_transpose(image) or image)
    image = center_crop(image, width / height, size.crop_fraction)
    if image.size != (width, height):
        image = image.resize((width, height), INTERPOLATIONS[size.interpolation])
    return np.asarray(image, dtype=np.uint8)
