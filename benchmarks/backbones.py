"""CPU-friendly timm backbones measured on this machine: what each costs and whether its ONNX
export is right.

    python -m benchmarks.backbones --data-dir ../shared/data/cifar10 [--size 64] [--only a,b]

For every architecture of toolkit.models.timm_backbones.CURATED, built for CIFAR-10's 10
classes at --size px (random init, seed 0: ImageNet weights cannot be downloaded here):
- params and MACs per image (torch's FLOP counter);
- training images/s: AdamW steps on batches of 64 at --size px, fp32 and under bf16
  autocast (this CPU's native bf16 or not is named beside it);
- the ONNX export (toolkit's exporter, opset 17, normalisation in the graph) and its top-1
  parity with torch on the real CIFAR-10 test split (10,000 images resized to --size px);
  an architecture whose export fails is refused with the reason;
- onnxruntime latency at batch 1 and 64 (2 threads), and the INT8 copy's (static QDQ,
  toolkit's quantizer): speed-up and top-1 agreement with fp32 on 2,000 test images.

Writes benchmarks/backbones.{json,md}. Untrained networks put their top-2 logits close
together, so parity here is a harder test than on a trained model: a disagreement is
reported with the logit gap it happened at.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from serving.preprocess import prepare
from toolkit.export.bench import (
    CPU,
    DEFAULT_TIMING,
    cpu_info,
    default_threads,
    make_session,
    measure_onnx,
)
from toolkit.export.onnx_graph import INPUT_NAME, ExportHead, torch_to_onnx
from toolkit.export.opset import DEFAULT_OPSET
from toolkit.export.quantize import quantize_int8
from toolkit.models import NormalizedClassifier, count_parameters, create_model
from toolkit.models.registry import count_macs
from toolkit.models.timm_backbones import CURATED

OUT = Path(__file__).resolve().parent / "backbones"
TRAIN_BATCH = 64
TRAIN_STEPS = 4  # timed, after 2 untimed
INT8_IMAGES = 2000
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's


def test_images(data_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The real test split, N×3×size×size float32 in [0, 1], and its labels."""
    from PIL import Image

    classes = sorted(p.name for p in (data_dir / "test").iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((data_dir / "test" / name).iterdir()):
            with Image.open(path) as image:
                images.append(prepare(image, size).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images).astype(np.float32) / 255.0, np.array(labels)


def train_rate(
    net: torch.nn.Module,
    size: int,
    dtype: torch.dtype | None,
    batch: int = TRAIN_BATCH,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Training images/s: forward, backward and an optimizer step (AdamW unless given) on
    random batches of `batch` images, channels_last."""
    net.train()
    optimizer = optimizer or torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    net = net.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    return batch * TRAIN_STEPS / (time.perf_counter() - start)


def logits_of(run, images: np.ndarray, batch: int = 250) -> np.ndarray:
    return np.concatenate([run(images[i : i + batch]) for i in range(0, len(images), batch)])


def parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> dict:
    same = torch_logits.argmax(1) == onnx_logits.argmax(1)
    top2 = np.sort(torch_logits, 1)[:, -2:]
    gaps = (top2[:, 1] - top2[:, 0])[~same]
    return {
        "top1_agreement": float(same.mean()),
        "disagreements": int((~same).sum()),
        "largest_gap_disagreed": float(gaps.max()) if len(gaps) else None,
        "max_abs_diff": float(np.abs(torch_logits - onnx_logits).max()),
    }


def p50(rows: list[dict], batch: int) -> float:
    return next(r["p50_ms"] for r in rows if r["batch"] == batch)


def stage(name: str) -> None:
    """Say which step runs, for the parent to name when this process dies natively."""
    print(f"stage: {name}", file=sys.stderr, flush=True)


def measure(arch: str, size: int, images: np.ndarray, labels: np.ndarray, cpu: dict) -> dict:
    stage("build")
    torch.manual_seed(0)
    net = create_model(f"timm/{arch}", num_classes=10, input_size=size)
    row: dict = {
        "model": f"timm/{arch}",
        "params": count_parameters(net),
        "macs": count_macs(net, (size, size)),
    }
    stage("training fp32")
    row["train_img_per_s_fp32"] = train_rate(net, size, None)
    stage("training bf16")
    row["train_img_per_s_bf16"] = train_rate(net, size, torch.bfloat16)
    stage("ONNX export")
    torch.manual_seed(0)  # the measured weights again, not the ones training stepped
    net = create_model(f"timm/{arch}", num_classes=10, input_size=size).eval()
    head = ExportHead(NormalizedClassifier(net, list(MEAN), list(STD))).eval()
    try:
        model = torch_to_onnx(head, (3, size, size), DEFAULT_OPSET)
        onnx.checker.check_model(model)
    except Exception as exc:  # ToolkitError names the operator; anything else is reported
        row["refused"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    stage("parity and latency")
    threads = default_threads()
    session = make_session(model.SerializeToString(), CPU, threads)
    with torch.inference_mode():
        torch_logits = logits_of(lambda x: head(torch.from_numpy(x))[0].numpy(), images)
    onnx_logits = logits_of(lambda x: session.run(["logits"], {INPUT_NAME: x})[0], images)
    row["parity"] = parity(torch_logits, onnx_logits)
    row["untrained_accuracy"] = float((onnx_logits.argmax(1) == labels).mean())
    rows = measure_onnx(session, (3, size, size), CPU, threads, DEFAULT_TIMING)
    row["onnx_ms_b1"], row["onnx_ms_b64"] = p50(rows, 1), p50(rows, 64)
    stage("INT8")
    try:
        int8 = quantize_int8(model, images[::40][:256], vnni=cpu["vnni"])
        int8_session = make_session(int8.SerializeToString(), CPU, threads)
    except Exception as exc:
        row["int8_refused"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    int8_rows = measure_onnx(int8_session, (3, size, size), CPU, threads, DEFAULT_TIMING)
    row["int8_speedup_b1"] = row["onnx_ms_b1"] / p50(int8_rows, 1)
    row["int8_speedup_b64"] = row["onnx_ms_b64"] / p50(int8_rows, 64)
    pick = np.random.default_rng(0).permutation(len(images))[:INT8_IMAGES]
    int8_logits = logits_of(
        lambda x: int8_session.run(["logits"], {INPUT_NAME: x})[0], images[pick]
    )
    row["int8_top1_agreement"] = float(
        (int8_logits.argmax(1) == onnx_logits[pick].argmax(1)).mean()
    )
    return row


def report(result: dict) -> str:
    cpu, size = result["cpu"], result["size"]
    lines = [
        "# timm backbones on this CPU",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {cpu['model']}, {cpu['logical_cores']} cores, AVX-512: "
        f"{'yes' if cpu['avx512f'] else 'no'}, VNNI: {'yes' if cpu['vnni'] else 'no'}, native "
        f"bf16: {'yes' if result['native_bf16'] else 'no'}; torch {result['torch']}, timm "
        f"{result['timm']}, onnxruntime {result['onnxruntime']}.  ",
        f"Every network is built for 10 classes at {size}x{size} px with random weights (seed "
        "0): ImageNet weights cannot be downloaded on these machines, so what pretraining adds "
        "to accuracy is **not measured here**. Parity is top-1 agreement between torch and "
        "onnxruntime on the 10,000 real CIFAR-10 test images resized to "
        f"{size} px; INT8 agreement is with the fp32 ONNX model on 2,000 of them.",
        "",
        "| model | params | MMACs | train img/s fp32 | train img/s bf16 | ONNX parity | "
        "ONNX ms b1 | ONNX ms b64 | INT8 speed-up b1 / b64 | INT8 top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "crashed" in r:
            lines.append(f"| {r['model']} | crashed: {r['crashed']} | | | | | | | | |")
            continue
        head = (
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.0f} | "
            f"{r['train_img_per_s_fp32']:.0f} | {r['train_img_per_s_bf16']:.0f} |"
        )
        if "refused" in r:
            lines.append(f"{head} refused: {r['refused']} | | | | |")
            continue
        par = r["parity"]
        agreement = f"{par['top1_agreement']:.2%}"
        if par["disagreements"]:
            agreement += f" ({par['disagreements']} at gaps ≤ {par['largest_gap_disagreed']:.1e})"
        int8 = (
            f"refused: {r['int8_refused']} | |"
            if "int8_refused" in r
            else f"{r['int8_speedup_b1']:.2f}x / {r['int8_speedup_b64']:.2f}x | "
            f"{r['int8_top1_agreement']:.1%} |"
        )
        lines.append(
            f"{head} {agreement} | {r['onnx_ms_b1']:.2f} | {r['onnx_ms_b64']:.1f} | {int8}"
        )
    if result.get("seconds"):
        lines += ["", f"Measured in {result['seconds'] / 60:.0f} min."]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def measure_isolated(arch: str, args) -> dict:
    """`measure` in a child process: a native crash (one architecture aborted with a heap
    corruption here) becomes the row's reason instead of ending the benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "benchmarks.backbones", "--data-dir", str(args.data_dir)]
        command += ["--size", str(args.size), "--one", arch, "--row-out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(out.read_text())
    stages = [line for line in done.stderr.splitlines() if line.startswith("stage: ")]
    where = stages[-1].removeprefix("stage: ") if stages else "start-up"
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"model": f"timm/{arch}", "crashed": f"exit {done.returncode} in {where}: {last}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated architectures")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child of measure_isolated
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        images, labels = test_images(args.data_dir, args.size)
        row = measure(args.one, args.size, images, labels, cpu_info())
        args.row_out.write_text(json.dumps(row))
        return
    import onnxruntime
    import timm

    start = time.perf_counter()
    archs = [a for a in CURATED if not args.only or a in args.only.split(",")]
    rows = []
    for arch in archs:
        print(f"{arch} ...", flush=True)
        rows.append(measure_isolated(arch, args))
        print(json.dumps(rows[-1]), flush=True)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result = {
        "command": f"python -m benchmarks.backbones --data-dir DATA --size {args.size}"
        + (f" --only {args.only}" if args.only else ""),
        "cpu": cpu_info(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "size": args.size,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
