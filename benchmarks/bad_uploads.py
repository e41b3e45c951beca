"""Broken and hostile uploads, as bytes, with the error the app must answer each one with.

Shared by the load benchmark (benchmarks/load_test.py) and the tests (tests/served.py
re-exports the builders): benchmarks never import from tests/, so the builders live here.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

# 8000×7000 = 56 megapixels: over serving's 50-megapixel limit but under Pillow's own
# (89 MP), so only serving's check stands between this file and a 168 MB RGB array.
BOMB_SIZE = (8000, 7000)


@dataclass(frozen=True)
class BadUpload:
    """One kind of bad upload: the file name it travels under, its bytes, and a regex the
    server's error message must match (proof it was refused for the right reason)."""

    filename: str
    data: bytes
    error: str


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header (with a correct CRC) claims width×height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def truncated(fmt: str) -> bytes:
    """The first half of a 64×64 noise image in `fmt` (noise, so it does not compress away)."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def real_bomb(size: tuple[int, int] = BOMB_SIZE) -> bytes:
    """A complete, valid 1-bit PNG: about 7 KB on disk, `size` pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def one_pixel_png() -> bytes:
    """A genuine 1×1 PNG (not a forged header): valid, but too small to classify."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def oversized(max_bytes: int) -> bytes:
    """Random bytes just over `max_bytes`, PNG-named: the cap must stop it, not the decoder."""
    return np.random.default_rng(1).bytes(max_bytes + 1000)


def bad_uploads() -> dict[str, BadUpload]:
    """Every bad upload the app must refuse with its own message, keyed by kind."""
    return {
        "empty": BadUpload("empty.png", b"", r"is empty \(0 bytes\)"),
        "text-as-png": BadUpload(
            "notes.png", b"just some text, renamed\n", r"is not a PNG, JPEG, GIF"
        ),
        "truncated-png": BadUpload("cut.png", truncated("PNG"), r"is (truncated|a damaged)"),
        "bomb-header": BadUpload(
            "bomb.png", png_claiming(100_000, 100_000), r"claims 10,000 megapixels"
        ),
        "bomb-real": BadUpload("bomb56mp.png", real_bomb(), r"claims 8000×7000 pixels"),
        "1x1": BadUpload("dot.png", one_pixel_png(), r"is only 1×1 pixels"),
    }
