"""Loading a dataset: the three kinds of source, the decode-once cache, the val carve.

    DataOptions --source--> uint8 N×C×H×W tensors (cached on disk) --carve--> DataBundle

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

import logging
import os
from pathlib import Path

import torch

from toolkit.data import cache
from toolkit.data.decode import apply_bad_file_policy, as_tensors, decode_listed, resize_array
from toolkit.data.formats import read_cifar10_batches, read_stl10_binary
from toolkit.data.listing import label_base, parse_split_file, scan_image_folder, split_listing
from toolkit.data.specs import DataBundle, DataOptions, DatasetSpec, Split, get_spec
from toolkit.errors import ToolkitError

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
    log.info("downloading %s into %s", spec.name, root)
    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:  # no network, proxy, disk full...
        raise ToolkitError(
            f"could not download {spec.name} into '{root}' ({type(exc).__name__}: {exc}). "
            f"Connect to the internet and retry, or pass --data-dir DIR (train/ and test/ "
            f"folders with one sub-folder per class) or --splits DIR (train.txt, test.txt)"
        ) from exc


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
    listing = cache.listing_key(files)
    return listing, lambda: {
        split: as_tensors(resize_array(x, size), y) for split, (x, y) in arrays.items()
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
    return cache.listing_key(images + others), lambda: decode_listed(listed, size)


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
    return cache.listing_key(list(files.values()) + images), lambda: decode_listed(listed, size)


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

    tensors = cache.load_or_build(cache.cache_path(data_root, spec, source, size, listing), build)
    # Caches from before bad files were recorded hold none: they were only written when
    # every listed file decoded.
    bad = list(tensors.get("bad_files", []))
    apply_bad_file_policy(bad, options.bad_files)

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
