"""CIFAR-10 from scratch on this CPU at a fixed training budget: the best timm backbone
beside `resnet9` and `speedrun` (#24).

    python -m benchmarks.fixed_budget --data-dir ../shared/data/cifar10 [--minutes 20]

Every model trains with its default recipe, its schedule fitted to the budget: a few
training steps at the recipe's batch size are timed first (random images, channels_last,
SGD), and the run gets the whole epochs that fit in the budget at that rate (less a share
for the epoch-end val pass). The schedule needs its length up front (one-cycle, linear
decay), so the budget is planned, not cut: the measured training seconds are reported
beside it.

Which timm backbone: the curated ones that train fastest on this CPU and export at 100 %
parity (benchmarks/backbones.md) each train at a short budget (--probe-minutes) and the
best **val** accuracy is taken. Test accuracy is read once per finalist, by `toolkit
evaluate` (with the recipe's TTA where it has one, and without).

Data: the real CIFAR-10 at its native 32 px, 45,000 train / 5,000 val (the toolkit's
stratified carve, seed 0) / the 10,000 test images. Runs one at a time, in fresh processes;
nothing else should run on the cores. Writes benchmarks/fixed_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.backbones import train_rate
from toolkit.export.bench import cpu_info
from toolkit.models import create_model
from toolkit.train.config import TrainConfig

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
CANDIDATES = ("timm/regnetx_002", "timm/mobilenetv4_conv_small", "timm/resnet10t")
OURS = ("resnet9", "speedrun")
TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 less the 10 % val carve
VAL_SHARE = 0.06  # of the budget, kept for the val pass after each epoch


def training_rate(model: str, data_dir: Path) -> tuple[float, int]:
    """Images/s of `model`'s training step at its default recipe's batch size, and that size."""
    config = TrainConfig.from_options(model, data_dir=str(data_dir), device="cpu")
    net = create_model(model, num_classes=10, input_size=32)
    sgd = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    return train_rate(net, 32, None, batch=config.batch_size, optimizer=sgd), config.batch_size


def planned_epochs(rate: float, minutes: float) -> int:
    return max(1, math.floor(minutes * 60 * (1 - VAL_SHARE) * rate / TRAIN_IMAGES))


def train(model: str, epochs: int, data_dir: Path, run: Path, evaluate: bool) -> dict:
    """`toolkit train MODEL --epochs N` in a fresh process; its val (and test) accuracy."""
    command = ["toolkit", "train", model, "--epochs", str(epochs), "--data-dir", str(data_dir)]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", *command, "--run-dir", str(run)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    with open(run / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    result = {
        "model": model,
        "command": shlex.join(command),
        "epochs": epochs,
        "train_seconds": sum(float(r["seconds"]) for r in history),
        "command_seconds": wall,
        "best_val_acc": max(float(r["val_acc"]) for r in history),
    }
    if evaluate:
        subprocess.run(
            [sys.executable, "-m", "toolkit", "evaluate", str(run)],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        record = json.loads((run / "eval" / "metrics.json").read_text())
        tta = record.get("tta") or {}
        result["test_acc"] = record["accuracy"]
        result["test_acc_tta"] = tta.get("accuracy")
        result["tta_views"] = tta.get("views")
    print(json.dumps(result), flush=True)
    return result


def budget_run(
    model: str, minutes: float, data_dir: Path, work: Path, evaluate: bool, tag: str
) -> dict:
    rate, batch = training_rate(model, data_dir)
    epochs = planned_epochs(rate, minutes)
    run = work / f"{tag}-{model.replace('/', '-')}"
    return {
        "budget_minutes": minutes,
        "probe_img_per_s": rate,
        "batch_size": batch,
        **train(model, epochs, data_dir, run, evaluate),
    }


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    minutes = report["minutes"]
    lines = [
        f"# CIFAR-10 from scratch in {minutes:g} minutes of CPU training",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {cpu['model']}, {cpu['logical_cores']} cores, AVX-512: "
        f"{'yes' if cpu['avx512f'] else 'no'}, native bf16: "
        f"{'yes' if cpu.get('bf16') else 'no'} (`--amp auto` is fp32 without it); torch "
        f"{report['torch']}.  ",
        "Data: the real CIFAR-10 at 32 px, 45,000 train / 5,000 val / 10,000 test. Every model "
        "uses its default recipe with `--epochs` set to what fits the budget at its measured "
        "training rate (see the script's docstring); the seconds are measured.",
        "",
        "## Which timm backbone (val only)",
        "",
        f"Each candidate trained for a {report['probe_minutes']:g}-minute budget; the best val "
        "accuracy is the one taken to the full budget.",
        "",
        "| candidate | epochs | train s | best val acc |",
        "|---|---:|---:|---:|",
    ]
    for r in report["probes"]:
        lines.append(
            f"| {r['model']} | {r['epochs']} | {r['train_seconds']:.0f} | {r['best_val_acc']:.2%} |"
        )
    lines += [
        "",
        f"## {minutes:g} minutes each",
        "",
        "| model | command | batch | epochs | train s | whole command s | best val | test "
        "| test with TTA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["finalists"]:
        tta = f"{r['test_acc_tta']:.2%} ({r['tta_views']} views)" if r["test_acc_tta"] else "—"
        lines.append(
            f"| {r['model']} | `{r['command'].split(' --data-dir')[0]}` | "
            f"{r['batch_size']} | {r['epochs']} | {r['train_seconds']:.0f} | "
            f"{r['command_seconds']:.0f} | {r['best_val_acc']:.2%} | **{r['test_acc']:.2%}** | "
            f"{tta} |"
        )
    ranked = sorted(report["finalists"], key=lambda r: -r["test_acc"])
    lines += [
        "",
        f"At this budget on this CPU, {ranked[0]['model']} is the most accurate ("
        + ", then ".join(f"{r['model']} {r['test_acc']:.2%}" for r in ranked)
        + " test, without TTA). A model's recipe is only as good as the epochs the budget "
        "lets it run: the probe's images/s decide them.",
        "",
        "No pretrained weights: ImageNet weights cannot be downloaded on these machines, so "
        "what they would add is not measured here. The timm backbones keep their ImageNet "
        "stems (stride 2 or 4 at the first layer), which leave a 32 px image 1x1 at the end; "
        "`resnet9` and `speedrun` were designed for 32 px.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--report", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--probe-minutes", type=float, default=3.0)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.report:
        report = json.loads((args.out / "fixed_budget.json").read_text())
        (args.out / "fixed_budget.md").write_text(markdown(report))
        return
    if args.data_dir is None:
        parser.error("--data-dir is required")
    data_dir = args.data_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="fixed-budget-"))
    probes = [
        budget_run(m, args.probe_minutes, data_dir, work, evaluate=False, tag="probe")
        for m in args.candidates.split(",")
    ]
    best = max(probes, key=lambda r: r["best_val_acc"])["model"]
    finalists = [
        budget_run(m, args.minutes, data_dir, work, evaluate=True, tag="budget")
        for m in (best, *OURS)
    ]
    report = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "command": shlex.join(["python", "-m", "benchmarks.fixed_budget", *sys.argv[1:]]),
        "minutes": args.minutes,
        "probe_minutes": args.probe_minutes,
        "probes": probes,
        "chosen": best,
        "finalists": finalists,
        "runs": str(work),
    }
    (args.out / "fixed_budget.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fixed_budget.md").write_text(markdown(report))
    print((args.out / "fixed_budget.md").read_text())


if __name__ == "__main__":
    main()
