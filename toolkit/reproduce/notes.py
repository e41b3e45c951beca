"""The reproduce report's analysis, generated from the results rows: which split each number
is on, time to the reference's accuracy, over-fitting, regularisation, the reference check.

Rows are toolkit.reproduce.report.summarise rows; every function returns Markdown lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from toolkit.reproduce.experiments import REFERENCE_SPLIT

OVERFIT, MILD_OVERFIT = 0.10, 0.05  # train - val accuracy gap at the last epoch


# --- formatting ------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def epochs_text(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def points(x: float) -> str:
    """An accuracy difference in percentage points, without a '-0.0'."""
    text = f"{100 * x:.1f}"
    return "0.0" if text == "-0.0" else text


def kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def duration(seconds: float | None) -> str:
    """'42.0 s', '3 min 5 s', '1 h 16 min'."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes} min {int(round(seconds)) % 60} s"
    return f"{minutes // 60} h {minutes % 60} min"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> list[str]:
    """A Markdown table; the first `left` columns are text, the rest right-aligned numbers."""
    align = ["---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


# --- the analysis ----------------------------------------------------------------------------


def splits(rows: Sequence[dict], dataset: str) -> list[str]:
    """Which split each number of the report is on, with the sizes from config.json."""
    config = rows[0]["config"]
    sizes, data = config["sizes"], config["data"]
    if config.get("val_is_carved"):
        val = (
            f"{sizes['val']:,} images carved from the training split (stratified "
            f"{data['val_fraction']:.0%}, seed {config['seed']}); {sizes['train']:,} left to "
            "train on"
        )
    else:
        val = f"the source's own validation split ({sizes['val']:,} images)"
    return [
        "## Which split each number is on",
        "",
        f"- **val** — {val}. Model selection only: best.pt is the epoch with the highest val "
        "accuracy; *best val*, the curves and the time-to-reference use it.",
        f"- **test** — the source's test split ({sizes['test']:,} images), used once per run "
        "after training: the evaluation of its best.pt (RUN/eval/, as `toolkit evaluate`), "
        "which the export's parity check repeats on the same checkpoint. Nothing was chosen "
        "on it.",
        "- **train** — accuracy measured while training, on batches as trained (with the "
        "recipe's augmentation and dropout, where it has them): it understates the fit.",
        f"- **reference** — the figures reported in SEED_EXPERIMENTS.md are on "
        f"{REFERENCE_SPLIT.get(dataset, 'an unstated split')}"
        + "".join(f"; {name}'s is {note}" for name, note in _beyond_the_seeds(rows).items())
        + ".",
        "",
    ]


def _beyond_the_seeds(rows: Sequence[dict]) -> dict[str, str]:
    """experiment -> where its reported figure is from, for rows whose figure is not a seed's
    (a reference with both a figure and a note names its source)."""
    refs = {r["experiment"]: r["planned"].experiment.reference for r in rows}
    return {name: ref.note for name, ref in refs.items() if ref.accuracy is not None and ref.note}


def _reached(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row["reference_reached_epoch"] is None:
        return f"not within {epochs_text(row['epochs'])} ({duration(row['train_seconds'])})"
    return f"epoch {row['reference_reached_epoch']}, {duration(row['reference_reached_seconds'])}"


def _speedup(default: dict | None, seed: dict | None) -> str:
    """How many times less wall time the default recipe needed; a bound when seed missed."""
    if not default or default["reference_reached_seconds"] is None or not seed:
        return "—"
    fast = default["reference_reached_seconds"]
    if seed["reference_reached_seconds"] is None:
        return f"> {seed['train_seconds'] / fast:.1f}×"
    return f"{seed['reference_reached_seconds'] / fast:.1f}×"


def time_to_reference(rows: Sequence[dict]) -> list[str]:
    """Per experiment with a reported figure: when each recipe's val acc first reaches it."""
    by_key = {(r["experiment"], r["recipe"]): r for r in rows}
    recipes = [r for r in ("default", "seed") if any(k[1] == r for k in by_key)]
    header = ["experiment", "reference", *[f"{r} recipe reaches it at" for r in recipes]]
    header += ["seed time ÷ default time"] if len(recipes) == 2 else []
    body = []
    for name in dict.fromkeys(r["experiment"] for r in rows):
        row = next(r for r in rows if r["experiment"] == name)
        ref = row["planned"].experiment.reference
        if ref.accuracy is None:
            continue
        their = f"{pct(ref.accuracy)} after {ref.epochs} epochs" + (
            f", {duration(ref.seconds)}" if ref.seconds else ""
        )
        cells = [row["model"], their, *[_reached(by_key.get((name, r))) for r in recipes]]
        if len(recipes) == 2:
            cells.append(_speedup(by_key.get((name, "default")), by_key.get((name, "seed"))))
        body.append(cells)
    if not body:
        return []
    return [
        "## Time to the reference's accuracy",
        "",
        "Epochs and train wall time until the val accuracy first reaches the reference's "
        "reported figure (ours on the val split, the reference's on its test split). The "
        "reference's own time is from its unknown hardware.",
        "",
        *md_table(header, body),
        "",
    ]


def _gap(row: dict) -> float:
    return row["final_train_acc"] - row["final_val_acc"]


def overfitting(rows: Sequence[dict]) -> list[str]:
    """Runs whose train accuracy ends well above their val accuracy, largest gap first."""
    out, fine = [], []
    for r in sorted(rows, key=_gap, reverse=True):
        name = f"{r['model']} ({r['recipe']})"
        if _gap(r) < MILD_OVERFIT:
            fine.append(name)
            continue
        verdict = "over-fits" if _gap(r) >= OVERFIT else "mildly"
        dropped = r["best_val_acc"] - r["final_val_acc"]
        out.append(
            f"- {verdict}: {name}: train {pct(r['final_train_acc'])} vs val "
            f"{pct(r['final_val_acc'])} at the last epoch (gap {points(_gap(r))} points); "
            f"val peaked at {pct(r['best_val_acc'])} in epoch {r['best_epoch']}"
            + (f" and then fell {100 * dropped:.1f} points" if dropped > 0 else "")
        )
    if fine:
        out.append(f"- no sign (gap under {100 * MILD_OVERFIT:.0f} points): {', '.join(fine)}")
    return [
        f"**Over-fitting** (train − val accuracy gap at the last epoch; ≥ {100 * OVERFIT:.0f} "
        f"points over-fits, ≥ {100 * MILD_OVERFIT:.0f} mildly):",
        "",
        *out,
        "",
    ]


def regularisation(rows: Sequence[dict]) -> list[str]:
    """Each regularised variant against its baseline (same recipe), on test accuracy."""
    by_key = {(r["experiment"], r["recipe"]): r for r in rows}
    out = []
    for r in rows:
        exp = r["planned"].experiment
        base = by_key.get((exp.baseline, r["recipe"]))
        if base is None:
            continue
        diff = r["test_acc"] - base["test_acc"]
        # Two binomial standard errors of the difference: smaller changes are test noise.
        noise = 2 * math.sqrt(
            sum(x["test_acc"] * (1 - x["test_acc"]) / x["test_images"] for x in (r, base))
        )
        verdict = "helped" if diff > noise else "hurt" if diff < -noise else "no clear effect"
        also = [f"--{k} {v}" for k, v in exp.options.items() if k not in ("dropout", "batch_norm")]
        caveat = f" (also {' '.join(also)}: not only the regulariser changed)" if also else ""
        gaps = [_gap(x) for x in (base, r)]
        out.append(
            f"- {verdict}: {exp.label()} vs {base['model']} ({r['recipe']}): test "
            f"{100 * diff:+.2f} points (noise ±{100 * noise:.2f}), train − val gap "
            f"{points(gaps[0])} → {points(gaps[1])} points{caveat}"
        )
    if not out:
        return []
    return ["**Which regularisation helped** (test accuracy vs its baseline):", "", *out, ""]


def against_reference(rows: Sequence[dict]) -> list[str]:
    """How many runs reach the reference's reported accuracy on our test split."""
    with_ref = [r for r in rows if r["reference_acc"] is not None]
    if not with_ref:
        return []
    below = [r for r in with_ref if r["test_acc"] < r["reference_acc"]]
    lines = [
        f"**Against the reference**: {len(with_ref) - len(below)} of {len(with_ref)} runs reach "
        "the reference's reported accuracy on our test split.",
        "",
    ]
    lines += [
        f"- below: {r['model']} ({r['recipe']}) {pct(r['test_acc'])} vs "
        f"{pct(r['reference_acc'])} after {epochs_text(r['epochs'])}"
        for r in below
    ]
    return [*lines, ""]
