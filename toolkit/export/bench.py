"""Latency, throughput, size, parameters and MACs of exported models (and their torch source).

Every number is measured the same way for every runtime: warm-up calls first (excluded), then
timed calls until both a minimum count and a small time budget are reached; p50/p95 come from
those calls and throughput from their mean. Thread counts are pinned and recorded, because a
latency without its thread count cannot be compared with anything. An export times its models
on real images of the split it checks (input_batches), a file alone on uniform noise.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from toolkit.errors import ToolkitError
from toolkit.export.onnx_graph import (
    INPUT_NAME,
    count_initializer_params,
    count_macs,
    input_shape,
    load_onnx,
    precision,
    read_metadata,
)

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 64)
LATENCY_IMAGES = 256  # the real images an export's timings take in turn (input_batches)
CPU = "ORT CPU"  # onnxruntime's CPU execution provider
CUDA = "ORT CUDA"
TORCH = "torch CPU"  # eager mode
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Timing:
    """How long to measure: `warmup` untimed calls, then at least `min_runs` timed calls and
    more until `budget_s` seconds have passed (at most `max_runs`)."""

    warmup: int = 3
    min_runs: int = 10
    max_runs: int = 300
    budget_s: float = 0.25


DEFAULT_TIMING = Timing()


@dataclass(frozen=True)
class LatencyPlan:
    """How an export times its models (threads, per-image input shape, timing, the images fed)
    and the facts every latency row of that model repeats (model name, parameters, MACs per
    image)."""

    threads: int
    input_shape: tuple[int, ...]
    timing: Timing
    model: str
    params: int
    macs: int
    images: np.ndarray | None = None  # real images in [0, 1] (see input_batches), else noise

    def rows(self, fmt: str, size_bytes: int | None, accuracy: float, measured) -> list[dict]:
        """`measured` (latency_row dicts) with the static columns of `fmt` in front."""
        static = {
            "model": self.model,
            "format": fmt,
            "size_mb": None if size_bytes is None else size_bytes / 1e6,
            "params": self.params,
            "macs": self.macs,
            "accuracy": accuracy,
        }
        return [{**static, **row} for row in measured]


def time_calls(fn: Callable[[], Any], timing: Timing) -> list[float]:
    """Milliseconds per call of `fn`, warm-up calls excluded."""
    for _ in range(timing.warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < timing.max_runs and (
        len(times) < timing.min_runs or time.perf_counter() - start < timing.budget_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def input_batches(
    batch: int, input_shape: tuple[int, ...], images: np.ndarray | None = None
) -> list[np.ndarray]:
    """What a latency measurement feeds, one after the other: consecutive batches of real
    `images` (N×C×H×W float32 in [0, 1], wrapping around when there are fewer than a batch),
    else one batch of uniform noise. A graph whose work depends on its input (selective TTA
    runs its views only for the images it is unsure of) must be timed on what users send:
    noise takes one of its paths every time."""
    if images is None or len(images) == 0:
        return [np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)]
    count = max(1, len(images) // batch)
    index = np.arange(count * batch) % len(images)
    return [images[index[k * batch : (k + 1) * batch]] for k in range(count)]


def latency_row(times_ms: list[float], batch: int, runtime: str, threads: int) -> dict:
    """p50/p95/mean latency and throughput of one (runtime, batch) measurement."""
    mean_ms = float(np.mean(times_ms))
    return {
        "runtime": runtime,
        "batch": batch,
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "mean_ms": mean_ms,
        "img_per_s": batch * 1000.0 / mean_ms,
        "threads": threads,
        "runs": len(times_ms),
    }


# --- the machine -----------------------------------------------------------------------------


def cpu_info() -> dict:
    """CPU model, core count and the SIMD flags that decide whether INT8 pays off (VNNI)."""
    info: dict[str, Any] = {"model": "unknown", "logical_cores": os.cpu_count() or 1}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["model"] == "unknown":
                info["model"] = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: flags unknown rather than guessed
        log.info("no /proc/cpuinfo; CPU flags not recorded")
    info.update({flag: flag in flags for flag in CPU_FLAGS})
    info["vnni"] = info["avx512_vnni"] or info["avx_vnni"]
    return info


def default_threads() -> int:
    """The thread count both torch and onnxruntime get (torch's, which honours OMP_NUM_THREADS)."""
    return torch.get_num_threads()


@functools.lru_cache(maxsize=1)
def cuda_provider_usable() -> bool:
    """True when onnxruntime can really place a graph on a GPU, not just list the provider.

    onnxruntime-gpu lists CUDAExecutionProvider on machines without a GPU and silently falls
    back to the CPU, so a listed provider proves nothing: build a one-node session and look.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if not torch.cuda.is_available():  # cheap, and spares the CUDA loader's error spam
        return False
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8
    )
    try:
        make_session(probe.SerializeToString(), CUDA, threads=1)
    except ToolkitError:
        return False
    return True


def runtimes() -> list[str]:
    """onnxruntime providers to measure here: always the CPU, the GPU when one is usable."""
    return [CPU, CUDA] if cuda_provider_usable() else [CPU]


def make_session(model: bytes | str | Path, runtime: str, threads: int) -> ort.InferenceSession:
    """An onnxruntime session on `runtime` with `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: provider fallbacks are checked, not logged
    providers = ["CPUExecutionProvider"]
    if runtime == CUDA:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ToolkitError(
                f"onnxruntime {ort.__version__} has no CUDA provider here: install the "
                "onnxruntime-gpu wheel (`make install ORT=gpu`) on a machine with a GPU"
            )
        providers.insert(0, "CUDAExecutionProvider")
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # unsupported opset or IR version, op without a kernel...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ToolkitError(
            f"onnxruntime {ort.__version__} cannot load the model on {runtime}: {text[:300]}"
        ) from exc
    if session.get_providers()[0] != providers[0]:
        # onnxruntime falls back to the CPU silently; a row labelled CUDA must be CUDA.
        raise ToolkitError(f"onnxruntime could not place the model on {runtime}")
    return session


# --- measuring -------------------------------------------------------------------------------


def measure_onnx(
    session: ort.InferenceSession,
    input_shape: tuple[int, ...],
    runtime: str,
    threads: int,
    timing: Timing,
    batches: Iterable[int] = BATCH_SIZES,
    images: np.ndarray | None = None,
) -> list[dict]:
    """Latency rows of an onnxruntime session at each batch size (inputs: input_batches)."""
    rows = []
    for batch in batches:
        feeds = itertools.cycle(input_batches(batch, input_shape, images))
        times = time_calls(lambda f=feeds: session.run(None, {INPUT_NAME: next(f)}), timing)
        rows.append(latency_row(times, batch, runtime, threads))
    return rows


def measure_torch(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    threads: int,
    timing: Timing,
    batches: Iterable[int] = BATCH_SIZES,
    images: np.ndarray | None = None,
) -> list[dict]:
    """Latency rows of a torch module in eager mode on the CPU, no autograd (inputs:
    input_batches)."""
    module = module.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with torch.inference_mode():
            for batch in batches:
                feeds = itertools.cycle(
                    [torch.from_numpy(x) for x in input_batches(batch, input_shape, images)]
                )
                times = time_calls(lambda f=feeds: module(next(f)), timing)
                rows.append(latency_row(times, batch, TORCH, threads))
    finally:
        torch.set_num_threads(previous)
    return rows


# --- toolkit bench ---------------------------------------------------------------------------


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a folder stands for the .onnx files directly inside it."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.onnx"))
            if not found:
                raise ToolkitError(f"no .onnx files in '{path}'; export one with `toolkit export`")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ToolkitError(f"'{path}' does not exist; pass model.onnx files or export folders")
    return files


def describe(path: Path, model: onnx.ModelProto) -> dict:
    """The static columns of a bench row: name, precision, size, parameters, MACs, accuracy."""
    meta = read_metadata(model)
    return {
        "model": meta.get("model", path.stem),
        "file": str(path),
        "format": f"onnx {precision(model)}",
        "size_mb": path.stat().st_size / 1e6,
        "params": int(meta.get("num_params", count_initializer_params(model))),
        "macs": count_macs(model),
        "accuracy": meta.get("test_accuracy"),
    }


def bench_file(path: Path, timing: Timing | None = None, threads: int | None = None) -> list[dict]:
    """Rows for one ONNX file: every usable runtime × batch size."""
    model = load_onnx(path)
    static = describe(path, model)
    shape = input_shape(model)
    threads = threads or default_threads()
    rows = []
    for runtime in runtimes():
        session = make_session(path, runtime, threads)
        for row in measure_onnx(session, shape, runtime, threads, timing or DEFAULT_TIMING):
            rows.append({**static, **row})
    return rows


def bench_models(paths: list[Path], timing: Timing | None = None) -> list[dict]:
    """`toolkit bench`: latency/throughput rows for a set of exported models."""
    rows: list[dict] = []
    for path in expand_paths(paths):
        log.info("benchmarking %s", path)
        rows += bench_file(path, timing)
    return rows
