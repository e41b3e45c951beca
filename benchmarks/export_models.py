"""Export figures for the real-trained CIFAR-10 models: size, MACs, parity, fp32 vs INT8, latency.

    python -m benchmarks.export_models runs/bench/net-default-30 runs/bench/resnet10-default-20 \
        runs/bench/lenet5-default-30

Each run (evaluated or not) is exported with --int8 into RUN/export-bench/ in one process, so
all latencies come from the same machine and moment. Writes export.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit.export import export_run

OUT = Path(__file__).resolve().parent


def latency(report: dict, fmt: str, runtime: str, batch: int) -> dict:
    for row in report["latency"]:
        if row["format"] == fmt and row["runtime"] == runtime and row["batch"] == batch:
            return row
    return {}


def summarise(report: dict) -> dict:
    v, s, q = report["verification"], report["stats"], report.get("int8", {})
    out = {
        "model": report["metadata"]["model"],
        "run": report["run"],
        "size_mb": s["size_mb"],
        "params": s["params"],
        "macs": s["macs_per_image"],
        "parity_top1": v["top1_agreement"],
        "max_abs_logit_diff": v["max_abs_logit_diff"],
        "fp32_test_acc": v["onnx_accuracy"],
        "int8_test_acc": q.get("accuracy"),
        "int8_size_mb": q.get("size_mb"),
        "int8_speedup": q.get("speedup_vs_fp32"),
        "int8_note": q.get("note"),
        "latency": {},
    }
    for fmt, runtime in (
        ("torch eager", "torch CPU"),
        ("onnx fp32", "ORT CPU"),
        ("onnx int8", "ORT CPU"),
    ):
        for batch in (1, 64):
            row = latency(report, fmt, runtime, batch)
            if row:
                out["latency"][f"{fmt} b{batch}"] = {
                    "p50_ms": round(row["p50_ms"], 3),
                    "p95_ms": round(row["p95_ms"], 3),
                    "img_per_s": round(row["img_per_s"]),
                }
    torch_b1 = out["latency"]["torch eager b1"]["p50_ms"]
    ort_b1 = out["latency"]["onnx fp32 b1"]["p50_ms"]
    out["ort_vs_torch_b1"] = round(torch_b1 / ort_b1, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows, cpu = [], None
    for run in args.runs:
        report = export_run(run, out_dir=run / "export-bench", int8=True)
        cpu = report["cpu"]
        rows.append(summarise(report))
        print(json.dumps(rows[-1], indent=1), flush=True)
    (OUT / "export.json").write_text(json.dumps({"cpu": cpu, "models": rows}, indent=2) + "\n")
    lines = [
        "# Export figures (real CIFAR-10 models)",
        "",
        f"CPU: {cpu}. Parity and accuracy on the 10,000 official test images; latency p50 over "
        "timed runs after warm-up, same process for every row. Reproduce: "
        "`python -m benchmarks.export_models RUN...` on the runs of `benchmarks.core_recipes`.",
        "",
        "| model | params | MACs | ONNX MB | top-1 parity | max Δlogit | fp32 acc | INT8 acc "
        "| INT8 MB | torch b1 ms | ORT b1 ms | **ORT vs torch b1** | INT8 vs fp32 b1 / b64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lat, sp = r["latency"], r["int8_speedup"] or {}
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['macs'] / 1e6:.2f} M | {r['size_mb']:.3f} "
            f"| {r['parity_top1']:.2%} | {r['max_abs_logit_diff']:.1e} | {r['fp32_test_acc']:.2%} "
            f"| {r['int8_test_acc']:.2%} | {r['int8_size_mb']:.3f} "
            f"| {lat['torch eager b1']['p50_ms']:.3f} | {lat['onnx fp32 b1']['p50_ms']:.3f} "
            f"| **{r['ort_vs_torch_b1']:.1f}×** "
            f"| ×{sp.get('batch_1', 0):.2f} / ×{sp.get('batch_64', 0):.2f} |"
        )
    lines += ["", "INT8 notes, as the export report words them:", ""]
    lines += [f"- **{r['model']}**: {r['int8_note']}" for r in rows]
    lines += [
        "",
        "Batch-64 latency (p50 ms / img/s):",
        "",
        "| model | torch eager | ORT fp32 | ORT INT8 |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for key in ("torch eager b64", "onnx fp32 b64", "onnx int8 b64"):
            row = r["latency"].get(key, {})
            cells.append(f"{row.get('p50_ms', 0):.2f} / {row.get('img_per_s', 0):,}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    (OUT / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
