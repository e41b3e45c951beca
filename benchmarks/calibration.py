"""Calibration of the shipped models, refitted from their own logits (issue #26).

    python -m benchmarks.calibration --data-dir ../shared/data/cifar10 [--write] \
        [--cache runs/calibration-logits]          # -> benchmarks/calibration.{md,json}

The training runs behind artifacts/ are not needed: each shipped model.onnx classifies the
run's val and test splits again (the served graph, TTA views included; the val split is the
run's own, carved from train by the seed recorded with it, and checked: the data's
fingerprint and the model's recorded accuracy must come out exactly). Then, with the code
`toolkit export` uses:
- every calibrator is fitted and compared on **val** (toolkit.evaluate.calibrate:
  cross-validated NLL and ECE) and one is chosen there, with the "not sure" threshold;
- **test** is only measured: the served probabilities of the model as shipped before and
  of the refitted one, against the ECE noise floor (the ECE of labels drawn from the
  model's own probabilities, mean of FLOOR_DRAWS draws), and what the threshold keeps.
With --write each model's folder is rewritten (toolkit.export.recalibrate: the logits'
part of the graph stays bit for bit, "probs" becomes the new calibrator) together with its
model.json, metrics.json's calibration, failures.json's confidences and reliability
diagram. A model that does not give its recorded answers on this CPU (the INT8 twin
without VNNI, see serving.catalog) is reported and left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import torch

from benchmarks.calibration_report import markdown
from serving.catalog import load_model, unreproduced_failures
from serving.classifier import OnnxClassifier
from toolkit.data import DataOptions, load_data
from toolkit.evaluate.calibrate import fit_calibration
from toolkit.evaluate.calibration import (
    calibration_metrics,
    expected_calibration_error,
    selective_result,
)
from toolkit.evaluate.calibrators import Calibrator, cross_validated
from toolkit.evaluate.evaluation import calibration_report, reliability_png
from toolkit.export.bench import cpu_info
from toolkit.export.onnx_graph import calibration_metadata
from toolkit.export.parity import PROB_TOLERANCE
from toolkit.export.recalibrate import with_calibrator

OUT = Path(__file__).resolve().parent
FLOOR_DRAWS = 20
FLOOR_MARGIN = 0.003  # the target: served test ECE within 0.3 pt of its floor
CHECK_IMAGES = 64  # a cached logits file must match the model on these, bit for bit
# The rewritten graph is run on these test images (the full split costs minutes for
# speedrun on a small CPU): its logits bit for bit, its probabilities as torch's. The
# predicted class is checked on every image through the calibrator.
PARITY_IMAGES = 1000


def served_outputs(classifier: OnnxClassifier, images: torch.Tensor, name: str) -> np.ndarray:
    """The graph's own output `name` for uint8 N×C×H×W images, as clients feed them."""
    out = []
    for i in range(0, len(images), 250):
        batch = images[i : i + 250].float().div(255).numpy()
        out.append(classifier.run_outputs(batch, [name])[name])
    return np.concatenate(out)


def cached_logits(
    classifier: OnnxClassifier, images: torch.Tensor, cache: Path | None, key: str
) -> torch.Tensor:
    """served_outputs' logits, read from `cache` when it holds them for this very graph
    (the first CHECK_IMAGES match bit for bit: a recalibrated graph keeps its logits, and
    so its cache)."""
    file = cache / f"{key}.npy" if cache else None
    if file is not None and file.is_file():
        stored = np.load(file)
        head = served_outputs(classifier, images[:CHECK_IMAGES], "logits")
        if len(stored) == len(images) and np.array_equal(stored[:CHECK_IMAGES], head):
            return torch.from_numpy(stored)
    logits = served_outputs(classifier, images, "logits")
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.save(file, logits)
    return torch.from_numpy(logits)


def noise_floor(probs: torch.Tensor) -> float:
    """The ECE a perfectly calibrated model with these probabilities would show here."""
    generator = torch.Generator().manual_seed(0)
    draws = [
        expected_calibration_error(probs, torch.multinomial(probs, 1, generator=generator)[:, 0])
        for _ in range(FLOOR_DRAWS)
    ]
    return sum(draws) / len(draws)


def shipped_probs(classifier: OnnxClassifier, info: dict, images, logits) -> torch.Tensor:
    """The shipped graph's "probs" for these logits: its recorded calibrator applied to them,
    checked against the graph's own output on the first CHECK_IMAGES."""
    probs = Calibrator.from_record(info).probs(logits)
    graph = served_outputs(classifier, images[:CHECK_IMAGES], "probs")
    gap = float(np.abs(graph - probs[:CHECK_IMAGES].numpy()).max())
    if gap > PROB_TOLERANCE:
        raise SystemExit(f"{classifier.path}: its probs are not its metadata's calibrator's")
    return probs


