"""Muon or SGD for the small CNNs' filters under the default recipe, on val (after #25).

    python -m benchmarks.small_muon --data-dir ../shared/data/cifar10 [--epochs 15] [--seeds 2]

net, net2 and lenet5 with `--recipe default` at its own length (15 epochs: crop + flip, label
smoothing, SGD-nesterov one-cycle), once with SGD for every parameter (`--optimizer sgd`, the
recipe's until this measurement) and once with their conv filters on Muon (`--optimizer muon
--muon-lr 0.05 --muon-momentum 0.8`, values chosen on 2-epoch runs; everything else still SGD
at the recipe's lr: the recipe's since). Each pair shares its
seed, hence its val carve (45,000 / 5,000). Reported: the best val accuracy and the training
seconds of every run; the test split is not looked at. Finished runs under --work are
reused. Writes benchmarks/small_muon.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from toolkit.data import DataOptions
from toolkit.export.bench import cpu_info
from toolkit.run.folder import read_metrics
from toolkit.train import TrainConfig, fit
from toolkit.train.precision import resolve_amp
from toolkit.train.recipes import MUON_FILTERS, MUON_MODELS

OUT = Path(__file__).resolve().parent
# Both set explicitly, so the comparison stays what it was whatever the default becomes.
OPTIMIZERS = {"sgd": {"optimizer": "sgd"}, "muon": MUON_FILTERS}


def train(model: str, optimizer: str, epochs: int, seed: int, data, work: Path) -> dict:
    run_dir = work / f"{model}-{optimizer}-{epochs}-seed{seed}"
    config = TrainConfig.from_recipe(
        model, data, "default", epochs=epochs, seed=seed, device="auto", **OPTIMIZERS[optimizer]
    )
    if len(read_metrics(run_dir)) < epochs:
        fit(config, run_dir=run_dir)
    rows = read_metrics(run_dir)
    return {
        "model": model,
        "optimizer": optimizer,
        "seed": seed,
        "epochs": epochs,
        "best_val": max(r["val_acc"] for r in rows),
        "train_seconds": sum(r["seconds"] for r in rows),
    }


def markdown(report: dict) -> str:
    runs = report["runs"]
    lines = [
        "# The small CNNs' filters: SGD or Muon, under the default recipe (val)",
        "",
        f"CPU: {report['cpu']}; one run at a time. Reproduce: `{report['command']}`.",
        "",
        __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
        "",
        "| model | SGD best val (seeds) | Muon best val (seeds) | Muon − SGD, mean | SGD train s "
        "| Muon train s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for model in report["models"]:
        by = {
            o: [r for r in runs if (r["model"], r["optimizer"]) == (model, o)] for o in OPTIMIZERS
        }
        if not all(by.values()):
            continue
        vals = {o: [r["best_val"] for r in rs] for o, rs in by.items()}
        secs = {o: statistics.mean(r["train_seconds"] for r in rs) for o, rs in by.items()}
        delta = statistics.mean(vals["muon"]) - statistics.mean(vals["sgd"])
        lines.append(
            f"| {model} | {' / '.join(f'{v:.2%}' for v in vals['sgd'])} "
            f"| {' / '.join(f'{v:.2%}' for v in vals['muon'])} | {100 * delta:+.2f} pt "
            f"| {secs['sgd']:.0f} | {secs['muon']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 image folder (default: download)")
    parser.add_argument("--work", type=Path, default=Path("runs/small-muon"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MUON_MODELS))
    args = parser.parse_args()
    data = DataOptions(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)
    runs = [
        train(model, optimizer, args.epochs, seed, data, args.work)
        for seed in range(args.seeds)
        for model in args.models
        for optimizer in OPTIMIZERS
    ]
    command = (
        f"python -m benchmarks.small_muon --data-dir DATA --epochs {args.epochs} "
        f"--seeds {args.seeds}"
    )
    cpu = cpu_info()
    amp = resolve_amp("auto", torch.device("cpu")).name
    amp = "fp32" if amp == "off" else amp
    report = {
        "cpu": f"{cpu['model']}, {cpu['logical_cores']} cores, AVX-512 "
        f"{'yes' if cpu['avx512f'] else 'no'}; `--amp auto` trains in {amp}",
        "command": command,
        "models": args.models,
        "runs": runs,
    }
    (OUT / "small_muon.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "small_muon.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
