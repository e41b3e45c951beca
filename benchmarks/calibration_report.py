"""benchmarks/calibration.md from the rows benchmarks.calibration measured."""

from __future__ import annotations

from toolkit.evaluate.calibrators import METHODS


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def markdown(rows: list[dict], meta: dict, margin: float) -> str:
    measured = [r for r in rows if "skipped" not in r]
    lines = [
        "# Calibration of the shipped models",
        "",
        f"Generated {meta['date']} by `{meta['command']}` on {meta['cpu']} (Python "
        f"{meta['python']}). Data: the real CIFAR-10 (the JPEG copy), 45,000 train / 5,000 "
        "stratified val (seed 0, the runs' own: the recorded val or test accuracy comes out "
        "exactly) / the official 10,000 test images. Each shipped model.onnx classifies val "
        "and test again (its TTA views included); every calibrator is fitted and **chosen on "
        "val** (`toolkit.evaluate.calibrate`, the code `toolkit export` runs); **test** is "
        "only measured.",
        "",
        "ECE: 15 equal-width confidence bins (Guo et al. 2017). Floor: the ECE that labels "
        "drawn from the model's own served probabilities show on these 10,000 images (mean "
        "of 20 draws): what a perfectly calibrated model would measure. Before: the "
        "probabilities of model.onnx as shipped when this ran, measured before --write "
        "rewrote the files; after: the calibrator chosen on val from the served logits, in "
        "the graph. A model exported since issue #26 ships that very calibrator, so both "
        "agree; the first run, on the models that had one temperature fitted on best.pt's "
        "plain logits, is kept in [calibration-issue26.md](calibration-issue26.md).",
        "",
        f"| model | test acc | method chosen | ECE before | **ECE after** | floor | above "
        f"floor | ≤ {100 * margin:.1f} pt | NLL before → after | Brier before → after |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in measured:
        before, after = r["shipped"], r["refit"]
        above = after["ece"] - after["ece_floor"]
        lines.append(
            f"| {r['artifact']} | {pct(r['accuracy']['test'])} | {after['method']} "
            f"| {pct(before['ece'])} | **{pct(after['ece'])}** | {pct(after['ece_floor'])} "
            f"| {100 * above:+.2f} pt | {'yes' if above <= margin else 'no'} "
            f"| {before['nll']:.4f} → {after['nll']:.4f} "
            f"| {before['brier']:.4f} → {after['brier']:.4f} |"
        )
    lines += [
        "",
        "Top-1 is unchanged by construction (the logits' part of each graph is copied bit "
        "for bit and every calibrator keeps the arg-max; checked on all test images), so "
        "the accuracy above is the served one.",
        "",
        "## How the method was chosen (val only)",
        "",
        "Each method fitted on 4/5 of val and scored on the remaining fifth, five times "
        "(`toolkit.evaluate.calibrators.choose_calibrator`); the figures are over the 5,000 "
        "pooled held-out predictions, ECE / NLL. The rule: the lowest ECE among the methods "
        "whose NLL is not worse than temperature scaling's by more than one standard error "
        "of the per-image difference. temperature: softmax(logits / T); ensemble: ensemble "
        "temperature scaling (scaled + raw + uniform mixture); top1-beta: beta calibration "
        "of the top-1 probability; top1-map: isotonic 12-bin piecewise-linear map of it (both "
        "top-1 maps rescale the other classes in proportion).",
        "",
        "| model | " + " | ".join(METHODS) + " | chosen |",
        "|---|" + "---:|" * len(METHODS) + "---|",
    ]
    for r in measured:
        scores = r["refit"]["val_candidates"]
        cells = [f"{pct(scores[m]['ece'])} / {scores[m]['nll']:.4f}" for m in METHODS]
        lines.append(f"| {r['artifact']} | " + " | ".join(cells) + f" | {r['refit']['method']} |")
    lines += ["", "What each model's graph now computes:", ""]
    lines += [f"- {r['artifact']}: {r['refit']['description']}" for r in measured]
    lines += [
        "",
        "For comparison on test, one temperature refitted on the served logits (the "
        "'temperature' candidate, as a model exported today without the new methods would "
        "get): "
        + "; ".join(
            f"{r['artifact']} ECE {pct(r['temperature_alone']['ece'])}, NLL "
            f"{r['temperature_alone']['nll']:.4f}"
            for r in measured
        )
        + ".",
        "",
        '## "Not sure": the selective threshold',
        "",
        'Below the threshold the app says "not sure"; the target is 95 % accuracy for the '
        "predictions kept. Before: the threshold as shipped (before issue #26: the lowest at "
        "which the kept val predictions were 95 % right). After: the higher of that one and "
        "the lowest threshold at which their calibrated confidence says 95 % "
        "(toolkit.evaluate.calibration.fit_selective). "
        "SE: the standard error of the kept test accuracy were it exactly on target, "
        "√(0.95·0.05/n kept).",
        "",
        "| model | threshold before → after | val kept / acc (after) | test kept / acc "
        "before | **test kept / acc after** | ± SE | within 1 SE |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in measured:
        before, after, val = r["shipped"], r["refit"], r["refit"]["val_selective"]
        lines.append(
            f"| {r['artifact']} | {_threshold(before)} → {_threshold(after)} "
            f"| {pct(val['val_coverage'], 1)} / {pct(val['val_accuracy'])} "
            f"| {pct(before['test_coverage'], 1)} / {pct(before['test_kept_accuracy'])} "
            f"| **{pct(after['test_coverage'], 1)} / {pct(after['test_kept_accuracy'])}** "
            f"| {pct(after['kept_accuracy_se'])} "
            f"| {'yes' if after['threshold_within_se'] else 'no'} |"
        )
    lines += [
        "",
        "## Why not down to the floor: val is not test",
        "",
        "Every model is a little more accurate on val (carved from the official training "
        "batches) than on the official test batch, and the calibration measured on val does "
        "not carry over to test: each chosen method scores far better on held-out val than "
        "on test. The last columns fit the chosen method and one temperature on **test** "
        "itself (5-fold: each image scored by the fit on the other four fifths): where fit "
        "and measurement share one distribution the chosen methods come within 0.3 pt of "
        "their floor and one temperature does not. A diagnosis only, never shipped: "
        "nothing shipped may be chosen on test.",
        "",
        "| model | val acc | test acc | chosen: ECE val (CV) → test | floor (test) | fitted on "
        "test: temperature | fitted on test: chosen | their floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in measured:
        d, after = r["diagnosis"], r["refit"]
        method = after["method"]
        on_test = d[f"test_fitted_{method}"]
        lines.append(
            f"| {r['artifact']} | {pct(r['accuracy']['val'])} | {pct(r['accuracy']['test'])} "
            f"| {pct(after['val_candidates'][method]['ece'])} → {pct(after['ece'])} "
            f"| {pct(after['ece_floor'])} | {pct(d['test_fitted_temperature']['ece'])} "
            f"| {pct(on_test['ece'])} | {pct(on_test['ece_floor'])} |"
        )
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "## Not measured here", ""]
        lines += [
            f"- {r['artifact']}: {r['skipped']}. Left as shipped; `toolkit export --int8` fits "
            "an INT8 model's calibrator on its own val logits (toolkit.export.quantize)."
            for r in skipped
        ]
    lines += ["", "## Reliability diagrams (test split, after)", ""]
    lines += [f"### {r['artifact']}\n\n![](calibration/{r['artifact']}.png)\n" for r in measured]
    return "\n".join(lines)


def _threshold(figures: dict) -> str:
    return "never" if figures["threshold"] is None else f"{figures['threshold']:.4f}"