def figures(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None, target: float):
    """Test figures of served probabilities: NLL/ECE/Brier, the ECE floor, and what the
    threshold keeps, with the standard error of the kept accuracy were it on target."""
    kept = selective_result(probs, labels, threshold)
    n_kept = round(kept["coverage"] * len(labels))
    se = math.sqrt(target * (1 - target) / n_kept) if n_kept else None
    return {
        **calibration_metrics(probs, labels),
        "ece_floor": noise_floor(probs),
        "threshold": threshold,
        "test_coverage": kept["coverage"],
        "test_kept_accuracy": kept["accuracy"],
        "kept_accuracy_se": se,
        "threshold_within_se": se is not None and kept["accuracy"] >= target - se,
    }


def measure(folder: Path, data, cache: Path | None) -> dict:
    """One shipped model: its served figures as shipped, the refit on val, its figures."""
    model = load_model(folder, ["CPUExecutionProvider"])
    problem = unreproduced_failures(model)
    if problem:
        return {"artifact": folder.name, "skipped": problem}
    info = model.info
    if model.metrics["dataset"]["fingerprint"] != data.fingerprint:
        raise SystemExit(f"{folder.name} was trained on other data than --data-dir holds")
    splits = {"val": data.val, "test": data.test}
    logits = {
        name: cached_logits(model.classifier, split.images, cache, f"{folder.name}-{name}")
        for name, split in splits.items()
    }
    accuracy = {
        name: float((logits[name].argmax(1) == split.labels).float().mean())
        for name, split in splits.items()
    }
    # The split is the run's own: best.pt's recorded val accuracy (without TTA: with it in
    # the graph, the export's test accuracy) comes out exactly.
    checked = "test" if info.get("tta") else "val"
    if abs(accuracy[checked] - info[f"{checked}_accuracy"]) > 1e-6:
        raise SystemExit(f"{folder.name}: {checked} accuracy {accuracy[checked]} is not recorded")
    record = fit_calibration(logits["val"], data.val.labels)
    refit = Calibrator.from_record(record)
    target, labels = record["selective"]["target_accuracy"], data.test.labels
    as_shipped = shipped_probs(model.classifier, info, data.test.images, logits["test"])
    probs = refit.probs(logits["test"])
    # An INT8 graph's logits can tie exactly: either of the tied classes is its prediction.
    top = logits["test"].gather(1, probs.argmax(1, keepdim=True)).squeeze(1)
    if not torch.equal(top, logits["test"].amax(1)):
        raise SystemExit(f"{folder.name}: the calibrator changed a prediction")
    temperature = Calibrator("temperature", record["temperature"]).probs(logits["test"])
    return {
        "artifact": folder.name,
        "test_images": len(labels),
        "val_images": len(data.val),
        "accuracy": accuracy,
        "tta": info.get("tta", 0),
        "shipped": {
            "method": info.get("calibration_method", "temperature"),
            "temperature": info["temperature"],
            **figures(as_shipped, labels, info.get("confidence_threshold"), target),
        },
        "refit": {
            **{k: record[k] for k in ("method", "description", "chosen_because")},
            "val_candidates": record["val_candidates"],
            "val_selective": record["selective"],
            **figures(probs, labels, record["selective"]["threshold"], target),
        },
        "temperature_alone": figures(temperature, labels, None, target),
        "record": record,
        # What `toolkit evaluate` would write into metrics.json for the refitted model.
        "test_report": calibration_report(logits["test"], labels, record),
        "test_probs": probs,  # for failures.json; not written to the JSON
        "diagnosis": shift_diagnosis(record["method"], logits["test"], labels),
    }


