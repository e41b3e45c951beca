"""Default recipe vs the reference (`seed`) recipe on real CIFAR-10, at equal epoch budgets.

    python -m benchmarks.core_recipes --data-dir ../shared/data/cifar10            # train
    python -m benchmarks.core_recipes --data-dir ../shared/data/cifar10 --report   # evaluate

Each experiment is a normal run folder under --runs (default runs/bench); finished runs are
skipped, an interrupted one resumes. The report evaluates every best.pt once on the test
split and writes benchmarks/core_recipes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from toolkit.data import DataOptions
from toolkit.evaluate import evaluate_run
from toolkit.reproduce import EXPERIMENTS
from toolkit.reproduce.report import first_reaching
from toolkit.run.folder import read_metrics
from toolkit.train import TrainConfig, fit, resume

# name -> (model, model options, recipe, epochs, flags); the order is the order they train in.
# The small CNNs' default rows were measured when the default recipe trained every parameter
# with SGD; it has trained their filters with Muon since (benchmarks/small_muon.md), so they pin
# SGD to stay what this file's figures (and the shipped net and lenet5) came from.
SGD = {"optimizer": "sgd"}
PLAN = {
    "net-default-5": ("net", {}, "default", 5, SGD),
    "net-default-30": ("net", {}, "default", 30, SGD),
    "lenet5-default-30": ("lenet5", {}, "default", 30, SGD),
    "resnet10-default-20": ("resnet10", {}, "default", 20, {}),
    "net-seed-30": ("net", {}, "seed", 30, {}),
    "mlp-default-15": ("mlp", {}, "default", 15, {}),
    "net2-default-15": ("net2", {}, "default", 15, SGD),
    "lenet5-seed-30": ("lenet5", {}, "seed", 30, {}),
    "resnet10-seed-20": ("resnet10", {}, "seed", 20, {}),
    # the app's default model (#18), trained before Muon became speedrun's default (#25)
    "speedrun-airbench94-10": ("speedrun", {}, "airbench94", 10, {}),
    # the app's default model since #25: speedrun's default recipe (muon, selective TTA)
    "speedrun-default-8": ("speedrun", {}, "default", 8, {}),
}
# The reference's accuracy for each plain model (toolkit.reproduce.experiments has them all).
REFERENCE = {e.name: e.reference.accuracy for e in EXPERIMENTS["cifar10"] if e.name == e.model}
OUT = Path(__file__).resolve().parent


def config_for(name: str, data: DataOptions) -> TrainConfig:
    model, options, recipe, epochs, flags = PLAN[name]
    return TrainConfig.from_recipe(
        model, data, recipe, model_options=options, epochs=epochs, device="auto", **flags
    )


def train_all(data: DataOptions, runs: Path, only: list[str]) -> None:
    for name in only or PLAN:
        run_dir = runs / name
        config = config_for(name, data)
        done = read_metrics(run_dir)
        if len(done) >= config.epochs:
            print(f"{name}: finished, skipping")
            continue
        print(f"{name}: training {config.epochs} epochs")
        if (run_dir / "last.pt").exists():
            resume(run_dir)
        else:
            fit(config, run_dir=run_dir)


def report(runs: Path) -> None:
    results = []
    for name, (model, _options, recipe, epochs, _flags) in PLAN.items():
        run_dir = runs / name
        rows = read_metrics(run_dir)
        if len(rows) < epochs:
            print(f"{name}: not finished ({len(rows)}/{epochs} epochs), left out")
            continue
        metrics_file = run_dir / "eval" / "metrics.json"
        if not metrics_file.exists():
            evaluate_run(run_dir, split="test")
        test = json.loads(metrics_file.read_text())
        config = json.loads((run_dir / "config.json").read_text())
        train_seconds = sum(r["seconds"] for r in rows)
        results.append(
            {
                "experiment": name,
                "model": model,
                "recipe": recipe,
                "epochs": epochs,
                "params": config["num_params"],
                "best_val_acc": round(max(r["val_acc"] for r in rows), 4),
                "test_acc": round(test["accuracy"], 4),
                "final_train_acc": round(rows[-1]["train_acc"], 4),
                "train_seconds": round(train_seconds, 1),
                "img_per_s": round(sum(r["img_per_s"] for r in rows) / len(rows)),
                "reference_acc": REFERENCE.get(model),
                "val_reaches_reference": first_reaching(rows, REFERENCE.get(model)),
            }
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    (OUT / "core_recipes.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2) + "\n"
    )
    lines = [
        "# Default vs seed recipe on real CIFAR-10",
        "",
        f"Machine: {machine}. Data: the 60,000 real CIFAR-10 images (JPEG copy); val = a "
        "stratified 10 % of train (seed 0), test = the official 10,000, evaluated once on "
        "each run's best-val checkpoint. Reproduce: `python -m benchmarks.core_recipes "
        "--data-dir ../shared/data/cifar10 && python -m benchmarks.core_recipes --data-dir "
        "../shared/data/cifar10 --report`. The `train s` and `img/s` columns are wall-clock "
        "measurements; during some runs other work shared the 2 cores (net-default-30 and "
        "resnet10-seed-20 above all), so take clean throughput from train_speed.md. The "
        "default rows of net, net2 and lenet5 train every parameter with SGD (`--optimizer "
        "sgd`), the default recipe's until [small_muon.md](small_muon.md) moved their conv "
        "filters to Muon.",
        "",
        "| experiment | params | epochs | train s | img/s | best val | **test** | train acc "
        "| reference | val ≥ reference at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        reach = r["val_reaches_reference"]
        reached = f"epoch {reach[0]} ({reach[1]:.0f} s)" if reach else "—"
        lines.append(
            f"| {r['experiment']} | {r['params']:,} | {r['epochs']} | {r['train_seconds']:.0f} "
            f"| {r['img_per_s']:,} | {r['best_val_acc']:.2%} | **{r['test_acc']:.2%}** "
            f"| {r['final_train_acc']:.2%} | "
            f"{'—' if r['reference_acc'] is None else format(r['reference_acc'], '.0%')} | "
            f"{reached} |"
        )
    (OUT / "core_recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 image folder (default: download)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench"))
    parser.add_argument("--report", action="store_true", help="evaluate and write the report")
    parser.add_argument("--only", nargs="*", default=[], choices=list(PLAN))
    args = parser.parse_args()
    data = DataOptions(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)
    if args.report:
        report(args.runs)
    else:
        train_all(data, args.runs, args.only)


if __name__ == "__main__":
    main()
