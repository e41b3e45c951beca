"""Loading a dataset: the three kinds of source, the decode-once cache, test and val carves.

    DataOptions --source--> uint8 N×C×H×W tensors (cached on disk) --carve--> DataBundle

Sources, all real:
- download: torchvision's archive of the official files into the data root, read by our own
  readers (CIFAR-10 python batches, STL-10 binaries), so synthetic files in those formats
  are read exactly like the real ones;
- image folder (`--data-dir`): train/ (optional val/, test/) with one sub-folder per class,
  any names: exactly CIFAR-10's or STL-10's keep that dataset and its class order, others
  make a dataset of their own, classes sorted (toolkit.data.specs.spec_for_classes);
- split files (`--splits`): train.txt (optional val.txt, test.txt), lines `relative/path
  label`, the labels naming classes.txt's lines (else --dataset's classes).

A source without test or val has them carved from train (toolkit.data.carve), said loudly and
recorded in the bundle. Images past the memory budget are decoded into memory-mapped files
(toolkit.data.mapped).

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

import logging
import os
from pathlib import Path

import numpy as np
import torch

from serving.preprocess import Resize
from toolkit.data import cache
from toolkit.data.carve import TEST_SEED, carve, check_enough_per_class
from toolkit.data.decode import (
    Allocate,
    apply_bad_file_policy,
    as_tensors,
    decode_listed,
    in_memory,
    resize_array,
)
from toolkit.data.formats import read_cifar10_batches, read_stl10_binary
from toolkit.data.listing import (
    class_folders,
    label_base,
    parse_split_file,
    read_class_names,
    scan_image_folder,
    split_listing,
)
from toolkit.data.mapped import decoded_bytes, memory_budget_bytes, take
from toolkit.data.specs import (
    DataBundle,
    DataOptions,
    DatasetSpec,
    Split,
    get_spec,
    parse_size,
    recorded_size,
    size_label,
    spec_for_classes,
)
from toolkit.errors import ToolkitError
from toolkit.network import stall_timeout, unreachable

log = logging.getLogger(__name__)

DATA_ENV = "TOOLKIT_DATA"


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
    instead = (
        "Connect to the internet and retry, or pass --data-dir DIR (train/, optional val/ and "
        "test/, one sub-folder per class) or --splits DIR (train.txt, ...)"
    )
    problem = unreachable(cls.url)
    if problem:
        raise ToolkitError(f"could not download {spec.name}: cannot reach {problem}. {instead}")
    log.info("downloading %s from %s into %s", spec.name, cls.url, root)
    try:
        with stall_timeout():
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # a dropped connection, a stall, a proxy, a full disk...
        raise ToolkitError(
            f"could not download {spec.name} into '{root}' ({type(exc).__name__}: {exc}). {instead}"
        ) from exc


def _source_for(options: DataOptions) -> tuple[dict, Path]:
    """Describe the source and where its cache lives."""
    root = Path(options.data_root) if options.data_root else default_data_root()
    if options.data_dir and options.splits:
        raise ToolkitError("pass either --data-dir or --splits, not both")
    if options.data_dir:
        return {"kind": "folder", "path": str(Path(options.data_dir).resolve())}, root
    if options.splits:
        return {"kind": "splits", "path": str(Path(options.splits).resolve())}, root
    folder = DOWNLOADS[get_spec(options.dataset).name][0]
    return {"kind": "official", "path": str((root / folder).resolve())}, root


def _dataset_of(options: DataOptions, kind: str, path: Path) -> DatasetSpec:
    """An image folder's classes are its train/ folders; split files' are their classes.txt,
    else --dataset's; the official files are --dataset."""
    if kind == "folder":
        if not path.is_dir():
            raise ToolkitError(f"data folder '{path}' does not exist")
        if not (path / "train").is_dir():
            raise ToolkitError(
                f"'{path}' has no train/ folder; expected train/<class>/<image> (and "
                "optionally val/ and test/ alike)"
            )
        return spec_for_classes(class_folders(path / "train"), path.name, str(path / "train"))
    if kind == "splits":
        if not path.is_dir():
            raise ToolkitError(f"split folder '{path}' does not exist")
        names = path / "classes.txt"
        if names.is_file():
            return spec_for_classes(read_class_names(names), path.name, str(names), ordered=True)
    return get_spec(options.dataset)


def _build_official(spec: DatasetSpec, root: Path, resize: Resize, download: bool):
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
    listing = cache.listing_key(files)
    return listing, lambda: {
        split: as_tensors(resize_array(x, resize), y) for split, (x, y) in arrays.items()
    }


def _list_folder(spec: DatasetSpec, root: Path):
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    listed = {s: scan_image_folder(d, spec) for s, d in splits.items()}
    images = [p for entry in listed.values() for p in entry.paths]
    others = [Path(b.file) for entry in listed.values() for b in entry.bad]
    return cache.listing_key(images + others), listed


