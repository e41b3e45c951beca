"""ONNX export: parity for every registered model, metadata round trip, accuracy kept through
export, INT8 and Triton outputs, bench, bad inputs and the CLI verbs.

Latencies are measured with a tiny timing (they are only checked to be positive numbers);
everything else is compared with values computed here independently of the export code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import toolkit.export.bench
import toolkit.export.exporter
import toolkit.export.onnx_graph
from serving.preprocess import PREPROCESSING
from tests.synthetic import write_image_folder
from toolkit.cli import app
from toolkit.data import DataOptions, load_data
from toolkit.errors import ToolkitError
from toolkit.evaluate import evaluate_run
from toolkit.evaluate.calibration import fit_temperature
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export import REQUIRED_AGREEMENT, export_run
from toolkit.export.bench import (
    CPU,
    CUDA,
    Timing,
    bench_models,
    cpu_info,
    cuda_provider_usable,
    input_batches,
    make_session,
    measure_onnx,
)
from toolkit.export.onnx_graph import (
    ExportHead,
    calibration_metadata,
    check_model,
    count_macs,
    load_onnx,
    precision,
    read_metadata,
    torch_to_onnx,
)
from toolkit.export.quantize import convert_fp16
from toolkit.models import MODELS, count_parameters, create_model
from toolkit.run.checkpoint import Checkpoint
from toolkit.train.batches import Normalizer
from toolkit.train.engine import evaluate_split

FAST = Timing(warmup=1, min_runs=2, max_runs=2, budget_s=0.0)
OPTION_VALUES = {"dropout": 0.2, "batch_norm": True, "width": 8}
META_KEYS = {
    "classes",
    "mean",
    "std",
    "input_size",
    "dataset",
    "model",
    "model_options",
    "num_params",
    "val_accuracy",
    "toolkit_version",
    "preprocessing",
    "temperature",
    "calibrated_on",
    "calibration_method",
    "calibration_description",
    "calibrator",
    "confidence_threshold",
    "confidence_target",
}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-data")


def make_run(
    run_dir: Path,
    data_dir: Path,
    data_root: Path,
    model: str,
    options: dict,
    image_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A run folder holding a freshly initialised model as best.pt (no training needed).

    BatchNorm gets non-trivial running statistics first, so folding it into the graph matters.
    """
    data = DataOptions(data_dir=str(data_dir), data_root=str(data_root), image_size=image_size)
    bundle = load_data(data, seed=0)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=10, input_size=bundle.image_size, **options)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, bundle.image_size, bundle.image_size) * 1.5 + 0.3)
    net.eval()
    config = {"model": model, "data": asdict(data), "seed": 0}
    ckpt = Checkpoint(
        model={
            "name": model,
            "options": options,
            "num_classes": 10,
            "input_size": bundle.image_size,
            "in_channels": 3,
        },
        dataset=bundle.info(),
        config=config,
        epoch=1,
        metrics={},
        best_val_acc=0.25,
        best_epoch=1,
        history=[],
        state_dict=net.state_dict(),
        optimizer={},
        scheduler={},
    )
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "best.pt").write_bytes(ckpt.to_bytes())
    return run_dir


def calibrator_of(session: ort.InferenceSession) -> Calibrator:
    props = session.get_modelmeta().custom_metadata_map
    return Calibrator.from_record({"calibrator": json.loads(props["calibrator"])})


