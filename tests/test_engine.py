"""The fast engine: AMP resolution, torch.compile, channels_last, evaluation batches, batch
augmentation, the resnet9 model and its recipe."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

import toolkit.train.engine
import toolkit.train.setup
import toolkit.train.trainer
from tests.training import tiny_config as shared_tiny_config
from toolkit.data import DataOptions, Split, load_data
from toolkit.errors import ToolkitError
from toolkit.models import count_parameters, create_model
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import read_metrics
from toolkit.train import recipes
from toolkit.train.batches import BatchAugment, Normalizer, epoch_batches
from toolkit.train.config import TrainConfig
from toolkit.train.engine import StepOptions, predict_logits, train_one_epoch
from toolkit.train.fit_data import steps_per_epoch
from toolkit.train.optim import lr_factor
from toolkit.train.precision import Precision, resolve_amp
from toolkit.train.trainer import fit

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny_config(folder, tmp_path, **overrides) -> TrainConfig:
    """tests.training's tiny config, one epoch long unless overridden."""
    return shared_tiny_config(folder, tmp_path, **{"epochs": 1, **overrides})


# --- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, device, bf16_supported, expected",
    [
        ("auto", CPU, True, ("bf16", torch.bfloat16)),  # AVX512-BF16 / AMX
        ("auto", CPU, False, ("off", None)),  # emulated bf16 would be slower than fp32
        ("auto", CUDA, True, ("bf16", torch.bfloat16)),
        ("auto", CUDA, False, ("fp16", torch.float16)),  # pre-Ampere GPUs: fp16 + scaler
        ("off", CUDA, True, ("off", None)),
        ("bf16", CPU, True, ("bf16", torch.bfloat16)),  # asked for explicitly: allowed
        ("bf16", CUDA, False, ("bf16", torch.bfloat16)),
        ("fp16", CUDA, True, ("fp16", torch.float16)),
    ],
)
def test_amp_resolution(mode, device, bf16_supported, expected):
    precision = resolve_amp(mode, device, bf16_supported=bf16_supported)
    assert (precision.name, precision.dtype) == expected