def _list_splits(spec: DatasetSpec, root: Path):
    files = {
        s: root / f"{s}.txt" for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()
    }
    if "train" not in files:
        raise ToolkitError(f"'{root}' has no train.txt (lines 'relative/path label')")
    parsed = {s: parse_split_file(p) for s, p in files.items()}
    base = label_base(parsed, spec.num_classes)
    listed = {s: split_listing(f, base, spec.num_classes) for s, f in parsed.items()}
    # The split files (and the class names) are watched too: a fixed label rebuilds the cache.
    watched = list(files.values()) + [root / "classes.txt"]
    images = [p for entry in listed.values() for p in entry.paths]
    return cache.listing_key(watched + images), listed


def load_data(options: DataOptions, seed: int = 0) -> DataBundle:
    """Resolve the source, decode (or read the cache), carve test and val when the source
    has none."""
    source, data_root = _source_for(options)
    path = Path(source["path"])
    spec = _dataset_of(options, source["kind"], path)
    size = parse_size(options.image_size or spec.default_size)  # (height, width)
    if min(size) < 8:
        raise ToolkitError(f"--image-size must be at least 8 px a side, got {size_label(size)}")
    resize = options.resize(size)
    if source["kind"] == "official":
        listing, build = _build_official(spec, data_root, resize, options.download)
        file = cache.cache_path(data_root, spec, source, resize, listing)
    else:
        lister = _list_folder if source["kind"] == "folder" else _list_splits
        listing, listed = lister(spec, path)
        file = cache.cache_path(data_root, spec, source, resize, listing)
        allocate = _allocator(file, listed, size, options.memory_gb)
        build = lambda: decode_listed(listed, resize, path, allocate)  # noqa: E731

    tensors = cache.load_or_build(file, build)
    # Caches from before bad files were recorded hold none: they were only written when
    # every listed file decoded.
    bad = list(tensors.get("bad_files", []))
    apply_bad_file_policy(bad, options.bad_files)
    return _carved_bundle(tensors, options, spec, resize, source, seed, tuple(bad))


def _allocator(
    cache_file: Path, listed: dict, size: tuple[int, int], memory_gb: float | None
) -> Allocate:
    """In memory, or memory-mapped files beside the cache when the decoded images would
    exceed the memory budget."""
    count = sum(len(entry.paths) for entry in listed.values())
    need, budget = decoded_bytes(count, size), memory_budget_bytes(memory_gb)
    if need <= budget:
        return in_memory
    log.warning(
        "the decoded images (%.2f GB) exceed the memory budget (%.2f GB, --memory-gb): they "
        "stay on disk beside the cache, memory-mapped",
        need / 1e9,
        budget / 1e9,
    )

    def on_disk(split: str, n: int, size: tuple[int, int]):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        target = cache.mapped_file(cache_file, split)
        return np.lib.format.open_memmap(target, "w+", np.uint8, (n, 3, *size))

    return on_disk


def _carved_bundle(tensors, options, spec, resize, source, seed, bad) -> DataBundle:
    """The bundle, with test and val carved from train where the source has none."""
    images, labels = tensors["train"]
    carved = [s for s in ("test", "val") if s not in tensors]
    if source["kind"] != "official":  # the official files have hundreds per class
        check_enough_per_class(labels, spec, carved)
    parts = {s: Split(*tensors[s]) for s in ("val", "test") if s in tensors}
    keep = torch.arange(len(labels))
    names = source_names(tensors)
    paths = {s: names[s] for s in ("val", "test") if s in tensors}
    if "test" in carved:
        keep, held = carve(labels, options.test_fraction, TEST_SEED, "test")
        parts["test"] = Split(take(images, held), labels[held])
        paths["test"] = [names["train"][i] for i in held.tolist()]
        log.warning(
            "%s has no test split: %d images (%.0f%% of train, stratified, seed %d) are held "
            "out as test; the run records it",
            source["path"],
            len(held),
            100 * options.test_fraction,
            TEST_SEED,
        )
    if "val" in carved:
        tr, va = carve(labels[keep], options.val_fraction, seed, "val")
        parts["val"] = Split(take(images, keep[va]), labels[keep[va]])
        paths["val"] = [names["train"][i] for i in keep[va].tolist()]
        keep = keep[tr]
    paths["train"] = [names["train"][i] for i in keep.tolist()]
    train = Split(take(images, keep), labels[keep]) if carved else Split(images, labels)
    return DataBundle(
        spec=spec,
        image_size=recorded_size(resize.size),
        interpolation=resize.interpolation,
        crop_fraction=resize.crop_fraction,
        train=train,
        val=parts["val"],
        test=parts["test"],
        mean=tuple(tensors["mean"]),
        std=tuple(tensors["std"]),
        source=source,
        fingerprint=tensors["content_sha1"],
        val_is_carved="val" in carved,
        test_is_carved="test" in carved,
        skipped=bad,
        paths={s: tuple(p) for s, p in paths.items()},
    )


def source_names(tensors: dict) -> dict[str, list[str]]:
    """Each decoded image's name, split by split: its file relative to the source's folder,
    or '<split>/<row>' for the official files (and caches from before names were kept)."""
    names = tensors.get("paths") or {}
    return {
        split: list(names.get(split) or (f"{split}/{i}" for i in range(len(tensors[split][1]))))
        for split in ("train", "val", "test")
        if split in tensors
    }
