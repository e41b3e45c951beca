"""Training throughput: the toolkit's engine vs a loop written the way the reference did it.

    python -m benchmarks.train_speed --data-dir ../shared/data/cifar10 [--device cuda]
    python -m benchmarks.train_speed --synthetic --device cuda   # where CIFAR-10 cannot travel

For each model, in one process on the same machine, images/s of
- `reference loop`: a torchvision-style dataset returning ToTensor + Normalize per PIL image,
  through a DataLoader (batch 64, shuffled, num_workers=0), plain eager fp32 training step
  (batches copied to the device);
- `engine, fp32`: toolkit.train.engine.train_one_epoch, the code `toolkit train` runs, at the same
  batch 64 with the seed recipe (no augmentation), autocast off;
- `engine`: the same with `--amp auto` as this device resolves it (bf16 on GPUs and on
  CPUs with AVX512-BF16/AMX, else fp32);
- `engine, default recipe`: batch 128, crop + flip, label smoothing, `--amp auto`;
plus seconds per 45,000-image epoch for each, and the time a second run takes to get its
data from the decoded-tensor cache. `--synthetic` times random images of CIFAR-10's shape
instead (throughput does not depend on the pixels; no cache figure then).

Every measurement trains a fresh net for `--warmup` untimed steps, then `--steps` timed ones.
The measurements are interleaved over `--rounds` rounds and the median is reported, so a
slow spell of a shared machine does not land on one column. Writes train_speed.{json,md}
(or `--report NAME`.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from toolkit.data import DataOptions, Split, load_data
from toolkit.export.bench import cpu_info
from toolkit.models import create_model
from toolkit.train.batches import Normalizer, on_device
from toolkit.train.engine import StepOptions, configure_backends, pick_device, train_one_epoch
from toolkit.train.precision import FP32, Precision, resolve_amp

OUT = Path(__file__).resolve().parent
MODELS = ("net", "resnet10", "lenet5")
EPOCH_IMAGES = 45_000
SEED_BATCH, DEFAULT_BATCH = 64, 128


class PerImageDataset(Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_reference(model: str, bundle, device, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    net = create_model(model).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(bundle.mean, bundle.std)]
    )
    images = bundle.train.images.permute(0, 2, 3, 1).numpy()
    loader = DataLoader(
        PerImageDataset(images, bundle.train.labels.numpy(), transform),
        batch_size=SEED_BATCH,
        shuffle=True,
    )
    seen, start = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _synchronize(device)
            start, seen = time.perf_counter(), 0
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if i == warmup + steps - 1:
            break
    _synchronize(device)
    return seen / (time.perf_counter() - start)


def time_engine(
    model: str, train: Split, normalize, device, steps: int, warmup: int, options: StepOptions
) -> float:
    """images/s of train_one_epoch over `steps` batches, after `warmup` batches of the same
    net (oneDNN/cuDNN pick and cache their kernels on the first calls)."""
    torch.manual_seed(0)
    net = create_model(model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9 if options.augment else 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)

    def epoch(batches: int) -> float:
        n = batches * options.batch_size
        part = Split(train.images[:n], train.labels[:n])
        result = train_one_epoch(
            net, part, normalize, optimizer, schedule, options, generator=generator, device=device
        )
        return result.images_per_second

    epoch(warmup)
    return epoch(steps)


def measure(model: str, bundle, train_on_device: Split, device, args, auto: Precision) -> dict:
    """One round of every column for `model`."""
    normalize = Normalizer(bundle.mean, bundle.std, device)
    default = StepOptions(
        batch_size=DEFAULT_BATCH, augment=True, label_smoothing=0.1, precision=auto
    )

    def engine(options: StepOptions) -> float:
        return time_engine(
            model, train_on_device, normalize, device, args.steps, args.warmup, options
        )

    return {
        "reference": time_reference(model, bundle, device, args.steps, args.warmup),
        "engine_fp32": engine(StepOptions(batch_size=SEED_BATCH, precision=FP32)),
        "engine": engine(StepOptions(batch_size=SEED_BATCH, precision=auto)),
        "engine_default": engine(default),
    }


def synthetic_cifar10(n: int = EPOCH_IMAGES) -> SimpleNamespace:
    """What the timings read from a DataBundle, filled with seeded random 32×32 images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return SimpleNamespace(train=Split(images, labels), mean=(0.5,) * 3, std=(0.25,) * 3)


