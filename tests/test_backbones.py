"""timm backbones: `timm/<arch>`, `--pretrained` from every accepted source (offline), the
weights' preprocessing carried through the run, and their failure modes as one line.

timm's own test architectures (test_resnet, test_vit: a few hundred thousand parameters)
keep this fast; the weights are written here, in the formats users bring.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.synthetic import write_image_folder
from toolkit.cli import app
from toolkit.cli.options import with_bare_values
from toolkit.data import DataOptions
from toolkit.errors import ToolkitError
from toolkit.models import create_model, get_entry
from toolkit.models.pretrained import fetch, read_weights_file, resolve
from toolkit.network import unreachable
from toolkit.run.checkpoint import Checkpoint
from toolkit.train.config import TrainConfig
from toolkit.train.trainer import fit

CLASSES = ("ant", "bee", "cow")
NATIVE = 160  # test_resnet's and test_vit's pretrained input size (timm's r160_in1k tag)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 classes, 24 train + 8 test images each, 40 px."""
    root = tmp_path_factory.mktemp("photos")
    return write_image_folder(root, CLASSES, {"train": 24, "test": 8}, size=40)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> dict[str, Path]:
    """test_resnet weights with a 1000-class head, in each format a user may bring."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    state = timm.create_model("test_resnet").state_dict()
    files = {
        "safetensors": folder / "model.safetensors",
        "pth": folder / "resnet.pth",
        "bin": folder / "pytorch_model.bin",
        "timm_checkpoint": folder / "checkpoint.pth.tar",
    }
    save_file(state, files["safetensors"])
    torch.save(state, files["pth"])
    torch.save({f"module.{k}": v for k, v in state.items()}, files["bin"])  # saved under DDP
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": state}, files["timm_checkpoint"])
    return files


def _config(photos: Path, tmp_path: Path, model="timm/test_resnet", **flags) -> TrainConfig:
    values = dict(epochs=2, image_size=32, device="cpu")
    values.update(flags)
    data = {k: values.pop(k) for k in ("image_size", "data_dir", "interpolation") if k in values}
    options = DataOptions(
        data_dir=str(data.get("data_dir", photos)),
        data_root=str(tmp_path / "data"),
        image_size=data.get("image_size"),
        interpolation=data.get("interpolation"),
    )
    return TrainConfig.from_recipe(model, options, **values)


# --- names -----------------------------------------------------------------------------------


def test_any_timm_architecture_builds_for_the_runs_classes_and_size():
    for name in ("timm/test_resnet", "timm/test_efficientnet", "timm/test_vit.r160_in1k"):
        net = create_model(name, num_classes=3, input_size=48)
        assert net(torch.zeros(2, 3, 48, 48)).shape == (2, 3), name
    assert "position embeddings" in get_entry("timm/test_vit").input_rule
    assert "any size" in get_entry("timm/test_resnet").input_rule


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("timm/resnt18", "did you mean timm/resnet18"),
        ("timm/test_resnet.nope", "its tags: test_resnet.r160_in1k"),
        ("resnet18", "timm/<architecture>"),
    ],
)
def test_a_wrong_name_is_one_line_naming_the_right_ones(name, says):
    with pytest.raises(ToolkitError, match=says.replace(".", r"\.")):
        get_entry(name)


def test_a_bare_pretrained_flag_means_the_default_tag():
    assert with_bare_values(["train", "m", "--pretrained"]) == [
        "train",
        "m",
        "--pretrained",
        "default",
    ]
    assert with_bare_values(["--pretrained", "--epochs", "2"])[:2] == ["--pretrained", "default"]
    assert with_bare_values(["--pretrained", "w.pth"]) == ["--pretrained", "w.pth"]


# --- weights files ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "pth", "bin", "timm_checkpoint"])
def test_a_weights_file_loads_with_a_fresh_head_for_the_runs_classes(
    kind, imagenet_like, photos, tmp_path
):
    source = torch.load(imagenet_like["pth"], weights_only=True)
    config = _config(photos, tmp_path, pretrained=str(imagenet_like[kind]), epochs=1)
    assert config.recipe == "finetune"  # the default with --pretrained
    run = fit(config, run_dir=tmp_path / "run").run_dir
    record = json.loads((run / "config.json").read_text())["initialised_from"]
    assert record["source"] == "file" and record["weights"] == str(imagenet_like[kind])
    assert record["fresh"] == ["fc.bias", "fc.weight"]  # 1000 ImageNet classes -> 3
    assert record["loaded"] == record["of"] - 2
    # The stem was loaded, not re-initialised (one epoch of fine-tuning moves it only a little).
    state = Checkpoint.load(run / "best.pt").state_dict
    stem = "conv1.0.weight" if "conv1.0.weight" in source else next(iter(source))
    assert torch.allclose(state[stem], source[stem], atol=0.05)


def test_a_toolkit_checkpoint_is_a_weights_file_too(imagenet_like, photos, tmp_path):
    """Its run's preprocessing comes with it (not timm's ImageNet defaults), and a head for
    the same classes is kept."""
    first = fit(_config(photos, tmp_path, epochs=1, image_size=24), run_dir=tmp_path / "first")
    trained = Checkpoint.load(first.run_dir / "best.pt").dataset
    assert trained["mean"] != [0.5, 0.5, 0.5]  # the photos' own, measured
    pretrained = str(first.run_dir / "best.pt")
    config = _config(photos, tmp_path, pretrained=pretrained, epochs=1, image_size=None)
    assert config.data.image_size == 24 and config.data.crop_fraction == 1.0
    assert config.normalization["mean"] == trained["mean"]
    assert config.normalization["from"] == f"the toolkit run of {pretrained}"
    run = fit(config, run_dir=tmp_path / "second").run_dir
    record = json.loads((run / "config.json").read_text())["initialised_from"]
    assert record["loaded"] == record["of"] and record["fresh"] == []
    with pytest.raises(ToolkitError, match="toolkit checkpoint of timm/test_resnet, not of"):
        _config(photos, tmp_path, model="timm/test_efficientnet", pretrained=pretrained)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    doctored = tmp_path / "weights.pth"
    doctored.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ToolkitError, match="refused without running anything"):
        read_weights_file(doctored)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "empty"), (b"\x00garbage" * 20, "unreadable"), (b"not a pickle", "unreadable")],
)
def test_a_damaged_file_is_one_line_and_exit_2(content, says, photos, tmp_path):
    for suffix in (".safetensors", ".pth"):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(content)
        result = CliRunner().invoke(app, _train_args(photos, tmp_path, "--pretrained", str(bad)))
        assert result.exit_code == 2, result.output
        assert says in result.output and "Traceback" not in result.output


def test_weights_of_another_architecture_do_not_fit(imagenet_like, photos, tmp_path):
    config = _config(
        photos, tmp_path, model="timm/test_efficientnet", pretrained=str(imagenet_like["pth"])
    )
    with pytest.raises(ToolkitError, match="does not fit timm/test_efficientnet"):
        fit(config, run_dir=tmp_path / "run")


def test_pretrained_is_for_timm_models_and_not_with_init_from(imagenet_like, photos, tmp_path):
    with pytest.raises(ToolkitError, match="train timm/<architecture>"):
        _config(photos, tmp_path, model="net", pretrained=str(imagenet_like["pth"]))
    with pytest.raises(ToolkitError, match="pass one of them"):
        _config(photos, tmp_path, pretrained=str(imagenet_like["pth"]), init_from=str(tmp_path))


def _train_args(photos: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train",
        "timm/test_resnet",
        "--data-dir",
        str(photos),
        "--data-root",
        str(tmp_path / "data"),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


# --- the Hugging Face hub, offline -----------------------------------------------------------


def write_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """`files` stored in `cache` exactly as huggingface_hub stores a download: content in
    blobs/<sha256>, symlinked from snapshots/<commit>/<name>, refs/main naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_tag_loads_from_the_hub_cache_with_hf_hub_offline(
    imagenet_like, photos, tmp_path, monkeypatch
):
    cache = tmp_path / "hub"
    content = imagenet_like["safetensors"].read_bytes()
    write_hub_cache(cache, "timm/test_resnet.r160_in1k", {"model.safetensors": content})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # No value: the architecture's default tag; its preprocessing comes with it.
    config = _config(photos, tmp_path, pretrained="default", epochs=1, image_size=None)
    assert config.pretrained == "test_resnet.r160_in1k"
    assert config.data.image_size == NATIVE  # the weights' input size, as no size was given
    assert config.normalization["mean"] == [0.5, 0.5, 0.5]  # test_resnet's config
    fetched = fetch(config.model, config.pretrained)
    assert fetched.path.parent.parent.name == "snapshots"
    assert set(fetched.state) == set(torch.load(imagenet_like["pth"], weights_only=True))