def test_amp_refuses_fp16_on_the_cpu_and_unknown_modes():
    with pytest.raises(ToolkitError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", CPU)
    with pytest.raises(ToolkitError, match="auto, off, bf16, fp16"):
        resolve_amp("fp8", CUDA)


def test_only_fp16_gets_an_enabled_grad_scaler():
    assert not Precision("bf16", torch.bfloat16).grad_scaler(CUDA).is_enabled()
    assert not Precision("off").grad_scaler(CPU).is_enabled()
    with warnings.catch_warnings():  # "CUDA is not available" on a machine without a GPU
        warnings.simplefilter("ignore")
        scaler = Precision("fp16", torch.float16).grad_scaler(CUDA)
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled() == torch.cuda.is_available()  # GradScaler disables itself


def test_bf16_autocast_really_runs_the_convolutions_in_bf16():
    torch.manual_seed(0)
    net = create_model("net")
    dtypes = []
    net[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    split = Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) % 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = train_one_epoch(
        net,
        split,
        Normalizer([0.5] * 3, [0.25] * 3, CPU),
        optimizer,
        scheduler,
        StepOptions(batch_size=16, precision=Precision("bf16", torch.bfloat16)),
        generator=torch.Generator().manual_seed(0),
        device=CPU,
    )
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay fp32
    assert result.loss > 0 and torch.isfinite(torch.tensor(result.loss))


def test_config_json_records_the_resolved_engine(cifar_folder, tmp_path):
    run = fit(tiny_config(cifar_folder, tmp_path, amp="bf16"), run_dir=tmp_path / "run").run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "bf16" and config["compile"] is False
    engine = config["engine"]
    assert (engine["amp"], engine["compile"], engine["world_size"]) == ("bf16", False, 1)
    assert engine["channels_last"] is True and engine["cudnn_benchmark"] is False
    assert engine["heap_kept"] is (sys.platform == "linux")
    assert engine["device"] == "cpu" and engine["distributed_backend"] is None
    assert engine["eval_batch_size"] == 256  # the CPU's (engine.eval_batch_size)
    ckpt = Checkpoint.load(run / "last.pt")
    assert all(t.dtype != torch.bfloat16 for t in ckpt.state_dict.values())


# --- torch.compile ---------------------------------------------------------------------------


def _fit_compiled(config, run_dir):
    """fit with --compile, skipping the test where torch.compile cannot run here."""
    try:
        return fit(config, run_dir=run_dir)
    except ToolkitError as exc:
        if "torch.compile failed" in str(exc):
            pytest.skip(f"torch.compile does not work on this machine: {exc}")
        raise


def test_compiled_run_trains_the_same_and_saves_plain_checkpoints(
    cifar_folder, tmp_path, monkeypatch
):
    """The compile path with the 'eager' backend (dynamo tracing, no C++ code generation):
    same numbers as the uncompiled run, checkpoints without `_orig_mod.` / `module.`."""
    monkeypatch.setattr(toolkit.train.engine, "COMPILE_BACKEND", "eager")
    compiled_nets = []
    real_compile = toolkit.train.setup.compile_in_place
    monkeypatch.setattr(
        toolkit.train.setup,
        "compile_in_place",
        lambda net: compiled_nets.append(real_compile(net)) or net,
    )
    torch._dynamo.reset()
    config = tiny_config(cifar_folder, tmp_path, epochs=2, model_options={"batch_norm": True})
    compiled = _fit_compiled(replace_config(config, compile=True), tmp_path / "compiled").run_dir
    plain = fit(config, run_dir=tmp_path / "plain").run_dir

    assert len(compiled_nets) == 1 and compiled_nets[0]._compiled_call_impl is not None
    assert json.loads((compiled / "config.json").read_text())["engine"]["compile"] is True
    for name in ("best.pt", "last.pt"):
        ckpt = Checkpoint.load(compiled / name)
        assert not [k for k in ckpt.state_dict if k.startswith(("_orig_mod.", "module."))]
        ckpt.build_net()  # strict load into a fresh, plain model
    a = Checkpoint.load(compiled / "last.pt").state_dict
    b = Checkpoint.load(plain / "last.pt").state_dict
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert read_metrics(compiled)[-1]["train_loss"] == pytest.approx(
        read_metrics(plain)[-1]["train_loss"], rel=1e-5
    )


def test_a_failing_compiler_is_one_clear_error(cifar_folder, tmp_path, monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(toolkit.train.engine, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    with pytest.raises(ToolkitError, match="torch.compile failed.*without --compile"):
        fit(tiny_config(cifar_folder, tmp_path, compile=True), run_dir=tmp_path / "run")


@pytest.mark.slow
def test_inductor_compiled_run(cifar_folder, tmp_path):
    """The real backend (C++ code generation on the CPU: about a minute when cold)."""
    torch._dynamo.reset()
    config = tiny_config(cifar_folder, tmp_path, compile=True, model="resnet9")
    config = replace_config(config, model_options={"width": 4})
    run = _fit_compiled(config, tmp_path / "run").run_dir
    ckpt = Checkpoint.load(run / "best.pt")
    assert not [k for k in ckpt.state_dict if k.startswith(("_orig_mod.", "module."))]
    # The compiled model's weights, loaded into a plain one, reproduce its val accuracy.
    val = load_data(config.data, seed=config.seed).val
    normalize = Normalizer(ckpt.dataset["mean"], ckpt.dataset["std"], CPU)
    logits = predict_logits(ckpt.build_net(), val.images, normalize, CPU)
    accuracy = (logits.argmax(1) == val.labels).float().mean().item()
    assert accuracy == pytest.approx(ckpt.best_val_acc, abs=1e-6)


def replace_config(config: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(config, **changes)


# --- channels_last and evaluation batches ----------------------------------------------------


def test_normalizer_gives_channels_last_with_the_same_values():
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    out = Normalizer([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], CPU)(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-6)


def test_fit_trains_a_channels_last_model(cifar_folder, tmp_path, monkeypatch):
    seen = []
    real = toolkit.train.trainer.train_one_epoch

    def spy(net, *args, **kwargs):
        seen.append(next(m for m in net.modules() if isinstance(m, nn.Conv2d)).weight)
        return real(net, *args, **kwargs)

    monkeypatch.setattr(toolkit.train.trainer, "train_one_epoch", spy)
    fit(tiny_config(cifar_folder, tmp_path), run_dir=tmp_path / "run")
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)


def test_evaluation_batches_do_not_change_logits_or_batchnorm_statistics():
    torch.manual_seed(0)
    net = create_model("net", batch_norm=True)
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3, 32, 32))  # non-trivial running statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    normalize = Normalizer([0.5] * 3, [0.25] * 3, CPU)
    big = predict_logits(net, images, normalize, CPU)  # one batch
    small = predict_logits(net, images, normalize, CPU, batch_size=7)  # 8 batches, last of 1
    assert big.shape == (50, 10) and big.dtype == torch.float32 and not big.requires_grad
    assert torch.allclose(big, small, atol=1e-5)
    assert not net.training  # eval mode: running statistics used, not batch statistics
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert predict_logits(net, images[:0], normalize, CPU).numel() == 0


def test_evaluation_batches_are_the_devices_size():
    sizes = []
    net = create_model("net")
    net.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    images = torch.zeros(600, 3, 32, 32, dtype=torch.uint8)
    predict_logits(net, images, Normalizer([0.5] * 3, [0.25] * 3, CPU), CPU)
    assert sizes == [256, 256, 88]  # the CPU's batch: its activations stay in cache
    assert toolkit.train.engine.eval_batch_size(torch.device("cuda")) == 1024


# --- batches and augmentation ----------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_steps_per_epoch_counts_the_batches_an_epoch_makes(world_size):
    for n in range(2 * world_size, 80):
        for batch_size in (2 * world_size, 7 * world_size, 32):
            if batch_size < 2 * world_size:
                continue
            batches = epoch_batches(n, batch_size, torch.Generator().manual_seed(n), world_size)
            assert len(batches) == steps_per_epoch(n, batch_size, world_size), (n, batch_size)
            assert all(len(b) >= 2 * world_size for b in batches) or len(batches) == 1
            flat = torch.cat(batches)
            assert len(set(flat.tolist())) == len(flat)  # no image twice in an epoch


def test_one_process_keeps_the_single_image_drop_rule():
    batches = epoch_batches(65, 32, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32, 32]  # the batch of one is dropped
    batches = epoch_batches(66, 32, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32, 32, 2]
    batches = epoch_batches(66, 32, torch.Generator().manual_seed(0), world_size=2)
    assert [len(b) for b in batches] == [32, 32]  # 2 images cannot give 2 ranks 2 each


def test_augmentation_of_a_shard_is_the_shard_of_the_augmentation():
    """Drawn for the global batch, sliced per rank: sharding cannot change what an image gets."""
    images = torch.randn(10, 3, 12, 12)
    params = BatchAugment.draw(10, (12, 12), torch.Generator().manual_seed(3), True, 5)
    whole = params.apply(images)
    parts = [params.select(slice(a, b)).apply(images[a:b]) for a, b in ((0, 3), (3, 7), (7, 10))]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole, images)


