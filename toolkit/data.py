"""Datasets: specs, the three kinds of source, a decode-once tensor cache, the val carve.

    DatasetSpec --source--> uint8 N×C×H×W tensors (cached on disk) --carve--> train/val/test

Sources, all real:
- download: torchvision's archive of the official files into the data root, read by our own
  readers (CIFAR-10 python batches, STL-10 binaries), so synthetic files in those formats
  are read exactly like the real ones;
- image folder (`--data-dir`): train/ and test/ (optional val/) with one sub-folder per class;
- split files (`--splits`): train.txt / val.txt / test.txt, lines `relative/path label`.

mean/std are computed from the source's training split and stored with the cache; nothing
here (or anywhere) pastes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import ToolkitError
from toolkit.images import IMAGE_SUFFIXES, load_image, prepare
from toolkit.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 2
DATA_ENV = "TOOLKIT_DATA"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    native_size: int
    default_size: int
    channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        native_size=32,
        default_size=32,
    ),
    # The reference trained on STL-10 resized to 32×32; 96 (native) is allowed too.
    "stl10": DatasetSpec(
        "stl10",
        ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
        native_size=96,
        default_size=32,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ToolkitError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class Split:
    images: torch.Tensor  # uint8 N×C×H×W
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    """What training and evaluation consume: tensors plus the facts that describe them."""

    spec: DatasetSpec
    image_size: int
    train: Split
    val: Split
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict  # how to load this again: {"kind", "path", ...}
    fingerprint: str
    val_is_carved: bool

    def info(self) -> dict:
        """The dataset facts stored in checkpoints and, later, in ONNX metadata."""
        return {
            "name": self.spec.name,
            "classes": list(self.spec.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
            "source": self.source,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from and how it is split; stored in config.json."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    splits: str | None = None
    data_root: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.1
    download: bool = True


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "toolkit")


# --- readers for the official on-disk formats ------------------------------------------------


def read_cifar10_batches(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py: pickled dicts with b'data' (N×3072 uint8, CHW rows) and b'labels'."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = {}
    for split, files in names.items():
        images, labels = [], []
        for name in files:
            path = folder / name
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                batch_labels = np.asarray(batch["labels"], dtype=np.int64)
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise ToolkitError(f"'{path}' is not a CIFAR-10 python batch ({exc})") from exc
            if len(data) != len(batch_labels):
                raise ToolkitError(f"'{path}': {len(data)} images but {len(batch_labels)} labels")
            images.append(data)
            labels.append(batch_labels)
        out[split] = (np.concatenate(images), np.concatenate(labels))
    return out


STL10_SIDE = 96


def read_stl10_binary(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stl10_binary: {split}_X.bin uint8 N×3×96×96 column-major, {split}_y.bin labels 1..10."""
    per_image = 3 * STL10_SIDE * STL10_SIDE
    out = {}
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        raw = np.fromfile(x_path, dtype=np.uint8)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if raw.size % per_image:
            raise ToolkitError(
                f"'{x_path}' is {raw.size} bytes, not a whole number of 3×96×96 images"
            )
        images = raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2)  # col-major
        if len(images) != len(labels):
            raise ToolkitError(
                f"'{x_path}' has {len(images)} images but '{y_path}' has {len(labels)} labels"
            )
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise ToolkitError(f"'{y_path}': labels must be 1..10")
        out[split] = (np.ascontiguousarray(images), labels - 1)
    return out


DOWNLOADS = {
    # folder inside the data root, reader, torchvision dataset class holding url/filename/md5
    "cifar10": ("cifar-10-batches-py", read_cifar10_batches, "CIFAR10"),
    "stl10": ("stl10_binary", read_stl10_binary, "STL10"),
}


def download_official(spec: DatasetSpec, root: Path) -> None:
    """Fetch and unpack the official archive with torchvision's checked downloader."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(tvd, DOWNLOADS[spec.name][2])
    log.info("downloading %s into %s", spec.name, root)
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # no network, proxy, disk full...
        raise ToolkitError(
            f"could not download {spec.name} into '{root}' ({type(exc).__name__}: {exc}). "
            f"Connect to the internet and retry, or pass --data-dir DIR (train/ and test/ "
            f"folders with one sub-folder per class) or --splits DIR (train.txt, test.txt)"
        ) from exc


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """N×C×H×W uint8 -> N×C×size×size with the same PIL rules as image files."""
    from PIL import Image

    if images.shape[-1] == size:
        return images
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for i, chw in enumerate(images):
        out[i] = prepare(Image.fromarray(chw.transpose(1, 2, 0)), size).transpose(2, 0, 1)
    return out


# --- image folders and split files ------------------------------------------------------------


def _decode_files(paths: list[Path], size: int, what: str) -> np.ndarray:
    """Decode many files in parallel threads (PIL releases the GIL while decoding)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    chunk = 512
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress_bar(len(paths), f"decoding {what}") as bar,
    ):
        for start in range(0, len(paths), chunk):
            block = paths[start : start + chunk]
            for i, array in enumerate(pool.map(lambda p: load_image(p, size), block)):
                out[start + i] = array.transpose(2, 0, 1)
            bar.advance(len(block))
    return out


