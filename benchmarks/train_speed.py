"""Training throughput: the toolkit's engine vs a loop written the way the reference did it.

    python -m benchmarks.train_speed --data-dir ../shared/data/cifar10

For each model, in one process on the same machine: images/s of
- `reference loop`: a torchvision-style dataset returning ToTensor + Normalize per PIL image,
  through a DataLoader (batch 64, shuffled, num_workers=0), plain eager training step;
- `engine (seed)`: the toolkit's in-memory path at the same batch 64, no augmentation;
- `engine (default)`: the default recipe's batch 128 with batch-level crop + flip;
plus seconds per 45,000-image epoch for each, and the time a second run takes to get its
data from the decoded-tensor cache. Warm-up steps are excluded. Writes train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from toolkit.data import DataOptions, load_data
from toolkit.engine import Normalizer, random_crop_flip
from toolkit.models import create_model

OUT = Path(__file__).resolve().parent
MODELS = ("net", "resnet10", "lenet5")
EPOCH_IMAGES = 45_000


class PerImageDataset(Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _step(net, optimizer, x, y) -> None:
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_reference(model: str, bundle, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    net = create_model(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(bundle.mean, bundle.std)]
    )
    images = bundle.train.images.permute(0, 2, 3, 1).numpy()
    loader = DataLoader(
        PerImageDataset(images, bundle.train.labels.numpy(), transform),
        batch_size=64,
        shuffle=True,
    )
    seen, start = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        _step(net, optimizer, x, y)
        seen += len(y)
        if i == warmup + steps - 1:
            break
    return seen / (time.perf_counter() - start)


def time_engine(model: str, bundle, steps: int, warmup: int, batch: int, augment: bool) -> float:
    torch.manual_seed(0)
    net = create_model(model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9 if augment else 0.0)
    normalize = Normalizer(bundle.mean, bundle.std, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(bundle.train), generator=generator)
    net.train()
    seen, start = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        idx = order[(i * batch) % (len(order) - batch) :][:batch]
        x = normalize(bundle.train.images[idx])
        if augment:
            x = random_crop_flip(x, generator)
        _step(net, optimizer, x, bundle.train.labels[idx])
        seen += batch
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 image folder (default: download)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    options = DataOptions(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)

    load_data(options)  # make sure the cache exists; the next call is the measured one
    start = time.perf_counter()
    bundle = load_data(options)
    cached_start = time.perf_counter() - start

    rows = []
    for model in MODELS:
        reference = time_reference(model, bundle, args.steps, args.warmup)
        seed = time_engine(model, bundle, args.steps, args.warmup, 64, augment=False)
        default = time_engine(model, bundle, args.steps, args.warmup, 128, augment=True)
        rows.append(
            {
                "model": model,
                "reference_img_s": round(reference),
                "engine_seed_img_s": round(seed),
                "engine_default_img_s": round(default),
                "speedup_same_recipe": round(seed / reference, 2),
                "epoch_s": {
                    k: round(EPOCH_IMAGES / v, 1)
                    for k, v in (("reference", reference), ("seed", seed), ("default", default))
                },
            }
        )
        print(rows[-1], flush=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result = {"machine": machine, "cached_data_start_s": round(cached_start, 2), "models": rows}
    (OUT / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Training throughput on this machine",
        "",
        f"Machine: {machine}. Real CIFAR-10 (45,000 train images after the val carve). "
        f"Reproduce: `python -m benchmarks.train_speed --data-dir ../shared/data/cifar10`.",
        "",
        f"A second run gets all 60,000 decoded images from the cache in **{cached_start:.2f} s**.",
        "",
        "| model | reference loop img/s | engine, seed recipe img/s | speed-up | "
        "engine, default recipe img/s | s/epoch reference | s/epoch seed | s/epoch default |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e = r["epoch_s"]
        lines.append(
            f"| {r['model']} | {r['reference_img_s']:,} | {r['engine_seed_img_s']:,} | "
            f"**{r['speedup_same_recipe']:.2f}×** | {r['engine_default_img_s']:,} | "
            f"{e['reference']} | {e['seed']} | {e['default']} |"
        )
    (OUT / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
