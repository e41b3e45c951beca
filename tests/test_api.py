"""The Python API: the docs' example runs as written, and each call is the CLI's code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.synthetic import write_image_folder
from toolkit.api import run_folder, train
from toolkit.errors import ToolkitError
from toolkit.train.config import TrainConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "index.md"


def docs_example() -> str:
    """The first python block of the docs' "From Python" page."""
    return re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    write_image_folder(
        tmp_path / "my_images", classes=("apple", "pear", "plum"), per_class={"train": 12}
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(docs_example(), str(PAGE), "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"test accuracy \d+\.\d%", printed)
    apples = sorted((tmp_path / "my_images" / "train" / "apple").iterdir())
    rows = [line for line in printed.splitlines() if "my_images/train/apple" in line]
    assert len(rows) == len(apples)  # one row per image, custom class names in them
    assert all(re.search(r"'(apple|pear|plum)'", row) for row in rows)
    run = next((tmp_path / "runs").iterdir())
    assert run.name.startswith("my_images-net-")  # named after the dataset, not cifar10
    assert (run / "eval" / "metrics.json").is_file() and (run / "export" / "model.onnx").is_file()


def test_train_takes_the_clis_options_by_name_and_refuses_unknown_ones(tmp_path):
    config = TrainConfig.from_options(
        "lenet5", data_dir="rel/images", l2=0.01, recipe="seed", dropout=None
    )
    assert config.l2 == 0.01 and config.recipe == "seed"
    assert config.data.data_dir == str(Path("rel/images").resolve())  # as the CLI makes it
    with pytest.raises(ToolkitError, match="unknown option.*learning_rate"):
        train("lenet5", learning_rate=0.1)


def test_a_run_is_passed_on_as_a_result_or_a_folder(tmp_path, cifar_folder):
    result = train(
        "net",
        run_dir=tmp_path / "run",
        data_dir=str(cifar_folder),
        data_root=str(tmp_path / "cache"),
        epochs=1,
        device="cpu",
    )
    assert run_folder(result) == run_folder(str(tmp_path / "run")) == tmp_path / "run"
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["data"]["data_dir"] == str(cifar_folder)