def test_without_a_network_a_tag_fails_fast_with_one_line(photos, tmp_path):
    """A real process in a network namespace with no network, an empty cache: one line,
    exit 2, in seconds (huggingface_hub alone retries for about 50 s)."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode
    ):
        pytest.skip("no network namespaces on this machine")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "TOOLKIT_PROGRESS": "0"}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "toolkit", *_train_args(photos, tmp_path), "--pretrained"]
    start = time.monotonic()
    done = subprocess.run(["unshare", "-rn", *command], capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach https://huggingface.co" in errors[0]
    assert "hf download timm/test_resnet.r160_in1k" in errors[0]
    assert "--pretrained FILE" in errors[0] and "Traceback" not in done.stderr
    assert seconds < 30


def test_an_unreachable_hub_is_found_in_one_short_probe(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    start = time.monotonic()
    assert "127.0.0.1:9" in unreachable("http://127.0.0.1:9")  # the discard port: closed
    assert time.monotonic() - start < 5


def test_a_tag_not_in_the_cache_under_hf_hub_offline_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ToolkitError, match="HF_HUB_OFFLINE is set.*--pretrained FILE"):
        fetch("timm/test_resnet", "")
    assert resolve("timm/test_resnet.r160_in1k", "").where == "test_resnet.r160_in1k"


# --- a fixed-size transformer ----------------------------------------------------------------


def test_a_vit_is_built_for_the_runs_size_and_its_position_embeddings_resampled(photos, tmp_path):
    torch.manual_seed(2)
    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), weights)  # built for 160 px
    config = _config(photos, tmp_path, model="timm/test_vit", pretrained=str(weights), epochs=1)
    run = fit(config, run_dir=tmp_path / "run").run_dir
    record = json.loads((run / "config.json").read_text())["initialised_from"]
    assert record["resampled"] == ["pos_embed"]
    assert Checkpoint.load(run / "best.pt").build_classifier()(torch.zeros(1, 3, 32, 32)).shape == (
        1,
        3,
    )


# --- the weights' preprocessing, through export and serving ----------------------------------


def test_the_weights_preprocessing_travels_into_the_served_model(imagenet_like, photos, tmp_path):
    """The run normalises with the weights' mean/std (test_resnet's 0.5, not the data's):
    the checkpoint, the ONNX graph and its metadata carry them, and the served model gives
    the checkpoint's answers."""
    from PIL import Image

    from serving.classifier import OnnxClassifier
    from serving.preprocess import Resize
    from toolkit.data import load_data

    # test_resnet's config: bilinear, crop_pct 0.95; a bicubic resize asked for.
    weights = str(imagenet_like["safetensors"])
    config = _config(photos, tmp_path, pretrained=weights, epochs=1, interpolation="bicubic")
    assert config.data.crop_fraction == 0.95
    run = fit(config, run_dir=tmp_path / "run").run_dir
    ckpt = Checkpoint.load(run / "best.pt")
    assert ckpt.dataset["mean"] == [0.5, 0.5, 0.5] == ckpt.dataset["std"]
    result = CliRunner().invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "export" / "model.json").read_text())
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["model"] == "timm/test_resnet"
    assert meta["preprocessing"]["resize"] == "bicubic"
    assert meta["preprocessing"]["crop_fraction"] == 0.95
    served = OnnxClassifier(run / "export" / "model.onnx")
    assert served.resize == Resize((32, 32), "bicubic", 0.95)
    # The server prepares an upload exactly as training decoded that file.
    bundle = load_data(config.data)
    row = bundle.paths["test"].index(next(p for p in bundle.paths["test"] if "bee" in p))
    with Image.open(photos / bundle.paths["test"][row]) as photo:
        x = served.preprocess(photo)
        probs = served.predict([photo])[0]
    assert torch.equal(torch.from_numpy(x * 255).round().byte(), bundle.test.images[row])
    with torch.no_grad():
        logits = ckpt.build_classifier()(torch.from_numpy(x)[None])[0]
    assert int(probs.argmax()) == int(logits.argmax())


