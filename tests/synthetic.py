"""Small datasets written in the real on-disk formats, learnable by a tiny model.

Each class gets its own colour and stripe direction plus noise, so a few epochs of `net`
separate them far above chance: tests can assert on accuracy without real data.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)


def class_images(label: int, count: int, size: int, seed: int) -> np.ndarray:
    """count×size×size×3 uint8 images whose look depends on `label`."""
    rng = np.random.default_rng(seed * 1000 + label)
    hue = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256])
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx if label % 2 else yy) // max(1, size // (4 + label % 3))) % 2
    base = hue[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    noise = rng.normal(0, 18, (count, size, size, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def write_image_folder(
    root: Path, classes=CIFAR_CLASSES, per_class=None, size: int = 32, suffix: str = ".png"
) -> Path:
    """root/{train,test}/<class>/NNNN.png — the layout of ../shared/data/cifar10."""
    per_class = per_class or {"train": 30, "test": 10}
    for s, (split, count) in enumerate(per_class.items()):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(class_images(label, count, size, seed=s)):
                Image.fromarray(array).save(folder / f"{i:04d}{suffix}")
    return root


def write_cifar10_batches(root: Path, per_batch: int = 20, test: int = 40) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch}, pickled like the original."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        count = test if name == "test_batch" else per_batch
        labels = [i % 10 for i in range(count)]
        images = np.stack(
            [class_images(lbl, 1, 32, seed * 100 + i)[0] for i, lbl in enumerate(labels)]
        )
        data = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # rows are R, G, B planes
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "batch_label": name,
                    "labels": labels,
                    "data": data,
                    "filenames": [f"{i}.png" for i in range(count)],
                },
                f,
            )
    return root


def write_stl10_binary(root: Path, train: int = 40, test: int = 20) -> Path:
    """root/stl10_binary/{train,test}_{X,y}.bin: uint8 N×3×96×96 column-major, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = np.array([i % 10 for i in range(count)], dtype=np.uint8)
        images = np.stack([class_images(int(lbl), 1, 96, i)[0] for i, lbl in enumerate(labels)])
        # HWC -> CHW, then column-major within each plane (the file stores W-major planes).
        chw = images.transpose(0, 3, 1, 2)
        chw.transpose(0, 1, 3, 2).astype(np.uint8).tofile(folder / f"{split}_X.bin")
        (labels + 1).tofile(folder / f"{split}_y.bin")
    return root


def write_split_files(
    root: Path, classes=STL10_CLASSES, per_class=None, size: int = 96, one_based: bool = True
) -> Path:
    """root/images/<split>/<class>_<i>.png plus root/{train,val,test}.txt ('path label')."""
    per_class = per_class or {"train": 12, "val": 4, "test": 4}
    for s, (split, count) in enumerate(per_class.items()):
        lines = []
        for label, name in enumerate(classes):
            folder = root / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(class_images(label, count, size, seed=s)):
                rel = f"images/{split}/{name}_{i}.png"
                Image.fromarray(array).save(root / rel)
                lines.append(f"{rel} {label + 1 if one_based else label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte: H×W (grey), H×W×2 (grey+alpha), H×W×3 (RGB) or
    H×W×4 (RGBA) uint16. Pillow writes 16-bit grey but not 16-bit colour, which cameras and
    scanners do produce."""
    array = np.asarray(array, dtype=np.uint16)
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.reshape(height, width * channels).astype(">u2")  # PNG samples are big-endian
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path