def list_image_folder(split_dir: Path, spec: DatasetSpec) -> tuple[list[Path], np.ndarray]:
    """<split_dir>/<class>/<image>: class folders must be the spec's classes."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = sorted(set(found) - set(spec.classes))
    if unknown or not found:
        raise ToolkitError(
            f"'{split_dir}' should hold one folder per {spec.name} class "
            f"({', '.join(spec.classes)}); found: {', '.join(found) or 'none'}"
        )
    paths, labels = [], []
    for label, name in enumerate(spec.classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ToolkitError(f"no images found under '{split_dir}'")
    return paths, np.asarray(labels, dtype=np.int64)


def read_split_file(path: Path, num_classes: int) -> tuple[list[Path], list[int], list[int]]:
    """`relative/path label` per line (paths relative to the file's folder).

    Returns paths, raw labels and line numbers; blank lines and CRLF endings are fine.
    """
    paths, labels, lines = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ToolkitError(f"{path}:{number}: expected 'relative/path label', got '{line}'")
        paths.append(path.parent / parts[0])
        labels.append(int(parts[1]))
        lines.append(number)
    if not paths:
        raise ToolkitError(f"'{path}' lists no images")
    return paths, labels, lines


def _split_file_labels(files: dict[str, tuple], num_classes: int) -> dict[str, np.ndarray]:
    """Labels 1..K (the STL-10 reference) or 0..K-1, decided once over all split files:
    no label 0 anywhere means 1-based."""
    one_based = min(label for _, labels, _ in files.values() for label in labels) >= 1
    out = {}
    for split, (_, labels, lines) in files.items():
        shifted = np.asarray(labels, dtype=np.int64) - (1 if one_based else 0)
        bad = np.flatnonzero((shifted < 0) | (shifted >= num_classes))
        if bad.size:
            i = bad[0]
            raise ToolkitError(
                f"{split}.txt:{lines[i]}: label {labels[i]} is outside "
                f"{'1..' + str(num_classes) if one_based else '0..' + str(num_classes - 1)}"
            )
        out[split] = shifted
    return out


# --- the cache -------------------------------------------------------------------------------


def _listing_key(files: list[Path]) -> str:
    """Cheap change detector for the cache: names, sizes, modification times."""
    digest = hashlib.sha1()
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise ToolkitError(f"image '{path}' listed but missing") from exc
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_fingerprint(tensors: dict) -> str:
    """SHA-1 of the decoded pixels and labels of every split: the data's identity.

    Unlike file names or timestamps it survives copying or moving the data, and changes
    whenever a pixel or a label does.
    """
    digest = hashlib.sha1()
    for split in sorted(k for k in tensors if k in ("train", "val", "test")):
        images, labels = tensors[split]
        digest.update(split.encode())
        digest.update(images.contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_or_build(cache_file: Path, build) -> dict:
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            if cached.get("cache_version") == CACHE_VERSION:
                log.info("loaded decoded tensors from cache %s", cache_file)
                return cached
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s (%s)", cache_file, exc)
    built = build()
    built["content_sha1"] = content_fingerprint(built)
    train = built["train"][0].float().div_(255)
    built["mean"] = train.mean(dim=(0, 2, 3)).tolist()
    built["std"] = train.std(dim=(0, 2, 3)).tolist()
    built["cache_version"] = CACHE_VERSION
    try:
        from toolkit.runs import atomic_torch_save

        atomic_torch_save(cache_file, built)
    except OSError as exc:  # a read-only cache folder only costs time
        log.warning("could not write cache %s (%s)", cache_file, exc)
    return built


def _as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def _source_for(options: DataOptions, spec: DatasetSpec) -> tuple[dict, Path]:
    """Describe the source and where its cache lives."""
    root = Path(options.data_root) if options.data_root else default_data_root()
    if options.data_dir and options.splits:
        raise ToolkitError("pass either --data-dir or --splits, not both")
    if options.data_dir:
        return {"kind": "folder", "path": str(Path(options.data_dir).resolve())}, root
    if options.splits:
        return {"kind": "splits", "path": str(Path(options.splits).resolve())}, root
    return {"kind": "official", "path": str((root / DOWNLOADS[spec.name][0]).resolve())}, root


def _build_official(spec: DatasetSpec, root: Path, size: int, download: bool):
    folder_name, reader, _ = DOWNLOADS[spec.name]
    folder = root / folder_name
    if not folder.is_dir():
        if not download:
            raise ToolkitError(
                f"{spec.name} not found in '{root}'. Run without --no-download to fetch it, "
                f"or pass --data-dir DIR / --splits DIR"
            )
        download_official(spec, root)
    try:
        arrays = reader(folder)
    except FileNotFoundError as exc:
        raise ToolkitError(
            f"{spec.name} files incomplete in '{folder}': {exc.filename} is "
            "missing; delete the folder to download again"
        ) from exc
    files = sorted(p for p in folder.iterdir() if p.is_file())
    listing = _listing_key(files)
    return listing, lambda: {
        split: _as_tensors(resize_array(x, size), y) for split, (x, y) in arrays.items()
    }


def _build_folder(spec: DatasetSpec, root: Path, size: int):
    if not root.is_dir():
        raise ToolkitError(f"data folder '{root}' does not exist")
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" not in splits:
        raise ToolkitError(
            f"'{root}' has no train/ folder; expected train/<class>/*.png and test/<class>/..."
        )
    listed = {s: list_image_folder(d, spec) for s, d in splits.items()}
    listing = _listing_key([p for paths, _ in listed.values() for p in paths])
    return listing, lambda: {
        s: _as_tensors(_decode_files(paths, size, f"{s} images"), labels)
        for s, (paths, labels) in listed.items()
    }


def _build_splits(spec: DatasetSpec, root: Path, size: int):
    files = {
        s: root / f"{s}.txt" for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()
    }
    if "train" not in files:
        raise ToolkitError(f"'{root}' has no train.txt (lines 'relative/path label')")
    parsed = {s: read_split_file(p, spec.num_classes) for s, p in files.items()}
    labels = _split_file_labels(parsed, spec.num_classes)
    listing = _listing_key([p for paths, _, _ in parsed.values() for p in paths])
    return listing, lambda: {
        s: _as_tensors(_decode_files(paths, size, f"{s} images"), labels[s])
        for s, (paths, _, _) in parsed.items()
    }


def carve_val(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of train indices into (train, val)."""
    if not 0.0 < fraction < 1.0:
        raise ToolkitError(f"--val-fraction must be between 0 and 1, got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def load_data(options: DataOptions, seed: int = 0) -> DataBundle:
    """Resolve the source, decode (or read the cache), carve val when the source has none."""
    spec = get_spec(options.dataset)
    size = options.image_size or spec.default_size
    if size < 8:
        raise ToolkitError(f"--image-size must be at least 8, got {size}")
    source, data_root = _source_for(options, spec)
    path = Path(source["path"])
    if source["kind"] == "folder":
        listing, build = _build_folder(spec, path, size)
    elif source["kind"] == "splits":
        if not path.is_dir():
            raise ToolkitError(f"split folder '{path}' does not exist")
        listing, build = _build_splits(spec, path, size)
    else:
        listing, build = _build_official(spec, data_root, size, options.download)

    key = hashlib.sha1(
        f"{CACHE_VERSION}|{spec.name}|{source}|{size}|{listing}".encode()
    ).hexdigest()[:16]
    cache_file = data_root / "cache" / f"{spec.name}-{source['kind']}-{size}px-{key}.pt"
    tensors = _load_or_build(cache_file, build)

    train_images, train_labels = tensors["train"]
    if "val" in tensors:
        val = Split(*tensors["val"])
        train = Split(train_images, train_labels)
        carved = False
    else:
        tr, va = carve_val(train_labels, options.val_fraction, seed)
        train = Split(train_images[tr], train_labels[tr])
        val = Split(train_images[va], train_labels[va])
        carved = True
    test = Split(*tensors["test"]) if "test" in tensors else None
    return DataBundle(
        spec=spec,
        image_size=size,
        train=train,
        val=val,
        test=test,
        mean=tuple(tensors["mean"]),
        std=tuple(tensors["std"]),
        source=source,
        fingerprint=tensors["content_sha1"],
        val_is_carved=carved,
    )