def machine_facts(device: torch.device, precision: Precision) -> dict:
    facts = {
        "cpu": cpu_info()["model"],
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "amp_auto": precision.name,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def write_reports(result: dict, name: str) -> str:
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu_count']}-core {m['cpu']} CPU"
    lines = [
        "# Training throughput",
        "",
        f"Machine: {where}, torch {m['torch']}, device `{m['device']}`; `--amp auto` resolves "
        f"to **{m['amp_auto']}** here. {result['data']}. Median of {result['rounds']} "
        f"interleaved rounds of {result['steps']} timed steps each. Reproduce: "
        f"`{result['command']}`.",
        "",
        "`reference loop`: per-image PIL → ToTensor → Normalize through a DataLoader, batch 64, "
        "fp32 eager, as the seed did it. `engine`: `toolkit.train.engine.train_one_epoch` (what "
        "`toolkit train` runs) at the same batch 64 with the seed recipe, in fp32 and with "
        "`--amp auto`; the speed-up compares `engine` (auto) with the reference loop. "
        "`default recipe`: batch 128 with crop + flip.",
        "",
    ]
    if result["cached_data_start_s"] is not None:
        lines += [
            f"A second run gets all 60,000 decoded images from the cache in "
            f"**{result['cached_data_start_s']:.2f} s**.",
            "",
        ]
    lines += [
        "| model | reference loop img/s | engine fp32 img/s | speed-up fp32 | engine img/s | "
        "**speed-up** | default recipe img/s | s/epoch reference | s/epoch engine | "
        "s/epoch default |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        e = r["epoch_s"]
        lines.append(
            f"| {r['model']} | {r['reference_img_s']:,} | {r['engine_fp32_img_s']:,} | "
            f"{r['speedup_fp32']:.2f}× | {r['engine_img_s']:,} | **{r['speedup']:.2f}×** | "
            f"{r['engine_default_img_s']:,} | {e['reference']} | {e['engine']} | {e['default']} |"
        )
    text = "\n".join(lines) + "\n"
    (OUT / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 image folder (default: download)")
    parser.add_argument("--synthetic", action="store_true", help="random images, no data needed")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--report",
        default="train_speed",
        help="writes benchmarks/REPORT.{json,md}",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOOLKIT_PROGRESS", "0")
    options = DataOptions(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)
    device = pick_device(args.device)
    configure_backends(device)  # for every column, the reference loop's too
    auto = resolve_amp("auto", device)

    if args.synthetic:
        bundle, cached_start = synthetic_cifar10(), None
        data = "Random uint8 images of CIFAR-10's shape (45,000)"
    else:
        load_data(options)  # make sure the cache exists; the next call is the measured one
        start = time.perf_counter()
        bundle = load_data(options)
        cached_start = round(time.perf_counter() - start, 2)
        data = "Real CIFAR-10 (45,000 train images after the val carve)"
    train_on_device = on_device(bundle.train, device)

    rows = []
    for model in MODELS:
        rounds = [
            measure(model, bundle, train_on_device, device, args, auto) for _ in range(args.rounds)
        ]
        median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        rows.append(
            {
                "model": model,
                "reference_img_s": round(median["reference"]),
                "engine_fp32_img_s": round(median["engine_fp32"]),
                "engine_img_s": round(median["engine"]),
                "engine_default_img_s": round(median["engine_default"]),
                "speedup": round(median["engine"] / median["reference"], 2),
                "speedup_fp32": round(median["engine_fp32"] / median["reference"], 2),
                "epoch_s": {
                    k: round(EPOCH_IMAGES / median[v], 1)
                    for k, v in (
                        ("reference", "reference"),
                        ("engine", "engine"),
                        ("default", "engine_default"),
                    )
                },
                "rounds": [{k: round(v) for k, v in r.items()} for r in rounds],
            }
        )
        print(rows[-1], flush=True)
    result = {
        "machine": machine_facts(device, auto),
        "command": "python -m benchmarks.train_speed " + " ".join(sys.argv[1:]),
        "data": data,
        "cached_data_start_s": cached_start,
        "steps": args.steps,
        "rounds": args.rounds,
        "models": rows,
    }
    print(write_reports(result, args.report))


if __name__ == "__main__":
    main()
