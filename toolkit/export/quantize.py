"""Beyond fp32: static INT8 (QDQ) post-training quantization and an fp16 copy for GPUs.

INT8 follows onnxruntime's recipe for x86: pre-process (shape inference + graph
optimisation), then QDQ with uint8 activations and per-channel int8 weights, calibrated by
min/max on a few hundred training images. CPUs without VNNI get 7-bit weights
(``reduce_range``), which onnxruntime recommends there to avoid saturating the u8×s8 dot
products of AVX2/AVX-512.

The INT8 model's logits are not the fp32 model's, so its probabilities get their own
calibrator, chosen on its own val logits exactly as the fp32 model's was
(toolkit.evaluate.calibrate.fit_calibration) and swapped into its graph
(toolkit.export.recalibrate).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from toolkit.data import Split
from toolkit.errors import ToolkitError
from toolkit.evaluate.calibrate import fit_calibration
from toolkit.evaluate.calibrators import Calibrator
from toolkit.evaluate.evaluation import calibration_report
from toolkit.export.bench import BATCH_SIZES, CPU, CUDA, LatencyPlan, make_session, measure_onnx
from toolkit.export.branches import quantize_branches
from toolkit.export.onnx_graph import INPUT_NAME, calibration_metadata, check_model
from toolkit.export.parity import compare, onnx_outputs
from toolkit.export.recalibrate import with_calibrator

log = logging.getLogger(__name__)

INT8_FILE, FP16_FILE = "model.int8.onnx", "model.fp16.onnx"
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32


def calibration_images(
    images: torch.Tensor, count: int = CALIBRATION_IMAGES, seed: int = 0
) -> np.ndarray:
    """A seeded random sample of uint8 N×C×H×W training images as float32 in [0, 1]."""
    if len(images) == 0:
        raise ToolkitError("no training images to calibrate INT8 with")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:count]
    return images[pick].float().div(255).numpy()


def _reader(feeds: list[dict]):
    """An onnxruntime CalibrationDataReader handing out `feeds`, one after the other."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    return _Feeds()


