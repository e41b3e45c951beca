"""The report of benchmarks/speedrun.py: its summary, its targets and its markdown."""

from __future__ import annotations

import statistics

PUBLISHED = 0.94  # airbench94's mean test accuracy in its paper (A100, the original PNGs)
SECONDS_TARGET = 0.75  # issue #25: the peer's accuracy in at most this share of its seconds


def summary(rows: list[dict]) -> dict:
    def ms(key):
        values = [r[key] for r in rows]
        return {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    return {k: ms(k) for k in ("tta_accuracy", "seconds", "wall_seconds")}


def targets(stats: dict) -> dict:
    """Issue #25's two targets for each of our runs present, against the peer's mean."""
    peer = stats["peer"]
    return {
        key: {
            "accuracy_at_least_peer": stats[key]["tta_accuracy"]["mean"]
            >= peer["tta_accuracy"]["mean"],
            "seconds_ratio": stats[key]["seconds"]["mean"] / peer["seconds"]["mean"],
            "at_most_target_seconds": stats[key]["seconds"]["mean"]
            <= SECONDS_TARGET * peer["seconds"]["mean"],
        }
        for key in ("ours_all", "ours_val")
        if key in stats
    }


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def calls_sentence(invocations: list[str], runs: dict[str, list[dict]]) -> str:
    """For runs carried over several calls with one --work: which calls, and the seeds whose
    peer and ours were not measured side by side (in one call)."""
    if len(invocations) < 2:
        return ""
    call = {(key, r["seed"]): r["invocation"] for key, rows in runs.items() for r in rows}
    apart = sorted({seed for (key, seed), i in call.items() if call.get(("peer", seed)) != i})
    return (
        f" Measured in {len(invocations)} calls with one `--work` ({', '.join(invocations)}; "
        "each run's `invocation` in the .json says which); seeds whose peer and ours ran in "
        f"different calls: {', '.join(map(str, apart)) or 'none'}."
    )


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    runs = {key: rows for key, rows in report["runs"].items() if rows}
    seeds = ", ".join(f"{len(rows)} {key}" for key, rows in runs.items())
    n = {k: f"{runs[k][0]['train_images']:,}" for k in ("ours_all", "ours_val") if k in runs}
    precision = report.get("peer_precision", "bf16")
    recipe = report.get("recipe", "default")
    flag = "" if recipe == "default" else f" --recipe {recipe}"
    if report.get("epochs"):
        flag += f" --epochs {report['epochs']}"
    if report.get("flags"):
        flag += f" {report['flags']}"
    labels = {
        "peer": f"airbench `train94` (PyPI, CPU shim, {precision})",
        "ours_all": f"`toolkit train speedrun{flag} --val-fraction 0` ({n.get('ours_all')}, "
        "final weights)",
        "ours_val": f"`toolkit train speedrun{flag}` ({n.get('ours_val')}, best epoch on val)",
    }
    labels = {key: label for key, label in labels.items() if key in runs}
    names = {"peer": "peer", "ours_all": "ours on all", "ours_val": "ours with val"}
    order = ", ".join(names[key] for key in labels)
    calls = calls_sentence(report.get("invocations", []), runs)
    lines = [
        "# speedrun vs airbench train94 on the CPU"
        + (" (--quick smoke run)" if report["quick"] else ""),
        "",
        f"CPU: {cpu['model']}, {cpu['cores']} cores, AVX512-BF16 {yes(cpu['avx512_bf16'])}, "
        f"AMX {yes(cpu['amx_bf16'])}; torch {report['torch']}; "
        f"seeds: {seeds}, run in turn ({order}) per seed; the same "
        "decoded images "
        f"({report['sizes']['train']:,} train, {report['sizes']['test']:,} test).{calls}",
        "",
        f"Reproduce: `pip install -e '.[bench]' && {report.get('command', '')}` (nothing else "
        "on the cores).",
        "",
        "| | test acc (TTA), mean ± std | below 94.0 % | training s (airbench's rule) | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in labels.items():
        s = report["summary"][key]
        acc, sec, wall = s["tta_accuracy"], s["seconds"], s["wall_seconds"]
        several = len(runs[key]) > 1  # one seed has no spread to show
        acc_std = f" ± {acc['std']:.2%}" if several else ""
        sec_std = f" ± {sec['std']:.0f}" if several else ""
        lines.append(
            f"| {label} | {acc['mean']:.2%}{acc_std} "
            f"| {100 * (PUBLISHED - acc['mean']):.2f} pt "
            f"| {sec['mean']:.0f}{sec_std} | {wall['mean']:.0f} |"
        )
    lines += [
        "",
        f"Targets (mean accuracy ≥ the peer's, ≤ {SECONDS_TARGET}× its training seconds):",
        "",
    ]
    for key, t in report["targets"].items():
        lines.append(
            f"- {labels[key]}: accuracy {'met' if t['accuracy_at_least_peer'] else 'NOT met'}, "
            f"{t['seconds_ratio']:.2f}× the peer's seconds "
            f"({'met' if t['at_most_target_seconds'] else 'NOT met'})"
        )
    lines += [
        "",
        "Per run. *training s* is airbench's rule: its whitening init + training + the TTA "
        "evaluation of the test split, no decoding and no per-epoch evaluation; ours is "
        "split into those three (our TTA evaluation runs in fp32, as the exported model "
        f"does; the peer's in {precision}). *wall s* is the whole command (ours: `toolkit "
        "train` + `toolkit evaluate`).",
        "",
        "| run | seed | test acc (TTA) | without TTA | training s | init + train + TTA s "
        "| s per epoch | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in labels:
        for r in report["runs"][key]:
            without = r.get("accuracy_without_tta")
            parts = per_epoch = "—"  # the peer's timer gives one total
            if "train_seconds" in r:
                parts = " + ".join(
                    f"{r[k]:.{d}f}"
                    for k, d in (("prepare_seconds", 1), ("train_seconds", 0), ("tta_seconds", 0))
                )
                per_epoch = f"{r['train_seconds'] / r['epochs']:.0f}" if r.get("epochs") else "—"
            lines.append(
                f"| {key} | {r['seed']} | {r['tta_accuracy']:.2%} "
                f"| {'—' if without is None else f'{without:.2%}'} | {r['seconds']:.0f} "
                f"| {parts} | {per_epoch} | {r['wall_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"
