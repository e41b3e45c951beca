"""artifacts/README.md's table of shipped models is what `benchmarks.make_artifacts` writes from
the shipped folders themselves (model.json, metrics.json, model.onnx), so a folder re-shipped
by hand or by another script cannot leave the table behind, and `make artifacts` reproduces
it."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.make_artifacts import summary_table
from toolkit.data import DataOptions

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def test_the_shipped_table_is_written_from_the_shipped_folders():
    table = summary_table(ARTIFACTS, DataOptions())
    assert table.count("\n| cifar10-") == 5  # net, lenet5, resnet10, speedrun and its INT8
    assert table in (ARTIFACTS / "README.md").read_text()


def test_a_figure_changed_in_a_folder_changes_its_row(tmp_path):
    for folder in ARTIFACTS.glob("cifar10-*"):
        (tmp_path / folder.name).symlink_to(folder)
    net = tmp_path / "cifar10-net"
    net.unlink()
    net.mkdir()
    for file in ("metrics.json", "model.onnx"):
        (net / file).symlink_to(ARTIFACTS / net.name / file)
    meta = json.loads((ARTIFACTS / net.name / "model.json").read_text())
    (net / "model.json").write_text(json.dumps({**meta, "test_accuracy": 0.5}))
    table = summary_table(tmp_path, DataOptions())
    metrics = json.loads((ARTIFACTS / net.name / "metrics.json").read_text())
    without = metrics["audit"]["accuracy"]["plain"]["without_flagged"]
    assert f"| cifar10-net | net | 30 | 50.00% | {without:.2%} |" in table
    assert table not in (ARTIFACTS / "README.md").read_text()


def test_an_evaluation_without_an_audit_is_named_not_audited(tmp_path):
    source = ARTIFACTS / "cifar10-net"
    net = tmp_path / "cifar10-net"
    net.mkdir()
    for file in ("model.json", "model.onnx"):
        (net / file).symlink_to(source / file)
    metrics = json.loads((source / "metrics.json").read_text())
    # what toolkit evaluate writes when no audit of the data was found
    (net / "metrics.json").write_text(json.dumps({**metrics, "audit": {"audit": None, "note": ""}}))
    table = summary_table(tmp_path, DataOptions())
    assert "| without the audit's flagged |" in table
    assert "| cifar10-net | net | 30 | 66.31% | not audited | top1-beta |" in table
