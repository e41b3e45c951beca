"""Rebuild artifacts/ (the models `make demo` serves) from real CIFAR-10, from scratch.

    python -m benchmarks.make_artifacts --data-dir ../shared/data/cifar10

Trains the experiments below with the default recipe (finished runs under --runs are
reused, exactly as benchmarks.core_recipes leaves them), evaluates each best checkpoint once
on the test split, exports it to ONNX with verified parity, and packages model + metadata +
confusion matrix + known failures into artifacts/<dataset>-<model>/. A few real test images
per class go to artifacts/examples/<dataset>/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.core_recipes import config_for, train_all
from toolkit.data import DataOptions, load_data
from toolkit.evaluate import evaluate_run
from toolkit.export import export_run, package_run

# artifact name -> experiment of benchmarks.core_recipes that produces it
SHIPPED = {
    "cifar10-net": "net-default-30",
    "cifar10-lenet5": "lenet5-default-30",
    "cifar10-resnet10": "resnet10-default-20",
}
EXAMPLES_PER_CLASS = 2


def write_examples(data: DataOptions, out: Path) -> None:
    """The first test images of each class, as PNG, for the app's example row."""
    bundle = load_data(data)
    split = bundle.test
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for label, name in enumerate(bundle.spec.classes):
        indices = np.flatnonzero(split.labels.numpy() == label)[:EXAMPLES_PER_CLASS]
        for n, index in enumerate(indices):
            pixels = split.images[index].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(out / f"{name}_{n}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 image folder (default: download)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("artifacts"))
    args = parser.parse_args()
    data = DataOptions(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)

    train_all(data, args.runs, list(SHIPPED.values()))
    summary = []
    for name, experiment in SHIPPED.items():
        run_dir = args.runs / experiment
        evaluate_run(run_dir, split="test")
        export_run(run_dir)
        target = package_run(run_dir, args.out, name)
        metrics = json.loads((target / "metrics.json").read_text())
        config = config_for(experiment, data)
        c = metrics["calibration"]
        summary.append(
            f"| {name} | {config.model} | {config.epochs} | {metrics['accuracy']:.2%} "
            f"| {c['temperature']:.3f} | {c['raw']['ece']:.2%} → {c['calibrated']['ece']:.2%} "
            f"| {(target / 'model.onnx').stat().st_size / 1e6:.2f} MB |"
        )
    write_examples(data, args.out / "examples" / "cifar10")
    (args.out / "README.md").write_text(
        "# Shipped models\n\n"
        "Trained on the real CIFAR-10 training images (45,000 train / 5,000 stratified val), "
        "best checkpoint by val accuracy, evaluated once on the official 10,000 test images. "
        "Regenerate with `make artifacts CIFAR10_DIR=path/to/cifar10`.\n\n"
        "Probabilities are calibrated: softmax(logits / T), T fitted on the val split "
        "([benchmarks/calibration.md](../benchmarks/calibration.md)).\n\n"
        "| artifact | model | epochs | test accuracy | T | ECE raw → calibrated (test) "
        "| ONNX size |\n|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(summary) + "\n"
    )
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
