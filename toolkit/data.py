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

Bad data (`DataOptions.bad_files`, `--bad-files fail|skip`): an image that does not decode
(missing, empty, not an image, truncated, damaged), an entry of a class folder that is not an
image file (README.txt, a sub-folder), and a split-file line that cannot be used (no label, a
label that is not an integer or is out of range) are *bad files*, each reported as `path: why`
or `split.txt:line: why`. All of them are collected in one pass; "fail" (the default) then
stops with one error listing them, "skip" leaves them out with a warning and records them in
the bundle (`DataBundle.skipped`, and in `info()`). Hidden files (.DS_Store, ._name) and
Thumbs.db / desktop.ini are neither read nor reported (SYSTEM_FILES). Grey, RGBA, palette,
CMYK and 16-bit images are not bad: they convert to RGB.
Whatever makes a whole source unreadable is always an error: an official binary or batch of
the wrong size, a split file that is not UTF-8 text, labels that mix 0..K-1 and 1..K.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import ToolkitError
from toolkit.formats import read_cifar10_batches, read_stl10_binary
from toolkit.images import UnreadableImage, load_image, prepare
from toolkit.listing import Listed, label_base, parse_split_file, scan_image_folder, split_listing
from toolkit.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 2
DATA_ENV = "TOOLKIT_DATA"
BAD_FILE_POLICIES = ("fail", "skip")
SKIPPED_IN_INFO = 100  # bad files named in DataBundle.info(); all of them are counted
BAD_FILES_SHOWN = 5  # bad files named in an error or warning; all of them are counted


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
    skipped: tuple[str, ...] = ()  # bad files left out under --bad-files skip: 'where: why'

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
            # Capped: every checkpoint carries this, and the count says how much is missing.
            "skipped_count": len(self.skipped),
            "skipped_files": list(self.skipped[:SKIPPED_IN_INFO]),
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
    # "fail": stop with one error listing every bad file; "skip": leave them out, warn, and
    # record them in the run. See the module docstring for what counts as a bad file.
    bad_files: str = "fail"

    def __post_init__(self):
        if self.bad_files not in BAD_FILE_POLICIES:
            raise ToolkitError(
                f"--bad-files must be {' or '.join(BAD_FILE_POLICIES)}, got '{self.bad_files}'"
            )


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "toolkit")


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


# --- decoding image files ---------------------------------------------------------------------


def _decode_one(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(path, size), None
    except UnreadableImage as exc:
        return None, exc.reason


def _decode_files(paths: list[Path], size: int, what: str) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many files in parallel threads (PIL releases the GIL while decoding).

    Returns the images that decoded, in order, and {index: why} for the files that did not:
    one pass finds every bad file.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    failures: dict[int, str] = {}
    chunk = 512
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress_bar(len(paths), f"decoding {what}") as bar,
    ):
        for start in range(0, len(paths), chunk):
            block = paths[start : start + chunk]
            for i, (array, why) in enumerate(pool.map(lambda p: _decode_one(p, size), block)):
                if why is None:
                    out[start + i] = array.transpose(2, 0, 1)
                else:
                    failures[start + i] = why
            bar.advance(len(block))
    if failures:
        out = np.delete(out, list(failures), axis=0)
    return out, failures


def _decode_listed(listed: dict[str, Listed], size: int) -> dict:
    """Decode every split; the result also holds every bad file found, as 'where: why'."""
    out, bad = {}, []
    for split, entry in listed.items():
        images, failures = _decode_files(entry.paths, size, f"{split} images")
        labels = np.delete(entry.labels, list(failures))
        bad += entry.bad + [entry.failure(i, why) for i, why in failures.items()]
        if not len(labels):
            raise ToolkitError(
                f"no usable images left in the {split} split; {_bad_summary(sorted(bad))}"
            )
        out[split] = _as_tensors(images, labels)
    out["bad_files"] = [str(b) for b in sorted(bad)]
    return out


def _bad_summary(bad: list) -> str:
    """'N bad files: first; second; ...; and M more' — the count and the first few."""
    shown = "; ".join(str(b) for b in bad[:BAD_FILES_SHOWN])
    more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    return f"{len(bad)} bad file{'' if len(bad) == 1 else 's'}: {shown}{more}"


def _apply_bad_file_policy(bad: list[str], policy: str) -> None:
    """'fail' stops on any bad file; 'skip' has already left them out and says so."""
    if not bad:
        return
    if policy == "fail":
        raise ToolkitError(
            f"{_bad_summary(bad)}. Fix or remove them, or pass --bad-files skip to leave them out"
        )
    log.warning("--bad-files skip: left out %s", _bad_summary(bad))


# --- the cache -------------------------------------------------------------------------------


def _listing_key(files: list[Path]) -> str:
    """Cheap change detector for the cache: names, sizes, modification times.

    Bad files are part of the listing too (a missing one as 'missing'), so fixing, adding or
    removing one rebuilds the cache instead of replaying its old verdict.
    """
    digest = hashlib.sha1()
    for path in files:
        try:
            st = path.stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\n".encode())
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
        from toolkit.atomic import atomic_torch_save

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
    listed = {s: scan_image_folder(d, spec) for s, d in splits.items()}
    images = [p for entry in listed.values() for p in entry.paths]
    others = [Path(b.file) for entry in listed.values() for b in entry.bad]
    return _listing_key(images + others), lambda: _decode_listed(listed, size)


def _build_splits(spec: DatasetSpec, root: Path, size: int):
    files = {
        s: root / f"{s}.txt" for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()
    }
    if "train" not in files:
        raise ToolkitError(f"'{root}' has no train.txt (lines 'relative/path label')")
    parsed = {s: parse_split_file(p) for s, p in files.items()}
    base = label_base(parsed, spec.num_classes)
    listed = {s: split_listing(f, base, spec.num_classes) for s, f in parsed.items()}
    # The split files themselves are watched too: a fixed label must rebuild the cache.
    images = [p for entry in listed.values() for p in entry.paths]
    return _listing_key(list(files.values()) + images), lambda: _decode_listed(listed, size)


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

    # The bad-file policy is not part of the key: a cache holds the images that decoded *and*
    # the list of bad files, so "fail" and "skip" read the same entry and each applies its own
    # rule (and the `--bad-files skip` rerun that a failure suggests starts from the cache).
    key = hashlib.sha1(
        f"{CACHE_VERSION}|{spec.name}|{source}|{size}|{listing}".encode()
    ).hexdigest()[:16]
    cache_file = data_root / "cache" / f"{spec.name}-{source['kind']}-{size}px-{key}.pt"
    tensors = _load_or_build(cache_file, build)
    # Caches from before bad files were recorded hold none: they were only written when
    # every listed file decoded.
    bad = list(tensors.get("bad_files", []))
    _apply_bad_file_policy(bad, options.bad_files)

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
        skipped=tuple(bad),
    )