def shift_diagnosis(method: str, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Why a calibrator chosen on val may miss on test: what `method` and one temperature
    reach when fitted on test itself (CV_FOLDS-fold, each image scored by the fit on the
    others): a bound on what the method can do where fit and measurement share one
    distribution, never used for anything shipped."""
    out = {}
    for name in dict.fromkeys(("temperature", method)):
        probs = cross_validated(name, logits, labels)
        out[f"test_fitted_{name}"] = {
            "ece": expected_calibration_error(probs, labels),
            "ece_floor": noise_floor(probs),
        }
    return out


def write_artifact(folder: Path, row: dict, probs: torch.Tensor, data, command: str) -> None:
    """The refitted calibrator into the folder: the graph (checked: logits bit for bit,
    probabilities as the calibrator's), model.json, metrics.json's calibration,
    failures.json's confidences, the reliability diagram, the export report's record."""
    record = row["record"]
    calibrator = Calibrator.from_record(record)
    changes = calibration_metadata(record)
    images = data.test.images[:PARITY_IMAGES]
    old = OnnxClassifier(folder / "model.onnx", ["CPUExecutionProvider"])
    before = served_outputs(old, images, "logits")
    model = with_calibrator(onnx.load(str(folder / "model.onnx")), calibrator, changes)
    payload = model.SerializeToString()
    (folder / "model.onnx").write_bytes(payload)
    new = OnnxClassifier(folder / "model.onnx", ["CPUExecutionProvider"])
    logits = served_outputs(new, images, "logits")
    graph_probs = served_outputs(new, images, "probs")
    expected = calibrator.probs(torch.from_numpy(logits)).numpy()
    parity = {
        "logits_bit_identical": bool(np.array_equal(logits, before)),
        "max_abs_prob_diff_vs_torch": float(np.abs(graph_probs - expected).max()),
        "top1_unchanged": bool(np.array_equal(graph_probs.argmax(1), before.argmax(1))),
    }
    if not (parity["logits_bit_identical"] and parity["top1_unchanged"]):
        raise SystemExit(f"{folder.name}: the recalibrated graph changed the logits: {parity}")
    if parity["max_abs_prob_diff_vs_torch"] > PROB_TOLERANCE:
        raise SystemExit(f"{folder.name}: the graph's probabilities are not torch's: {parity}")

    info = _update_json(folder / "model.json", lambda meta: {**meta, **changes})
    report = row["test_report"]
    _update_json(folder / "metrics.json", lambda metrics: {**metrics, "calibration": report})

    def confidences(failures: list) -> list:
        return [{**f, "confidence": float(probs[f["index"]].max())} for f in failures]

    _update_json(folder / "failures.json", confidences)
    diagram = reliability_png(info["model"], "test", report)
    (folder / "reliability_diagram.png").write_bytes(diagram)
    recalibrated = {
        "issue": 26,
        "command": command,
        "date": datetime.now().isoformat(timespec="seconds"),
        "method": calibrator.method,
        "chosen_because": record["chosen_because"],
        "parity_images": f"the first {len(images)} of the test split",
        **parity,
    }
    _update_json(
        folder / "export-report.json",
        lambda r: {
            **r,
            "metadata": {**r["metadata"], **changes},
            "onnx_sha256": hashlib.sha256(payload).hexdigest(),
            "recalibrated": recalibrated,
        },
    )
    row["written"] = parity


def _update_json(path: Path, change) -> dict | list:
    value = change(json.loads(path.read_text()))
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, help="where the decoded cache lives")
    parser.add_argument("--seed", type=int, default=0, help="the runs' --seed (val carve)")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--cache", type=Path, help="keep the models' logits here")
    parser.add_argument("--write", action="store_true", help="rewrite the artifacts")
    args = parser.parse_args()
    root = str(args.data_root.resolve()) if args.data_root else None
    data = load_data(DataOptions(data_dir=str(args.data_dir.resolve()), data_root=root), args.seed)
    command = "python -m benchmarks.calibration --data-dir " + str(args.data_dir)
    command += " --write" * args.write
    rows = []
    for folder in sorted(args.artifacts.glob(f"{data.spec.name}-*")):
        row = measure(folder, data, args.cache)
        probs = row.pop("test_probs", None)
        if "skipped" not in row:
            diagram = reliability_png(folder.name, "test", row["test_report"])
            (OUT / "calibration").mkdir(exist_ok=True)
            (OUT / "calibration" / f"{folder.name}.png").write_bytes(diagram)
        if args.write and "skipped" not in row:
            write_artifact(folder, row, probs, data, command)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("artifact", "skipped", "refit")})[:400])
    cpu = cpu_model()
    meta = {"command": command, "cpu": cpu, "python": platform.python_version()}
    meta["date"] = datetime.now().strftime("%Y-%m-%d %H:%M")
    (OUT / "calibration.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (OUT / "calibration.md").write_text(markdown(rows, meta, FLOOR_MARGIN) + "\n")
    print((OUT / "calibration.md").read_text())


def cpu_model() -> str:
    """The CPU's model name (as lscpu shows it), its logical cores, and whether it has the
    vector extensions INT8 depends on."""
    info = cpu_info()
    vnni = "with VNNI" if info["vnni"] else "AVX2 without VNNI" if info.get("avx2") else "no AVX2"
    return f"{info['model']} ({info['logical_cores']} logical cores, {vnni})"


if __name__ == "__main__":
    main()