def test_cutout_zeroes_one_full_square_per_image():
    images = torch.ones(6, 3, 16, 16)
    params = BatchAugment.draw(6, (16, 16), torch.Generator().manual_seed(0), False, 5)
    out = params.apply(images)
    for n in range(6):
        zero = (out[n] == 0).all(0)  # zeroed in every channel
        assert int(zero.sum()) == 25
        ys, xs = torch.nonzero(zero, as_tuple=True)
        assert ys.max() - ys.min() == 4 and xs.max() - xs.min() == 4  # one 5x5 square
    assert len({tuple(p) for p in torch.stack([params.cut_y, params.cut_x], 1).tolist()}) > 1
    with pytest.raises(ValueError, match="larger than"):
        BatchAugment.draw(2, (4, 4), torch.Generator(), False, 5)


# --- resnet9 and its recipe ------------------------------------------------------------------


def resnet9_params(width: int, classes: int = 10) -> int:
    """Hand count: conv3x3 without bias + BN (2 per channel) per layer, linear without bias."""

    def conv_bn(cin: int, cout: int) -> int:
        return cin * cout * 9 + 2 * cout

    w1, w2, w3, w4 = width, 2 * width, 4 * width, 8 * width
    return (
        conv_bn(3, w1)
        + conv_bn(w1, w2)
        + 2 * conv_bn(w2, w2)
        + conv_bn(w2, w3)
        + conv_bn(w3, w4)
        + 2 * conv_bn(w4, w4)
        + w4 * classes
    )