def quantize_int8(
    model: onnx.ModelProto, calibration: np.ndarray, *, vnni: bool
) -> onnx.ModelProto:
    """Static QDQ INT8 copy of `model` (metadata kept), calibrated on `calibration` images;
    the branches of an If (selective TTA's views) too (toolkit.export.branches)."""
    batches = [
        {INPUT_NAME: calibration[i : i + CALIBRATION_BATCH]}
        for i in range(0, len(calibration), CALIBRATION_BATCH)
    ]

    def quantize(graph: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto:
        return _static_int8(graph, feeds, vnni)

    quantized = quantize_branches(
        model, quantize(model, batches), calibration, CALIBRATION_BATCH, quantize
    )
    _copy_metadata(model, quantized, "int8")
    return quantized


def _static_int8(model: onnx.ModelProto, feeds: list[dict], vnni: bool) -> onnx.ModelProto:
    """onnxruntime's recipe for x86 (module docstring), calibrated on `feeds`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="toolkit-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, str(fp32))
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(int8),
                _reader(feeds),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=not vnni,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:  # an operator the quantizer cannot handle, a bad graph...
            raise ToolkitError(f"INT8 quantization failed: {str(exc).strip()[:300]}") from exc
        return onnx.load(str(int8))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and arithmetic with fp32 input/output, so clients feed the same tensors."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    half = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    # The converter appends the input/output Casts at the end of the node list, which
    # onnx.checker rejects (nodes must be topologically sorted).
    half.topological_sort()
    _copy_metadata(model, half.model, "fp16")
    return half.model


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto, precision: str) -> None:
    # The quantizer and the converter rebuild the model; its self-description must survive,
    # and says which precision it is (a server holding both tells them apart by it).
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    target.metadata_props.add(key="precision", value=precision)
    target.doc_string = source.doc_string
    target.producer_name, target.producer_version = source.producer_name, source.producer_version


def int8_note(speedup_b1: float, speedup_b64: float, cpu: dict) -> str:
    """One honest sentence about whether INT8 pays off on this CPU, and the likely reason."""
    vnni = "has VNNI" if cpu.get("vnni") else "has no VNNI (avx512_vnni / avx_vnni)"
    speeds = f"×{speedup_b1:.2f} at batch 1, ×{speedup_b64:.2f} at batch 64 vs fp32"
    if speedup_b1 >= 1.0 and speedup_b64 >= 1.0:
        return f"INT8 is faster on this CPU ({speeds}); the CPU {vnni}."
    if not cpu.get("vnni"):
        why = (
            "without VNNI the u8×s8 dot products run on plain AVX2/AVX-512, and the "
            "quantize/dequantize steps cost more than they save"
        )
    else:
        why = (
            "the CPU has VNNI, but this model is so small that the quantize/dequantize "
            "steps around each layer cost more than the cheaper int8 arithmetic saves"
        )
    return f"INT8 is slower than fp32 on this CPU ({speeds}): {why}."


# --- verified, timed variants of an fp32 export ---------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A converted model, checked on the split and timed: its file, the report's section
    about it (under `name`) and its latency rows."""

    name: str  # "int8" or "fp16"
    file: str
    payload: bytes
    section: dict
    latency: list[dict]


def _check_and_time(
    model: onnx.ModelProto, fmt: str, runtime: str, split: Split, reference, plan: LatencyPlan
) -> tuple[bytes, dict, list[dict]]:
    """Check, run on the split and time a converted model: (bytes, comparison, latency rows)."""
    check_model(model, f"the {fmt} model")
    payload = model.SerializeToString()
    session = make_session(payload, runtime, plan.threads)
    versus = compare(reference, onnx_outputs(session, split.images, description=fmt), split.labels)
    measured = measure_onnx(
        session, plan.input_shape, runtime, plan.threads, plan.timing, images=plan.images
    )
    return payload, versus, plan.rows(fmt, len(payload), versus["onnx_accuracy"], measured)


def recalibrate_int8(
    quantized: onnx.ModelProto, val: Split, split: Split, plan: LatencyPlan
) -> tuple[onnx.ModelProto, dict | None]:
    """The INT8 model with its own calibrator, fitted on its val logits, and the calibration
    section of its report (the val record and the figures on `split`); unchanged, with None,
    when there is no val split to fit on."""
    if len(val) == 0:
        return quantized, None
    session = make_session(quantized.SerializeToString(), CPU, plan.threads)
    val_logits, _ = onnx_outputs(session, val.images, description="onnx int8 · val")
    record = fit_calibration(torch.from_numpy(val_logits), val.labels)
    recalibrated = with_calibrator(
        quantized, Calibrator.from_record(record), calibration_metadata(record)
    )
    session = make_session(recalibrated.SerializeToString(), CPU, plan.threads)
    logits, _ = onnx_outputs(session, split.images, description="onnx int8 · calibrated")
    report = calibration_report(torch.from_numpy(logits), split.labels, record)
    return recalibrated, {"fitted": record, "test": report}


def int8_variant(
    model: onnx.ModelProto,
    train_images: torch.Tensor,
    val: Split,
    split: Split,
    reference,
    fp32: dict,
    cpu: dict,
    plan: LatencyPlan,
) -> Variant:
    """Quantize (calibrated on `train_images`), give it its own calibrator (fitted on `val`),
    compare with torch on the split, time on the CPU. `fp32` is the fp32 model's
    verification plus its "latency" rows, to compare with."""
    calibration = calibration_images(train_images)
    quantized = quantize_int8(model, calibration, vnni=cpu["vnni"])
    quantized, probabilities = recalibrate_int8(quantized, val, split, plan)
    payload, versus, rows = _check_and_time(quantized, "onnx int8", CPU, split, reference, plan)
    speedups = {
        f"batch_{b}": _mean_ms(fp32["latency"], "onnx fp32", b) / _mean_ms(rows, "onnx int8", b)
        for b in BATCH_SIZES
    }
    delta = versus["onnx_accuracy"] - fp32["onnx_accuracy"]
    if delta < -0.01:
        log.warning("INT8 loses %.2f accuracy points on %s", -100 * delta, fp32["split"])
    size_mb = len(payload) / 1e6
    note = int8_note(speedups["batch_1"], speedups[f"batch_{BATCH_SIZES[-1]}"], cpu)
    if len(payload) > fp32["size_bytes"]:
        note += (
            " It is larger than the fp32 file: an If's branches (selective TTA's views) stayed "
            "in fp32, with their own copy of each weight (the log says why)."
        )
    section = {
        "file": INT8_FILE,
        "size_mb": size_mb,
        "size_ratio": len(payload) / fp32["size_bytes"],
        "accuracy": versus["onnx_accuracy"],
        "fp32_accuracy": fp32["onnx_accuracy"],
        "accuracy_delta": delta,
        "top1_agreement_vs_torch": versus["top1_agreement"],
        "max_abs_logit_diff_vs_torch": versus["max_abs_logit_diff"],
        "calibration_images": len(calibration),
        "reduce_range": not cpu["vnni"],
        "speedup_vs_fp32": speedups,
        "faster_than_fp32": min(speedups.values()) >= 1.0,
        "cpu_vnni": cpu["vnni"],
        "note": note,
        # Its own calibrator (None without val: the fp32 model's, T = 1); package_run
        # serves it with these.
        "calibration": probabilities,
    }
    return Variant("int8", INT8_FILE, payload, section, rows)


def fp16_variant(
    model: onnx.ModelProto, split: Split, reference, fp32: dict, plan: LatencyPlan
) -> Variant:
    """fp16 copy, compared with torch on the split and timed on the CUDA provider."""
    payload, versus, rows = _check_and_time(
        convert_fp16(model), "onnx fp16", CUDA, split, reference, plan
    )
    section = {
        "file": FP16_FILE,
        "size_mb": len(payload) / 1e6,
        "runtime": CUDA,
        "accuracy": versus["onnx_accuracy"],
        "accuracy_delta": versus["onnx_accuracy"] - fp32["onnx_accuracy"],
        "top1_agreement_vs_torch": versus["top1_agreement"],
        "max_abs_logit_diff_vs_torch": versus["max_abs_logit_diff"],
    }
    return Variant("fp16", FP16_FILE, payload, section, rows)


def _mean_ms(rows: list[dict], fmt: str, batch: int) -> float:
    """Mean latency of `fmt` on the onnxruntime CPU provider at `batch`: the mean, not the
    p50, since a selective TTA graph's p50 is that of the images it is sure of."""
    return next(
        r["mean_ms"]
        for r in rows
        if r["format"] == fmt and r["runtime"] == CPU and r["batch"] == batch
    )