def torch_macs(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Conv/Linear multiply-accumulates per image, counted with forward hooks (independent of
    the ONNX-graph count under test)."""
    total = 0

    def conv(module, _inputs, out):
        nonlocal total
        total += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear(module, _inputs, out):
        nonlocal total
        total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(conv) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [
        m.register_forward_hook(linear) for m in net.modules() if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        net.eval()(torch.rand(1, *shape))
    for hook in hooks:
        hook.remove()
    return total


def ort_predict(path: Path, images: torch.Tensor) -> np.ndarray:
    """Top-1 predictions of an ONNX file for uint8 images, the way a client would compute them."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images.float().div(255).numpy()})[0]
    return logits.argmax(1)


def model_config_class():
    """Triton's ModelConfig message: tritonclient's when installed, else the same fields
    (names, numbers, types) declared here, so the text-format parse is equally strict."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2.ModelConfig
    except Exception:  # tritonclient[grpc] is optional (it pins protobuf < 7)
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="test_model_config.proto", package="inference", syntax="proto3"
    )
    data_type = fdp.enum_type.add(name="DataType")
    for number, name in enumerate(
        [
            "TYPE_INVALID",
            "TYPE_BOOL",
            "TYPE_UINT8",
            "TYPE_UINT16",
            "TYPE_UINT32",
            "TYPE_UINT64",
            "TYPE_INT8",
            "TYPE_INT16",
            "TYPE_INT32",
            "TYPE_INT64",
            "TYPE_FP16",
            "TYPE_FP32",
            "TYPE_FP64",
            "TYPE_STRING",
            "TYPE_BF16",
        ]
    ):
        data_type.value.add(name=name, number=number)
    F = descriptor_pb2.FieldDescriptorProto

    def message(name, *fields):
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
        return msg

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    model_input = message(
        "ModelInput",
        ("name", 1, F.TYPE_STRING, one, None),
        ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("format", 3, F.TYPE_ENUM, one, ".inference.ModelInput.Format"),
        ("dims", 4, F.TYPE_INT64, many, None),
    )
    fmt = model_input.enum_type.add(name="Format")
    for number, name in enumerate(["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]):
        fmt.value.add(name=name, number=number)
    message(
        "ModelOutput",
        ("name", 1, F.TYPE_STRING, one, None),
        ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("dims", 3, F.TYPE_INT64, many, None),
        ("label_filename", 4, F.TYPE_STRING, one, None),
    )
    message(
        "ModelDynamicBatching",
        ("preferred_batch_size", 1, F.TYPE_INT32, many, None),
        ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, None),
    )
    message(
        "ModelConfig",
        ("name", 1, F.TYPE_STRING, one, None),
        ("platform", 2, F.TYPE_STRING, one, None),
        ("max_batch_size", 4, F.TYPE_INT32, one, None),
        ("input", 5, F.TYPE_MESSAGE, many, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, many, ".inference.ModelOutput"),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


# --- every registered model ------------------------------------------------------------------

VARIANTS = [(name, {}) for name in MODELS] + [
    (name, {o: OPTION_VALUES[o] for o in entry.options})
    for name, entry in MODELS.items()
    if entry.options
]


@pytest.mark.parametrize(
    ("model", "options"), VARIANTS, ids=[f"{m}-{'-'.join(o) or 'default'}" for m, o in VARIANTS]
)
def test_every_registered_model_exports_with_parity(
    tmp_path, cifar_folder, data_root, model, options
):
    run = make_run(tmp_path / "run", cifar_folder, data_root, model, options)
    report = export_run(run, timing=FAST)

    v = report["verification"]
    assert v["split"] == "test" and v["images"] == 100
    assert v["top1_agreement"] >= REQUIRED_AGREEMENT and v["passed"]
    assert v["max_abs_logit_diff"] < 1e-4
    assert v["onnx_accuracy"] == pytest.approx(v["torch_accuracy"], abs=1 - REQUIRED_AGREEMENT)

    ckpt = Checkpoint.load(run / "best.pt")
    net = ckpt.build_net()
    assert report["stats"]["params"] == count_parameters(net)
    assert report["stats"]["macs_per_image"] == torch_macs(net, (3, 32, 32))

    path = run / "export" / "model.onnx"
    model_proto = onnx.load(str(path))
    onnx.checker.check_model(model_proto, full_check=True)
    image = model_proto.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model_proto.graph.output] == ["logits", "probs"]

    # Any batch size works and gives the torch classifier's outputs for raw [0, 1] input.
    x = np.random.default_rng(1).random((5, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"image": x})
    with torch.no_grad():
        expected = ckpt.build_classifier()(torch.from_numpy(x)).numpy()
    assert logits.shape == probs.shape == (5, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        probs,
        calibrator_of(session).probs(torch.from_numpy(expected)).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_macs_match_a_hand_count(tmp_path, cifar_folder, data_root):
    # net: conv 3->16 at 32², conv 16->8 at 16², fc 512->32, fc 32->10.
    hand = 32 * 32 * 16 * 3 * 9 + 16 * 16 * 8 * 16 * 9 + 512 * 32 + 32 * 10
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    report = export_run(run, timing=FAST)
    assert report["stats"]["macs_per_image"] == hand == 753_984


def test_non_default_input_size_reaches_graph_and_metadata(tmp_path, cifar_folder, data_root):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {}, image_size=40)
    report = export_run(run, timing=FAST)
    model = onnx.load(str(run / "export" / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 40, 40]
    assert json.loads(read_metadata_raw(model)["input_size"]) == [40, 40]
    assert report["verification"]["top1_agreement"] == 1.0


def read_metadata_raw(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# --- metadata --------------------------------------------------------------------------------


def test_metadata_round_trips_through_onnx_ort_and_sidecar(tmp_path, cifar_folder, data_root):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "lenet5", {"batch_norm": True})
    (run / "eval").mkdir()
    ckpt = Checkpoint.load(run / "best.pt")
    evaluation = {
        "split": "test",
        "accuracy": 0.4375,
        "checkpoint_epoch": 1,
        "dataset": {"fingerprint": ckpt.fingerprint},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(evaluation))
    export_run(run, timing=FAST)
    path = run / "export" / "model.onnx"

    raw = read_metadata_raw(onnx.load(str(path)))
    assert set(raw) == META_KEYS | {"test_accuracy"}
    assert all(isinstance(v, str) for v in raw.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == raw

    decoded = read_metadata(onnx.load(str(path)))
    assert decoded == json.loads((run / "export" / "model.json").read_text())
    assert decoded["classes"] == ckpt.dataset["classes"]
    assert decoded["mean"] == ckpt.dataset["mean"] and decoded["std"] == ckpt.dataset["std"]
    assert decoded["input_size"] == [32, 32]
    assert raw["dataset"] == "cifar10" and raw["model"] == "lenet5"
    assert decoded["model_options"] == {"batch_norm": True}
    assert decoded["num_params"] == count_parameters(ckpt.build_net())
    assert decoded["test_accuracy"] == 0.4375 and raw["test_accuracy"] == "0.4375"
    assert decoded["val_accuracy"] == 0.25
    assert decoded["preprocessing"] == PREPROCESSING
    assert decoded["toolkit_version"] == ckpt.toolkit_version

    # The graph normalises with exactly the mean/std the metadata states.
    x = np.random.default_rng(2).random((4, 3, 32, 32), dtype=np.float32)
    mean = torch.tensor(decoded["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(decoded["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ckpt.build_net()((torch.from_numpy(x) - mean) / std).numpy()
    np.testing.assert_allclose(session.run(["logits"], {"image": x})[0], expected, atol=1e-4)


@pytest.mark.parametrize(
    "changes",
    [
        None,
        {"split": "val"},
        {"checkpoint_epoch": 7},  # an older best.pt
        {"dataset": {"fingerprint": "other data"}},
    ],
)
def test_test_accuracy_only_from_a_test_split_evaluation(
    tmp_path, cifar_folder, data_root, changes
):
    """Only an evaluation of this best.pt, on this data's test split, is published; each
    case differs from a current evaluation in one field."""
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    if changes is not None:
        (run / "eval").mkdir()
        current = {
            "split": "test",
            "accuracy": 0.9,
            "checkpoint_epoch": 1,
            "dataset": {"fingerprint": Checkpoint.load(run / "best.pt").fingerprint},
        }
        (run / "eval" / "metrics.json").write_text(json.dumps({**current, **changes}))
    report = export_run(run, timing=FAST)
    assert "test_accuracy" not in read_metadata_raw(onnx.load(str(run / "export" / "model.onnx")))
    assert set(report["metadata"]) == META_KEYS


def test_export_and_evaluate_refuse_data_changed_since_training(tmp_path, data_root):
    """One policy for a run's data: both steps refuse other images than the model was
    trained on, naming the fix, rather than report figures about other data."""
    folder = write_image_folder(tmp_path / "data", per_class={"train": 6, "test": 2})
    run = make_run(tmp_path / "run", folder, data_root, "net", {})
    image = sorted((folder / "test" / "cat").glob("*.png"))[0]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    for step in (lambda: export_run(run, timing=FAST), lambda: evaluate_run(run, device="cpu")):
        with pytest.raises(ToolkitError, match="is not the data .* was trained on.*restore"):
            step()
    assert not (run / "export" / "model.onnx").exists() and not (run / "eval").exists()


def test_verifies_on_the_carved_test_split_when_the_source_has_none(tmp_path, data_root):
    folder = write_image_folder(tmp_path / "train-only", per_class={"train": 20})
    run = make_run(tmp_path / "run", folder, data_root, "net", {})
    report = export_run(run, timing=FAST)
    data = load_data(DataOptions(data_dir=str(folder), data_root=str(data_root)), seed=0)
    assert data.test_is_carved and data.val_is_carved
    assert report["verification"]["split"] == "test"
    assert report["verification"]["images"] == len(data.test) == 20  # 10 % of 20 per class


# --- a trained run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> tuple[dict, Path, Path]:
    """The trained `net` exported once with --int8 and --triton: (report, export dir, triton)."""
    root = tmp_path_factory.mktemp("exported")
    report = export_run(
        trained_run, root / "export", int8=True, triton_dir=root / "triton", timing=FAST
    )
    return report, root / "export", root / "triton"


def test_trained_model_keeps_its_accuracy_through_export(trained_run, exported):
    report, out, _ = exported
    ckpt = Checkpoint.load(trained_run / "best.pt")
    config = json.loads((trained_run / "config.json").read_text())
    data = load_data(DataOptions(**config["data"]), seed=config["seed"])
    _, torch_acc = evaluate_split(
        ckpt.build_net(),
        data.test,
        Normalizer(data.mean, data.std, torch.device("cpu")),
        torch.device("cpu"),
    )
    onnx_acc = float(
        (ort_predict(out / "model.onnx", data.test.images) == data.test.labels.numpy()).mean()
    )

    v = report["verification"]
    assert v["split"] == "test" and v["images"] == len(data.test)
    assert v["torch_accuracy"] == pytest.approx(torch_acc)
    assert v["onnx_accuracy"] == pytest.approx(onnx_acc) == pytest.approx(torch_acc)
    assert v["top1_agreement"] == 1.0
    assert onnx_acc > 0.5  # far above chance (0.1): the test sees a real model, not noise
    assert json.loads((out / "export-report.json").read_text()) == json.loads(json.dumps(report))


def test_report_latency_rows_and_threads(exported):
    report, _, _ = exported
    rows = report["latency"]
    seen = {(r["format"], r["runtime"], r["batch"]) for r in rows}
    assert {
        ("torch eager", "torch CPU", 1),
        ("torch eager", "torch CPU", 64),
        ("onnx fp32", "ORT CPU", 1),
        ("onnx fp32", "ORT CPU", 64),
        ("onnx int8", "ORT CPU", 1),
        ("onnx int8", "ORT CPU", 64),
    } <= seen
    for row in rows:
        assert row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"] and row["img_per_s"] > 0
        assert row["runs"] == FAST.min_runs and row["threads"] == torch.get_num_threads()
        assert row["mean_ms"] > 0
    assert report["threads"]["onnxruntime_intra_op"] == torch.get_num_threads()
    assert report["stats"]["size_mb"] == pytest.approx(
        Path(report["export_dir"], "model.onnx").stat().st_size / 1e6
    )


def test_latency_takes_real_images_in_turn_and_noise_only_without_them():
    images = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
    first = [batch[:, 0, 0, 0].tolist() for batch in input_batches(2, (3, 2, 2), images)]
    assert first == [[0, 12], [24, 36]]
    wrapped = input_batches(7, (3, 2, 2), images)  # fewer images than a batch: around again
    assert [b[:, 0, 0, 0].tolist() for b in wrapped] == [[0, 12, 24, 36, 48, 0, 12]]
    (noise,) = input_batches(2, (3, 2, 2))
    assert noise.shape == (2, 3, 2, 2) and noise.min() >= 0 and noise.max() < 1

    class Recorder:  # a session that remembers what it was fed
        fed: list[float] = []

        def run(self, _outputs, feed):
            self.fed.append(float(feed["image"][0, 0, 0, 0]))

    once_each = Timing(warmup=0, min_runs=6, max_runs=6, budget_s=0.0)
    measure_onnx(Recorder(), (3, 2, 2), CPU, 1, once_each, batches=(1,), images=images)
    assert Recorder.fed == [0, 12, 24, 36, 48, 0]  # every image in turn, not one again and again


def test_int8_report_fields(trained_run, exported):
    report, out, _ = exported
    q, fp32 = report["int8"], report["verification"]
    int8_path = out / "model.int8.onnx"
    int8_model = onnx.load(str(int8_path))
    assert precision(int8_model) == "int8"
    assert q["size_mb"] == pytest.approx(int8_path.stat().st_size / 1e6)
    assert q["size_ratio"] < 0.6  # int8 weights: well under the fp32 file
    # Its own calibration, fitted on its own val logits (not the fp32 model's).
    own = q["calibration"]["fitted"]
    assert read_metadata(int8_model) == {
        **report["metadata"],
        **calibration_metadata(own),
        "precision": "int8",
    }
    assert count_macs(int8_model) == report["stats"]["macs_per_image"]

    config = json.loads((trained_run / "config.json").read_text())
    data = load_data(DataOptions(**config["data"]), seed=config["seed"])
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    val_logits, val_probs = session.run(None, {"image": data.val.images.float().div(255).numpy()})
    assert own["temperature"] == fit_temperature(torch.from_numpy(val_logits), data.val.labels)
    assert own["val_images"] == len(data.val)
    expected = Calibrator.from_record(own).probs(torch.from_numpy(val_logits)).numpy()
    np.testing.assert_allclose(val_probs, expected, atol=1e-5)
    assert q["calibration"]["test"]["method"] == own["method"]
    int8_acc = float((ort_predict(int8_path, data.test.images) == data.test.labels.numpy()).mean())
    assert q["accuracy"] == pytest.approx(int8_acc)
    assert q["fp32_accuracy"] == fp32["onnx_accuracy"]
    assert q["accuracy_delta"] == pytest.approx(int8_acc - fp32["onnx_accuracy"])
    assert q["accuracy"] >= fp32["onnx_accuracy"] - 0.05
    assert q["calibration_images"] == min(256, len(data.train))

    mean = {
        (r["format"], r["batch"]): r["mean_ms"]
        for r in report["latency"]
        if r["runtime"] == "ORT CPU"
    }
    for batch in (1, 64):
        expected = mean[("onnx fp32", batch)] / mean[("onnx int8", batch)]
        assert q["speedup_vs_fp32"][f"batch_{batch}"] == pytest.approx(expected)
    assert q["faster_than_fp32"] == (min(q["speedup_vs_fp32"].values()) >= 1.0)
    assert ("slower" in q["note"]) != q["faster_than_fp32"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    assert report["cpu"]["vnni"] == q["cpu_vnni"] == vnni == (not q["reduce_range"])


def test_triton_repository_layout_and_config_parses(exported):
    from google.protobuf import text_format

    report, out, triton = exported
    name = report["triton"]["model_name"]
    assert name == "cifar10_net"
    folder = triton / name
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_class()())
    assert config.name == name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    (image,) = config.input
    assert image.name == "image" and list(image.dims) == [3, 32, 32]  # no batch dimension
    assert [o.name for o in config.output] == ["logits", "probs"]
    assert all(list(o.dims) == [10] for o in config.output)
    fp32 = (
        type(config)
        .DESCRIPTOR.fields_by_name["input"]
        .message_type.fields_by_name["data_type"]
        .enum_type.values_by_name["TYPE_FP32"]
        .number
    )
    assert image.data_type == fp32 and all(o.data_type == fp32 for o in config.output)
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    labels = (folder / config.output[1].label_filename).read_text().splitlines()
    assert labels == report["metadata"]["classes"]


def test_bench_models_on_an_export_folder(exported):
    report, out, _ = exported
    rows = bench_models([out], timing=FAST)
    assert {(Path(r["file"]).name, r["format"]) for r in rows} == {
        ("model.onnx", "onnx fp32"),
        ("model.int8.onnx", "onnx int8"),
    }
    assert {r["batch"] for r in rows} == {1, 64}
    for row in rows:
        assert row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"] and row["img_per_s"] > 0
        assert row["macs"] == report["stats"]["macs_per_image"]
        assert row["params"] == report["metadata"]["num_params"] and row["model"] == "net"
        assert row["accuracy"] is None  # the synthetic run was never `toolkit evaluate`d


def test_fp16_conversion_keeps_fp32_io_and_metadata(exported):
    _, out, _ = exported
    fp32 = onnx.load(str(out / "model.onnx"))
    half = convert_fp16(fp32)
    check_model(half)
    assert precision(half) == "fp16"
    for value in (*half.graph.input, *half.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_metadata(half) == {**read_metadata(fp32), "precision": "fp16"}
    assert count_macs(half) == count_macs(fp32)
    # onnxruntime's CPU provider runs fp16 graphs too: the numbers must stay close.
    x = np.random.default_rng(3).random((16, 3, 32, 32), dtype=np.float32)
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"image": x}
        )[0]
        for m in (fp32, half)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=0.05)
    assert outputs[1].dtype == np.float32


# --- bad input -------------------------------------------------------------------------------


def test_run_without_best_pt(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ToolkitError, match="best.pt"):
        export_run(tmp_path, timing=FAST)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff" * 10, "half"])
def test_bench_rejects_corrupt_models(tmp_path, exported, content):
    _, out, _ = exported
    bad = tmp_path / "model.onnx"
    good = (out / "model.onnx").read_bytes()
    bad.write_bytes(good[: len(good) // 2] if content == "half" else content)
    with pytest.raises(ToolkitError, match="model.onnx"):
        bench_models([bad], timing=FAST)
    with pytest.raises(ToolkitError, match="model.onnx"):
        load_onnx(bad)


def test_bench_rejects_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        bench_models([tmp_path / "nope.onnx"])
    with pytest.raises(ToolkitError, match="no .onnx files"):
        bench_models([tmp_path])


def test_unwritable_output_folder(tmp_path, cifar_folder, data_root):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ToolkitError, match="cannot write"):
        export_run(run, blocker / "export", timing=FAST)
    with pytest.raises(ToolkitError, match="--triton"):
        export_run(run, tmp_path / "out", triton_dir=blocker / "triton", timing=FAST)
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("opset", [99, 14, 24])
def test_opsets_this_installation_cannot_produce(tmp_path, cifar_folder, data_root, opset):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    with pytest.raises(ToolkitError, match=f"opset {opset}"):
        export_run(run, opset=opset, timing=FAST)
    assert not (run / "export").exists()


def test_a_supported_non_default_opset(tmp_path, cifar_folder, data_root):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    report = export_run(run, opset=15, timing=FAST)
    model = onnx.load(str(run / "export" / "model.onnx"))
    assert report["opset"] == 15
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {15}


class _BatchOfTwo(torch.nn.Module):
    """A forward that only works at the tracing batch size (view with a literal 2)."""

    def forward(self, image):
        logits = image.view(2, -1)[:, :10]
        return logits, logits.softmax(1)


class _NoOnnxOp(torch.nn.Module):
    """A forward using an operator torch.onnx has no ONNX function for."""

    def forward(self, image):
        logits = torch.kthvalue(image.flatten(1), 3, dim=1).values[:, None].expand(-1, 10)
        return logits, logits.softmax(1)


@pytest.mark.parametrize(
    "head, message",
    [
        (_BatchOfTwo(), "lost the dynamic batch dimension: .* only works at the example"),
        (_NoOnnxOp(), "ONNX export failed: DispatchError: No ONNX function found .*kthvalue"),
    ],
)
def test_exports_that_would_be_wrong_are_one_clear_error(head, message, capsys):
    with pytest.raises(ToolkitError, match=message) as info:
        torch_to_onnx(head, (3, 32, 32), 17)
    assert "\n" not in str(info.value)
    assert capsys.readouterr().err == ""  # torch.export's own dumps are kept quiet


@pytest.mark.skipif(cuda_provider_usable(), reason="a usable GPU makes --fp16 valid")
def test_fp16_without_a_gpu_is_a_clear_error(tmp_path, cifar_folder, data_root):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})
    with pytest.raises(ToolkitError, match="--fp16"):
        export_run(run, fp16=True, timing=FAST)
    assert not (run / "export").exists()


@pytest.mark.skipif(cuda_provider_usable(), reason="needs a machine without a usable GPU")
def test_a_cuda_session_never_silently_runs_on_the_cpu(exported):
    _, out, _ = exported
    # onnxruntime-gpu falls back to the CPU without a GPU; that must not be timed as "CUDA".
    with pytest.raises(
        ToolkitError, match="could not place the model on ORT CUDA|cannot load|no CUDA provider"
    ):
        make_session((out / "model.onnx").read_bytes(), CUDA, threads=1)
    assert toolkit.export.bench.runtimes() == [CPU]


def test_parity_failure_fails_loudly_and_writes_nothing(
    tmp_path, cifar_folder, data_root, monkeypatch
):
    run = make_run(tmp_path / "run", cifar_folder, data_root, "net", {})

    def export_another_model(head, shape, opset):
        # A drifted graph: same architecture, different weights.
        other = make_run(tmp_path / "other", cifar_folder, data_root, "net", {}, seed=7)
        drifted = ExportHead(Checkpoint.load(other / "best.pt").build_classifier())
        return torch_to_onnx(drifted, shape, opset)

    monkeypatch.setattr(toolkit.export.onnx_graph, "torch_to_onnx", export_another_model)
    with pytest.raises(ToolkitError, match="agree on only"):
        export_run(run, triton_dir=tmp_path / "triton", timing=FAST)
    assert not list((run / "export").glob("*"))  # not even a temporary file
    assert not (tmp_path / "triton").exists() or not list((tmp_path / "triton").rglob("*.onnx"))


def test_cpu_info_matches_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flag_lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
    flags = set(flag_lines[0].split(":", 1)[1].split())
    info = cpu_info()
    for flag in toolkit.export.bench.CPU_FLAGS:
        assert info[flag] == (flag in flags), flag
    assert info["vnni"] == bool({"avx512_vnni", "avx_vnni"} & flags)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_export_and_bench(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(toolkit.export.exporter, "DEFAULT_TIMING", FAST)
    monkeypatch.setattr(toolkit.export.bench, "DEFAULT_TIMING", FAST)
    runner = CliRunner()
    out = tmp_path / "cli-export"
    result = runner.invoke(app, ["export", str(trained_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.json", "export-report.json"}
    assert "100.00% top-1 agreement" in result.output and "ORT CPU" in result.output

    result = runner.invoke(app, ["bench", str(out / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "onnx fp32" in result.output and "ORT CPU" in result.output


def test_cli_bad_inputs_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "best.pt" in result.output
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08garbage")
    result = runner.invoke(app, ["bench", str(bad)])
    assert result.exit_code == 2 and "error" in result.output