def test_a_pretrained_fine_tune_resumes_exactly(imagenet_like, photos, tmp_path):
    """The finetune recipe (frozen first epoch, resized crops, balanced sampling) in one go
    == interrupted after epoch 1 and resumed: the resumed run neither reloads the weights nor
    refits its recipe."""
    from tests.training import fit_interrupted_in_second_epoch
    from toolkit.train.trainer import resume

    config = _config(
        photos,
        tmp_path,
        pretrained=str(imagenet_like["pth"]),
        epochs=2,
        balance="sampler",
        freeze_epochs=1,
        backbone_lr_scale=0.1,
    )
    straight = fit(config, run_dir=tmp_path / "straight").run_dir
    fit_interrupted_in_second_epoch(config, tmp_path / "resumed")
    assert resume(tmp_path / "resumed").epochs_done == 2
    a = Checkpoint.load(straight / "last.pt").state_dict
    b = Checkpoint.load(tmp_path / "resumed" / "last.pt").state_dict
    assert all(torch.equal(tensor, b[key]) for key, tensor in a.items())


def test_a_pretrained_fine_tune_trains_under_torchrun(imagenet_like, photos, tmp_path):
    """Two gloo processes: the weights loaded on each rank, the frozen first epoch and the
    balanced sampler keep the replicas identical."""
    from tests.test_distributed import rank_digests, torchrun

    run = tmp_path / "ddp-run"
    args = ["timm/test_resnet", "--data-dir", photos, "--data-root", tmp_path / "data"]
    args += ["--image-size", 32, "--epochs", 2, "--device", "cpu", "--amp", "off"]
    args += ["--freeze-epochs", 1, "--backbone-lr-scale", 0.1]
    torchrun(
        *args,
        "--pretrained",
        imagenet_like["pth"],
        "--balance",
        "sampler",
        "--run-dir",
        run,
        cwd=tmp_path,
    )
    first, second = rank_digests(run)
    assert first == second
    config = json.loads((run / "config.json").read_text())
    assert config["engine"]["world_size"] == 2 and config["initialised_from"]["source"] == "file"
    assert config["recipe"] == "finetune" and config["freeze_epochs"] == 1
