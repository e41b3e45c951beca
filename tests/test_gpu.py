"""The CUDA paths: autocast on a GPU, fp16 loss scaling, torch.compile, GPU/CPU agreement
and onnxruntime's CUDA provider. Skipped where no GPU is visible (CI); a session lent one
runs `python -m pytest -m gpu`.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.training import tiny_config
from toolkit.data import DataOptions, load_data
from toolkit.export import export_run
from toolkit.export.bench import CUDA, cuda_provider_usable
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.train.batches import Normalizer
from toolkit.train.engine import predict_logits
from toolkit.train.trainer import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _trained(folder, tmp_path, **overrides):
    run = fit(tiny_config(folder, tmp_path, device="cuda", **overrides), run_dir=tmp_path / "run")
    return run.run_dir


def _assert_plain_fp32_checkpoint(run) -> None:
    """Loadable on the CPU, fp32, no compile/DDP wrapper names."""
    ckpt = Checkpoint.load(run / "last.pt")
    state = ckpt.state_dict
    assert all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in state.values())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    ckpt.build_net()


def test_auto_precision_trains_on_the_gpu(cifar_folder, tmp_path):
    run = _trained(cifar_folder, tmp_path)
    engine = json.loads((run / "config.json").read_text())["engine"]
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert (engine["device"], engine["amp"]) == ("cuda", expected)
    assert engine["cudnn_benchmark"] is True
    history = read_metrics(run)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    _assert_plain_fp32_checkpoint(run)


def test_fp16_trains_with_loss_scaling(cifar_folder, tmp_path):
    run = _trained(cifar_folder, tmp_path, amp="fp16", epochs=1)
    assert json.loads((run / "config.json").read_text())["engine"]["amp"] == "fp16"
    assert torch.isfinite(torch.tensor(read_metrics(run)[0]["train_loss"]))
    _assert_plain_fp32_checkpoint(run)


def test_compile_on_the_gpu_keeps_plain_checkpoints(cifar_folder, tmp_path):
    run = _trained(cifar_folder, tmp_path, compile=True, epochs=1)
    _assert_plain_fp32_checkpoint(run)


def test_gpu_and_cpu_predict_alike(trained_run, cifar_folder):
    """The same checkpoint evaluated on both devices: what `evaluate` reports on a GPU is
    what the CPU (and so the ONNX export) gives."""
    net = Checkpoint.load(trained_run / "best.pt").build_net()
    data = load_data(DataOptions(data_dir=str(cifar_folder)))
    logits = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        normalize = Normalizer(data.mean, data.std, device)
        logits[name] = predict_logits(net.to(device), data.test.images, normalize, device)
    agree = (logits["cpu"].argmax(1) == logits["cuda"].argmax(1)).float().mean().item()
    assert agree >= 0.99
    assert torch.allclose(logits["cpu"], logits["cuda"], atol=1e-2)  # TF32 convolutions


@pytest.mark.skipif(not cuda_provider_usable(), reason="onnxruntime's CUDA provider is not usable")
def test_export_measures_and_verifies_the_cuda_provider(trained_run, tmp_path):
    report = export_run(trained_run, tmp_path / "export", fp16=True)
    assert any(row["runtime"] == CUDA for row in report["latency"])
    assert report["verification"]["top1_agreement"] == 1.0  # fp32 on the CPU provider
    assert report["fp16"]["top1_agreement_vs_torch"] >= 0.99