@pytest.mark.parametrize("width, size", [(64, 32), (64, 96), (16, 32)])
def test_resnet9_parameter_count(width, size):
    assert resnet9_params(64) == 6_573_120  # the published ResNet-9's 6.57 M
    net = create_model("resnet9", width=width, input_size=size)
    assert count_parameters(net) == resnet9_params(width)


def test_resnet9_has_residual_stages_and_a_scaled_head():
    net = create_model("resnet9", width=8)
    residuals = [m for m in net.modules() if type(m).__name__ == "Residual"]
    assert len(residuals) == 2
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(residuals[0](x), x + residuals[0].body(x))
    head = net[-2]
    assert isinstance(head, nn.Linear) and head.bias is None
    features = net[:-2](torch.randn(3, 3, 32, 32))
    assert torch.allclose(net[-1](head(features)), head(features) * 0.125)


def test_resnet9_recipe_and_the_seed_recipe_stay_apart():
    fast = recipes.resolve("default", "resnet9", {})
    assert (fast["batch_size"], fast["optimizer"], fast["nesterov"]) == (512, "sgd", True)
    assert (fast["schedule"], fast["warmup_epochs"], fast["epochs"]) == ("linear", 5.0, 24)
    assert (fast["label_smoothing"], fast["cutout"], fast["augment"]) == (0.2, 8, True)
    for model in ("mlp", "net", "net2", "resnet10", "lenet5", "resnet9"):
        seed = recipes.resolve("seed", model, {})
        assert seed["augment"] is False and seed["cutout"] == 0, model
        assert seed["label_smoothing"] == 0.0 and seed["momentum"] == 0.0, model


def test_linear_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig.from_recipe(
        "resnet9", DataOptions(), schedule="linear", warmup_epochs=2, epochs=10
    )
    factor = lr_factor(config, steps_per_epoch=10)
    values = [factor(s) for s in range(100)]
    assert values[0] == pytest.approx(0.05) and values[19] == 1.0
    assert values.index(max(values)) == 19
    assert all(a < b for a, b in zip(values[:19], values[1:20], strict=True))
    assert all(a > b for a, b in zip(values[20:], values[21:], strict=False))
    assert values[-1] == pytest.approx(1 / 80)  # the last step still learns a little


@pytest.mark.parametrize(
    "overrides, message",
    [({"cutout": -1}, "--cutout"), ({"warmup_epochs": 30}, "--warmup-epochs")],
)
def test_recipe_rejects_bad_cutout_and_warmup(overrides, message):
    with pytest.raises(ToolkitError, match=message):
        recipes.resolve("default", "resnet9", overrides)


def test_resnet9_default_recipe_trains_end_to_end(cifar_folder, tmp_path):
    """The whole recipe (linear warm-up, cutout, label smoothing) on a narrow resnet9."""
    values = recipes.resolve("default", "resnet9", {"epochs": 2, "batch_size": 64})
    assert values["warmup_epochs"] == pytest.approx(5 * 2 / 24)  # the recipe's share of epochs
    config = TrainConfig.from_recipe(
        "resnet9",
        DataOptions(data_dir=str(cifar_folder), data_root=str(tmp_path)),
        model_options={"width": 4},
        device="cpu",
        epochs=2,
        batch_size=64,
    )
    assert config.warmup_epochs == values["warmup_epochs"]
    result = fit(config, run_dir=tmp_path / "run")
    rows = read_metrics(result.run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    # 270 images in batches of 64: 5 steps an epoch, so int(5 * 2 / 24 * 5) = 2 warm-up steps
    assert rows[0]["lr"] == pytest.approx(0.4 / 2)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert (saved["cutout"], saved["schedule"], saved["model_options"]) == (
        8,
        "linear",
        {"width": 4},
    )
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)


def test_cutout_larger_than_the_images_is_a_clear_error(cifar_folder, tmp_path):
    with pytest.raises(ToolkitError, match="--cutout 40 is larger than the 32px images"):
        fit(tiny_config(cifar_folder, tmp_path, cutout=40), run_dir=tmp_path / "run")
