"""The fine-tuning recipe's values, chosen on val with real pretrained weights (#24).

    python -m benchmarks.finetune_values --data-dir ../shared/data/cifar10

ImageNet weights cannot be downloaded on these machines, so the pretrained weights are the
toolkit's own: `timm/resnet10t` trained from scratch on five CIFAR-10 classes (airplane,
automobile, bird, deer, frog: the 25,000 official training images, of which the toolkit
carves 2,500 as test and 2,250 as val; its default recipe, --epochs PRETRAIN_EPOCHS). The
task it is fine-tuned to is a small folder of the five *other* classes
(cat, dog, horse, ship, truck): TARGET_TRAIN training, TARGET_VAL val and TARGET_TEST test
images per class from the official splits, at CIFAR's native 32 px; classes the backbone
never saw, as a user's photos are.

Every combination of GRID is fine-tuned with `--pretrained <that run's best.pt> --recipe
finetune` (its other values as shipped) for each seed; the combination with the best mean
**val** accuracy is chosen. Test accuracy is read once, for the chosen values, the shipped
defaults and training from scratch (the default recipe, the same folder). Writes
benchmarks/finetune_values.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolkit.evaluate import evaluate_run
from toolkit.export.bench import cpu_info
from toolkit.train import recipes
from toolkit.train.config import TrainConfig
from toolkit.train.trainer import fit

OUT = Path(__file__).resolve().parent
MODEL = "timm/resnet10t"
SOURCE_CLASSES = ("airplane", "automobile", "bird", "deer", "frog")
TARGET_CLASSES = ("cat", "dog", "horse", "ship", "truck")
PRETRAIN_EPOCHS = 8
SOURCE_TRAIN = 5000  # per class: all of the official train split
TARGET_TRAIN, TARGET_VAL, TARGET_TEST = 100, 100, 200  # per class
GRID = {"lr": (3e-4, 1e-3, 3e-3), "backbone_lr_scale": (0.1, 0.3, 1.0), "freeze_epochs": (0, 1)}


def link_folder(cifar10: Path, root: Path, classes: tuple[str, ...], counts: dict) -> Path:
    """A class-folder tree of symlinks to the first images of each class: {split: (official
    split, start, count)}."""
    for split, (official, start, count) in counts.items():
        for name in classes:
            files = sorted((cifar10 / official / name).iterdir())[start : start + count]
            (root / split / name).mkdir(parents=True)
            for file in files:
                (root / split / name / file.name).symlink_to(file)
    return root


def train(data: Path, work: Path, tag: str, **flags) -> dict:
    config = TrainConfig.from_options(
        MODEL, data_dir=str(data), data_root=str(work / "data"), device="cpu", **flags
    )
    start = time.perf_counter()
    result = fit(config, run_dir=work / tag)
    return {
        "run": str(result.run_dir),
        "flags": {k: v for k, v in flags.items() if k != "pretrained"},
        "best_val_acc": result.best_val_acc,
        "seconds": time.perf_counter() - start,
    }


def test_accuracy(run: dict) -> float:
    return evaluate_run(Path(run["run"]), device="cpu")["accuracy"]


def summarise(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "runs": values}


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    shipped = report["shipped"]
    lines = [
        "# Fine-tuning values, chosen on val",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {cpu['model']}, {cpu['logical_cores']} cores; torch {report['torch']}.  ",
        f"Pretrained weights: `{MODEL}` trained by the toolkit on {', '.join(SOURCE_CLASSES)} "
        f"({PRETRAIN_EPOCHS} epochs, default recipe, 20,250 training images): "
        f"{report['pretrain']['best_val_acc']:.2%} val. Fine-tuned on a folder of the other "
        "five classes "
        f"({', '.join(TARGET_CLASSES)}): {TARGET_TRAIN} train, {TARGET_VAL} val, {TARGET_TEST} "
        f"test images per class, 32 px. Seeds: {report['seeds']}. ImageNet weights cannot be "
        "downloaded here: this is a CIFAR-to-CIFAR proxy, not a measurement of ImageNet "
        "fine-tuning.",
        "",
        "## Val accuracy of every combination (`--recipe finetune`, the rest as shipped)",
        "",
        "| --lr | --backbone-lr-scale | --freeze-epochs | val (mean ± std) |",
        "|---:|---:|---:|---:|",
    ]
    for row in sorted(report["grid"], key=lambda r: -r["val"]["mean"]):
        f = row["flags"]
        mark = " ← chosen" if f == report["chosen"] else ""
        mark += " ← shipped" if f == shipped else ""
        lines.append(
            f"| {f['lr']:g} | {f['backbone_lr_scale']:g} | {f['freeze_epochs']} | "
            f"{row['val']['mean']:.2%} ± {row['val']['std']:.2%}{mark} |"
        )
    lines += [
        "",
        "## Test accuracy, read once",
        "",
        "| arm | values | val | test (mean ± std) |",
        "|---|---|---:|---:|",
    ]
    for arm in report["test"]:
        values = ", ".join(f"{k} {v:g}" for k, v in arm["flags"].items()) or "default recipe"
        lines.append(
            f"| {arm['arm']} | {values} | {arm['val']['mean']:.2%} | "
            f"**{arm['test']['mean']:.2%}** ± {arm['test']['std']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.report:
        report = json.loads((args.out / "finetune_values.json").read_text())
        (args.out / "finetune_values.md").write_text(markdown(report))
        return
    if args.data_dir is None:
        parser.error("--data-dir is required")
    cifar10, work = args.data_dir.resolve(), Path(tempfile.mkdtemp(prefix="finetune-values-"))
    source = link_folder(
        cifar10, work / "source", SOURCE_CLASSES, {"train": ("train", 0, SOURCE_TRAIN)}
    )
    target = link_folder(
        cifar10,
        work / "target",
        TARGET_CLASSES,
        {
            "train": ("train", 0, TARGET_TRAIN),
            "val": ("train", TARGET_TRAIN, TARGET_VAL),
            "test": ("test", 0, TARGET_TEST),
        },
    )
    pretrain = train(source, work, "pretrain", epochs=PRETRAIN_EPOCHS)
    weights = str(Path(pretrain["run"]) / "best.pt")
    print(json.dumps(pretrain), flush=True)
    seeds = range(args.seeds)
    grid = []
    for values in itertools.product(*GRID.values()):
        flags = dict(zip(GRID, values, strict=True))
        runs = [
            train(target, work, f"ft-{i}-{seed}", pretrained=weights, seed=seed, **flags)
            for i, seed in [(len(grid), s) for s in seeds]
        ]
        grid.append({"flags": flags, "runs": runs, "val": summarise(runs, "best_val_acc")})
        print(json.dumps(grid[-1]["flags"] | {"val": grid[-1]["val"]["mean"]}), flush=True)
    chosen = max(grid, key=lambda r: r["val"]["mean"])
    shipped = {k: recipes.FALLBACK["finetune"][k] for k in GRID}
    shipped_row = next(r for r in grid if r["flags"] == shipped)
    scratch = [train(target, work, f"scratch-{seed}", seed=seed) for seed in seeds]
    arms = [("chosen on val", chosen["runs"], chosen["flags"])]
    if chosen is not shipped_row:
        arms.append(("shipped", shipped_row["runs"], shipped))
    arms.append(("from scratch", scratch, {}))
    test = []
    for name, runs, flags in arms:
        for run in runs:
            run["test_acc"] = test_accuracy(run)
        test.append(
            {
                "arm": name,
                "flags": flags,
                "val": summarise(runs, "best_val_acc"),
                "test": summarise(runs, "test_acc"),
            }
        )
    report = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "command": shlex.join(["python", "-m", "benchmarks.finetune_values", *sys.argv[1:]]),
        "seeds": list(seeds),
        "pretrain": pretrain,
        "grid": grid,
        "chosen": chosen["flags"],
        "shipped": shipped,
        "test": test,
    }
    (args.out / "finetune_values.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "finetune_values.md").write_text(markdown(report))
    print((args.out / "finetune_values.md").read_text())


if __name__ == "__main__":
    main()
