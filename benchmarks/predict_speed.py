"""`toolkit predict` throughput on the real CIFAR-10 test images, decode included.

    python -m benchmarks.predict_speed [--data DATA] [--model artifacts/cifar10-resnet10]

The data folder defaults to $TOOLKIT_CIFAR10, else ../shared/data/cifar10 beside the checkout;
its test/<class>/*.jpg (10,000 JPEG files) are classified. Two measurements:
- `predict()`: images/s of toolkit.predict.predict on DATA/test, the function the command
  runs (listing, reading, the app's upload checks, decoding and preprocessing in threads,
  onnxruntime batches), model loaded beforehand, files in the page cache (one untimed run
  first); the median of `--rounds` runs for each batch size × decode-thread count;
- `command`: one `python -m toolkit predict DATA/test --model MODEL --out …csv` process, wall
  time from start to exit (interpreter start, model load and the CSV included), and the
  accuracy line it printed.

The CPU others used meanwhile (busy time in /proc/stat beyond this process's own) is
recorded with each figure: on a shared machine it says how far to trust them. Writes
benchmarks/predict_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime

from serving.classifier import OnnxClassifier
from toolkit.predict import DEFAULT_BATCH_SIZE, accuracy, default_workers, predict

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "predict_speed"
DATA_ENV = "TOOLKIT_CIFAR10"
TARGET = 1500  # images/s on 2 cores, decode included (issue #14)


def default_data() -> Path:
    return Path(os.environ.get(DATA_ENV) or ROOT.parent / "shared" / "data" / "cifar10")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


class Load:
    """Measures a stretch of wall time: seconds, and the cores other processes kept busy."""

    def __enter__(self):
        self.start, self.cpu, self.jiffies = time.perf_counter(), _own_cpu_s(), _busy_jiffies()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        busy, _ = _busy_jiffies()
        machine_s = (busy - self.jiffies[0]) / os.sysconf("SC_CLK_TCK")
        self.own_cores = (_own_cpu_s() - self.cpu) / self.seconds
        self.other_cores = max(0.0, machine_s - (_own_cpu_s() - self.cpu)) / self.seconds
        return False


def time_function(test_dir: Path, classifier, batch_size: int, workers: int, rounds: int) -> dict:
    runs = []
    for _ in range(rounds):
        with Load() as load:
            rows = predict([test_dir], classifier, batch_size=batch_size, workers=workers)
        runs.append((len(rows) / load.seconds, load))
    rates = [rate for rate, _ in runs]
    return {
        "batch_size": batch_size,
        "workers": workers,
        "images": len(rows),
        "img_per_s_median": statistics.median(rates),
        "img_per_s_runs": [round(r, 1) for r in rates],
        "own_cores": round(statistics.median(load.own_cores for _, load in runs), 2),
        "other_cores": round(statistics.median(load.other_cores for _, load in runs), 2),
        "top1": accuracy(rows, 1),
        "top5": accuracy(rows, 5),
        "skipped": sum(not r.ok for r in rows),
    }


def time_command(test_dir: Path, model: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "preds.csv"
        command = [sys.executable, "-m", "toolkit", "predict", str(test_dir), "--model", str(model)]
        env = {**os.environ, "TOOLKIT_PROGRESS": "0"}
        with Load() as load:
            done = subprocess.run(
                [*command, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
            )
        rows = sum(1 for _ in out.open()) - 1 if out.exists() else 0
    printed = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {
        "command": "toolkit predict DATA/test --model MODEL --out preds.csv",
        "exit_code": done.returncode,
        "seconds": round(load.seconds, 2),
        "img_per_s": round(rows / load.seconds, 1),
        "rows": rows,
        "printed": printed,
        "other_cores": round(load.other_cores, 2),
    }


def write_reports(result: dict) -> None:
    Path(f"{OUT}.json").write_text(json.dumps(result, indent=2) + "\n")
    best = result["headline"]
    cmd = result["command"]
    lines = [
        "# `toolkit predict` speed (real CIFAR-10 test images, decode included)",
        "",
        f"CPU: {result['machine']['cpu']}, {result['machine']['cores']} cores; onnxruntime "
        f"{result['machine']['onnxruntime']}, Python {result['machine']['python']}. Model "
        f"`{result['model']}`; {best['images']:,} JPEG files of `DATA/test/<class>/`. "
        f"Reproduce: `{result['reproduce']}`.",
        "",
        f"**{best['img_per_s_median']:,.0f} images/s** through `predict()` at the default "
        f"batch {best['batch_size']} and {best['workers']} decode thread(s) (target "
        f"{TARGET:,}); the command itself, interpreter start, model load and CSV included: "
        f"{cmd['seconds']} s for {cmd['rows']:,} rows = {cmd['img_per_s']:,.0f} images/s. It "
        f"printed: `{cmd['printed']}`.",
        "",
        "| batch | decode threads | images/s (median) | runs | cores used | cores others used |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["function"]:
        runs = ", ".join(f"{r:,.0f}" for r in row["img_per_s_runs"])
        lines.append(
            f"| {row['batch_size']} | {row['workers']} | {row['img_per_s_median']:,.0f} | {runs} "
            f"| {row['own_cores']} | {row['other_cores']} |"
        )
    others = max(row["other_cores"] for row in result["function"] + [cmd])
    lines += [
        "",
        "`cores others used`: CPU time other processes took during the measurement, in cores "
        f"(up to {others} here); "
        + (
            "the machine was shared, so the figures are a lower bound; rerun on a quiet one."
            if others > 0.2
            else "the machine was quiet."
        ),
        "",
    ]
    Path(f"{OUT}.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="CIFAR-10 folder")
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "cifar10-resnet10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    test_dir = args.data / "test"
    if not test_dir.is_dir():
        sys.exit(f"no CIFAR-10 test folder at {test_dir}; pass --data or set ${DATA_ENV}")
    model_file = args.model / "model.onnx" if args.model.is_dir() else args.model
    classifier = OnnxClassifier(model_file)
    predict([test_dir], classifier)  # untimed: files into the page cache, the session warm
    function = [
        time_function(test_dir, classifier, batch, workers, args.rounds)
        for batch in args.batch_sizes
        for workers in args.workers
    ]
    headline = next(
        (
            r
            for r in function
            if r["batch_size"] == DEFAULT_BATCH_SIZE and r["workers"] == default_workers()
        ),
        max(function, key=lambda r: r["img_per_s_median"]),
    )
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "model": classifier.name,
        "reproduce": "python -m benchmarks.predict_speed --data DATA  (DATA: the CIFAR-10 "
        f"folder; default ${DATA_ENV} or ../shared/data/cifar10)",
        "target_img_per_s": TARGET,
        "headline": headline,
        "function": function,
        "command": time_command(test_dir, args.model),
    }
    write_reports(result)
    print(json.dumps(result["headline"], indent=2))
    print(result["command"]["printed"])


if __name__ == "__main__":
    main()
