"""Fine-tuning on real images nobody here made: scikit-learn's UCI handwritten digits
(1,797 real 8×8 greyscale scans, 10 classes), from scratch vs `--init-from` a CIFAR-10 run.

    make artifacts CIFAR10_DIR=path/to/cifar10     # trains the CIFAR-10 runs under runs/bench/
    python -m benchmarks.finetune_digits             # -> benchmarks/finetune_digits.{md,json}

The digits are written out as a class-folder tree (train/zero/ … train/nine/, no test/), so the
toolkit carves a stratified test split itself (--test-fraction, seed fixed: the same test
images for every run) and val from the rest; both arms train through the normal API
(`toolkit.api.train`, the code `toolkit train` runs) with the same recipe, epochs and seeds,
and differ only in `init_from`. The 8×8 scans are resized to 32×32 like any other image.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from toolkit.api import evaluate, train
from toolkit.export.bench import cpu_info

OUT = Path(__file__).resolve().parent
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MODELS = {"lenet5": "runs/bench/lenet5-default-30", "resnet10": "runs/bench/resnet10-default-20"}


def write_digits(root: Path) -> int:
    """root/train/<name>/<i>.png from sklearn's digits (0..16 grey levels -> 0..255)."""
    digits = load_digits()
    shutil.rmtree(root, ignore_errors=True)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / "train" / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return len(digits.target)


def one_run(model: str, init_from: str | None, seed: int, args, runs: Path) -> dict:
    arm = "init" if init_from else "scratch"
    run_dir = runs / f"{model}-{arm}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(
        model,
        run_dir=run_dir,
        data_dir=str(args.data),
        data_root=str(args.data_root),
        test_fraction=args.test_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=False,  # flipped digits are other digits (2/5, 6/9 …): no flip-and-crop
        seed=seed,
        device="cpu",
        init_from=init_from,
    )
    seconds = time.perf_counter() - start
    report = evaluate(result, device="cpu")
    return {
        "model": model,
        "arm": arm,
        "seed": seed,
        "init_from": init_from,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "test_accuracy": report["accuracy"],
        "test_images": report["n"],
        "train_seconds": result.train_seconds,
        "wall_seconds": seconds,
    }


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for arm in ("scratch", "init"):
            accs = [r["test_accuracy"] for r in rows if r["model"] == model and r["arm"] == arm]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                out.append({"model": model, "arm": arm, "mean": statistics.mean(accs), "std": std})
    return out


def markdown(rows: list[dict], summary: list[dict], meta: dict) -> str:
    lines = [
        "# Fine-tuning: UCI digits from scratch vs --init-from a CIFAR-10 run",
        "",
        f"Generated {meta['date']} by `{meta['command']}` on {meta['cpu']} "
        f"({meta['cores']} cores, Python {meta['python']}).",
        "",
        f"Data: scikit-learn's `load_digits` ({meta['images']} real 8×8 scans, 10 classes) as a "
        f"class-folder tree with no test/ folder: the toolkit held out "
        f"{meta['test_images']} stratified test images ({meta['test_fraction']:.0%}, fixed "
        "seed: the same for every run) and 10 % of the rest as val. Each arm: the model's "
        f"default recipe with batch {meta['batch_size']} and no flip/crop augmentation (a "
        f"flipped digit is another digit), {meta['epochs']} epochs, seeds {meta['seeds']}, "
        "best epoch chosen on val, test evaluated once per run. `init` starts from the "
        "CIFAR-10 run's best.pt: every tensor but the classifier head, which starts fresh "
        "(its ten rows score CIFAR-10's classes, not digits).",
        "",
        "| model | from | test accuracy (mean ± std) | runs |",
        "|---|---|---:|---:|",
    ]
    for s in summary:
        n = sum(1 for r in rows if r["model"] == s["model"] and r["arm"] == s["arm"])
        source = meta["init_from"][s["model"]] if s["arm"] == "init" else "scratch"
        lines.append(
            f"| {s['model']} | {source} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} % | {n} |"
        )
    means = {(x["model"], x["arm"]): x["mean"] for x in summary}
    lines.append("")
    for model in dict.fromkeys(x["model"] for x in summary):
        if (model, "init") in means and (model, "scratch") in means:
            delta = 100 * (means[model, "init"] - means[model, "scratch"])
            lines.append(f"- {model}: `--init-from` minus scratch = **{delta:+.2f} points**.")
    lines += [
        "",
        "Train seconds are wall time per run and only indicative: other jobs shared the 2 cores "
        "during this benchmark.",
        "",
        "| model | arm | seed | best val acc | best epoch | test acc | train s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['arm']} | {r['seed']} | {100 * r['best_val_acc']:.2f} % "
            f"| {r['best_epoch']} | {100 * r['test_accuracy']:.2f} % | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/digits"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=20)
    # ~1,000 training images: batch 32 gives ~30 steps an epoch, where 128 gave 8 and left
    # some resnet10 seeds unconverged (on val) after 15 epochs.
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.data, args.data_root = args.work / "digits", args.work / "cache"
    missing = [MODELS[m] for m in args.models if not (Path(MODELS[m]) / "best.pt").is_file()]
    if missing:
        sys.exit(f"no CIFAR-10 run at {', '.join(missing)}: run `make artifacts` first")
    images = write_digits(args.data)
    rows = [
        one_run(model, init, seed, args, args.work / "runs")
        for model in args.models
        for init in (None, MODELS[model])
        for seed in args.seeds
    ]
    cpu = cpu_info()
    meta = {
        "date": f"{datetime.now():%Y-%m-%d %H:%M}",
        "command": "python -m benchmarks.finetune_digits " + " ".join(argv or sys.argv[1:]),
        "cpu": cpu["model"],
        "cores": cpu["logical_cores"],
        "python": platform.python_version(),
        "images": images,
        "test_images": rows[0]["test_images"],
        "test_fraction": args.test_fraction,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "init_from": {m: MODELS[m] for m in args.models},
    }
    summary = summarise(rows)
    write_report(args.out, meta, summary, rows)


def write_report(out: Path, meta: dict, summary: list[dict], rows: list[dict]) -> None:
    (out / "finetune_digits.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=2) + "\n"
    )
    (out / "finetune_digits.md").write_text(markdown(rows, summary, meta))
    print(markdown(rows, summary, meta))


if __name__ == "__main__":
    main()
