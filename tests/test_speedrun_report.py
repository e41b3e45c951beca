"""benchmarks/speedrun.py's report: issue #25's targets against the peer's mean, a report with
no val runs (--val-seeds 0), and runs carried over several calls with one --work (only into
the same setup), naming any seed whose peer and ours were not measured side by side."""

from __future__ import annotations

import json

import pytest

from benchmarks.speedrun import load_partial
from benchmarks.speedrun_report import markdown, summary, targets


def run(seed: int, accuracy: float, seconds: float, invocation: int, ours: bool) -> dict:
    row = {
        "seed": seed,
        "invocation": invocation,
        "tta_accuracy": accuracy,
        "seconds": seconds,
        "wall_seconds": seconds + 60,
    }
    if ours:
        row |= {
            "accuracy_without_tta": accuracy - 0.01,
            "prepare_seconds": 0.5,
            "train_seconds": seconds - 40.5,
            "tta_seconds": 40.0,
            "epochs": 7,
            "train_images": 50_000,
        }
    return row


def report(peer: list[dict], ours_all: list[dict], invocations: list[str]) -> dict:
    runs = {"peer": peer, "ours_all": ours_all, "ours_val": []}
    stats = {key: summary(rows) for key, rows in runs.items() if rows}
    return {
        "cpu": {"model": "AMD EPYC", "cores": 2, "avx512_bf16": False, "amx_bf16": False},
        "torch": "2.14.1",
        "peer_precision": "fp32",
        "recipe": "muon",
        "epochs": 7,
        "quick": False,
        "command": "python -m benchmarks.speedrun --seeds 2 --val-seeds 0",
        "sizes": {"train": 50_000, "test": 10_000},
        "runs": runs,
        "invocations": invocations,
        "summary": stats,
        "targets": targets(stats),
    }


def test_the_targets_compare_our_mean_with_the_peers_mean():
    peer = [run(0, 0.900, 3000, 1, False), run(1, 0.904, 3200, 1, False)]
    fast = [run(0, 0.903, 2000, 1, True), run(1, 0.902, 2100, 1, True)]  # 0.66x, +0.05 pt
    met = targets({"peer": summary(peer), "ours_all": summary(fast)})["ours_all"]
    assert met["accuracy_at_least_peer"] and met["at_most_target_seconds"]
    assert abs(met["seconds_ratio"] - 2050 / 3100) < 1e-9

    slow = [run(0, 0.899, 2400, 1, True), run(1, 0.904, 2400, 1, True)]  # 0.77x, -0.05 pt
    missed = targets({"peer": summary(peer), "ours_all": summary(slow)})["ours_all"]
    assert not missed["accuracy_at_least_peer"] and not missed["at_most_target_seconds"]


def test_a_report_without_val_runs_leaves_their_row_out():
    text = markdown(report([run(0, 0.9, 3000, 1, False)], [run(0, 0.9, 2000, 1, True)], ["d1"]))
    assert "--val-fraction 0` (50,000, final weights)" in text
    assert "best epoch on val" not in text and "ours_val" not in text
    assert "0.67× the peer's seconds (met)" in text
    assert "| 90.00% | 4.00 pt | 3000 |" in text  # one seed: no "± 0.00%" spread
    assert "calls with one `--work`" not in text  # one call: nothing carried


def test_a_report_over_two_calls_names_the_seeds_not_measured_side_by_side():
    peer = [run(0, 0.9, 3000, 1, False), run(1, 0.9, 3000, 1, False)]
    paired = [run(0, 0.9, 2000, 1, True), run(1, 0.9, 2000, 2, True)]
    text = markdown(report(peer, paired, ["d1", "d2"]))
    assert "Measured in 2 calls with one `--work` (d1, d2;" in text
    assert "different calls: 1." in text

    together = [run(0, 0.9, 2000, 1, True), run(1, 0.9, 2000, 1, True)]
    assert "different calls: none." in markdown(report(peer, together, ["d1", "d2"]))


def test_runs_carry_only_into_a_call_with_the_same_setup(tmp_path):
    partial = tmp_path / "runs-so-far.json"
    setup = {"cpu": {"model": "AMD EPYC"}, "torch": "2.14.1", "recipe": "muon", "epochs": 7}
    assert load_partial(partial, setup) == {}  # nothing saved yet

    saved = {"setup": setup, "invocations": ["d1"], "runs": {"peer": [run(0, 0.9, 3000, 1, False)]}}
    partial.write_text(json.dumps(saved))
    assert load_partial(partial, setup) == saved

    with pytest.raises(SystemExit) as refused:
        load_partial(partial, {**setup, "recipe": "airbench94"})
    assert str(refused.value) == (
        f"{partial} was measured with another recipe muon -> airbench94: use a new --work"
    )
