"""`toolkit audit`: load the data as training would, run every check, write the audit folder.

    DataOptions ─► Rows ─► pixels (unreadable, exact duplicates, odd images)
                        ─► models (cross-validated, or --model) ─► probabilities, embeddings
                        ─► neighbours (near-duplicates, outliers) and confident learning (labels)
                        ─► OUT/issues.csv, summary.json, report.html, outputs.npz [, splits]

Nothing here trusts a file to decode: a damaged one is a finding (`unreadable`), never a crash.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from toolkit.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from toolkit.audit import files, labels, neighbours
from toolkit.audit.findings import (
    Finding,
    counts,
    issues_csv,
    pair_finding,
    row_finding,
    sort_findings,
)
from toolkit.audit.options import AuditOptions
from toolkit.audit.record import ISSUES_FILE, REPORT_FILE, SUMMARY_FILE, register
from toolkit.audit.report import render_report
from toolkit.audit.rows import SPLITS, Rows
from toolkit.audit.splits import write_clean_splits
from toolkit.data import DataOptions, load_data
from toolkit.data.decode import relative_name
from toolkit.errors import ToolkitError
from toolkit.version import __version__

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.npz"
SPLIT_FILE_LINE = re.compile(
    r"^(?P<file>.+\.txt):(?P<line>\d+): (?P<what>.+)$"
)  # probabilities and neighbours, for benchmarks and re-reading


@dataclass
class AuditResult:
    folder: Path
    summary: dict
    findings: list[Finding]
    splits_written: dict[str, int] | None = None


class Stages:
    """Seconds per stage, for summary.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("audit: %s", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def audit_data(data: DataOptions, options: AuditOptions) -> AuditResult:
    start, stage = time.perf_counter(), Stages()
    # The source's own splits: no val carved out of train (train is checked whole), and
    # files that do not decode are findings, not a reason to stop.
    data = replace(data, val_fraction=0.0, bad_files="skip")
    if options.write_splits and not (data.data_dir or data.splits):  # before any work
        raise ToolkitError(
            "--write-splits lists image files, and the official CIFAR-10/STL-10 files hold "
            "arrays: audit a class-folder copy (--data-dir) to write split files"
        )
    with stage("load"):
        bundle = load_data(data)
    rows = Rows.of(bundle)
    out = _audit_folder(options.out, bundle.spec.name)
    findings = unreadable_findings(bundle)
    with stage("pixels"):
        findings += pixel_findings(rows)
    with stage("models"):
        outputs = _model_outputs(rows, data, options, out)
    with stage("neighbours"):
        found, geometry = neighbour_findings(rows, outputs.embeddings, options, findings)
        findings += found
    with stage("labels"):
        checked = [s for s in SPLITS if s != "train" or outputs.train_out_of_sample]
        findings += label_findings(rows, outputs.probs, checked)
    findings = sort_findings(findings)
    settings = {
        **asdict(options),
        "models": outputs.models,
        "labels_checked": checked,
        "outlier_fence": geometry["outlier_fence"],
        "image_size": bundle.image_size,
    }
    stage.seconds["total"] = round(time.perf_counter() - start, 2)
    summary = _summary(rows, findings, settings, stage.seconds)
    np.savez_compressed(
        out / OUTPUTS_FILE,
        probs=outputs.probs,
        labels=rows.label,
        split=rows.split,
        path=np.asarray(rows.path),
        **{k: v for k, v in geometry.items() if k != "outlier_fence"},
    )
    atomic_write_text(out / ISSUES_FILE, issues_csv(findings))
    atomic_write_bytes(out / REPORT_FILE, render_report(rows, findings, summary).encode())
    written = None
    if options.write_splits:
        written = write_clean_splits(rows, findings, Path(options.write_splits))
        summary["splits_written"] = {"folder": options.write_splits, "images": written}
    atomic_write_json(out / SUMMARY_FILE, summary)  # last: its presence marks a whole audit
    register(out, bundle.fingerprint, data.data_root)
    return AuditResult(out, summary, findings, written)


def _audit_folder(out: str | None, dataset: str) -> Path:
    folder = Path(out) if out else Path("audits") / f"{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    if folder.exists() and any(folder.iterdir()):
        raise ToolkitError(f"audit folder '{folder}' is not empty; pass another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolkitError(f"cannot create audit folder '{folder}': {exc.strerror}") from exc
    return folder


def _model_outputs(rows: Rows, data: DataOptions, options: AuditOptions, out: Path):
    if options.model is not None:
        from toolkit.audit.reuse import reused_outputs

        return reused_outputs(Path(options.model), rows, options.device)
    from toolkit.audit.crossval import cross_validate
    from toolkit.models import get_entry
    from toolkit.train.config import TrainConfig

    model_options = (
        {"width": options.width} if "width" in get_entry(options.cv_model).options else {}
    )
    config = TrainConfig.from_recipe(
        options.cv_model,
        data,
        model_options=model_options,
        epochs=options.epochs,
        batch_size=options.batch_size,
        seed=options.seed,
        tta=0,
        device=options.device,
    )
    return cross_validate(rows, config, options.folds, out / "models", options.device)


# --- the checks, each a list of findings --------------------------------------------------


def unreadable_findings(bundle) -> list[Finding]:
    """The files load_data left out (`skipped`: 'file: why', or 'split.txt:line: what' for a
    split file's line), one finding each."""
    root = Path(bundle.source["path"])
    out = []
    for entry in bundle.skipped:
        line = SPLIT_FILE_LINE.match(entry)
        if line:
            split = Path(line["file"]).stem
            path, _, why = line["what"].partition(": ")
            if not why:  # the line itself is unusable (no label, a label out of range)
                path, why = f"{Path(line['file']).name}:{line['line']}", line["what"]
        else:
            where, _, why = entry.partition(": ")
            path = relative_name(Path(where), root)
            split = path.split("/")[0]
        out.append(Finding(path=path, split=split, issue="unreadable", score=1.0, detail=why))
    return out


def pixel_findings(rows: Rows) -> list[Finding]:
    """Exact duplicates (the same decoded pixels) and odd images, from one full decode."""
    if rows.bundle.source["kind"] == "official":
        pixels = [p for name in SPLITS for p in files.scan_arrays(rows.images(name), name)]
    else:
        root = Path(rows.bundle.source["path"])
        pixels = files.scan_files([root / p for p in rows.path], "image files")
    out = []
    for group in files.exact_groups([p.digest for p in pixels]):
        keep = min(group, key=lambda r: (SPLITS.index(str(rows.split[r])), r))
        out += [pair_finding(rows, keep, r, "exact_duplicate", 1.0) for r in group if r != keep]
    for row, p in enumerate(pixels):
        for why, score in files.odd_reasons(p) if p.digest else []:
            out.append(row_finding(rows, row, "odd_image", score, detail=why))
    return out


def neighbour_findings(
    rows: Rows, embeddings: np.ndarray, options: AuditOptions, found: list[Finding]
) -> tuple[list[Finding], dict]:
    """Near-duplicates (candidates close in the joint space, verified by aligned pixel
    correlation) and outliers (far from every training neighbourhood); also the arrays
    outputs.npz keeps of them."""
    pixels = np.concatenate([neighbours.pixel_descriptors(rows.images(s)) for s in SPLITS])
    near = neighbours.nearest(neighbours.joint_space(embeddings, pixels), rows.where("train"))
    candidates = neighbours.similar_pairs(near, neighbours.CANDIDATE_SIMILARITY)
    pairs = np.array([(i, j) for i, j, _ in candidates], dtype=np.int64).reshape(-1, 2)
    small = torch.cat([neighbours.small_copies(rows.images(s)) for s in SPLITS])
    correlation = neighbours.pair_correlations(small, pairs)
    fence = neighbours.outlier_fence(near.outlier_score[rows.where("train")])
    out = near_duplicate_findings(rows, pairs, correlation, options.near_threshold, found)
    out += outlier_findings(rows, near.outlier_score, fence)
    geometry = {
        "neighbour_index": near.index,
        "neighbour_similarity": near.similarity,
        "outlier_score": near.outlier_score,
        "outlier_fence": fence,
        "candidate_pairs": pairs,
        "candidate_similarity": np.array([c for *_, c in candidates], dtype=np.float32),
        "candidate_correlation": correlation,
    }
    return out, geometry


def near_duplicate_findings(
    rows: Rows, pairs: np.ndarray, correlation: np.ndarray, threshold: float, found: list[Finding]
) -> list[Finding]:
    """Candidate pairs whose aligned pixel correlation reaches `threshold`, exact copies left
    out (they are findings already)."""
    # Exact copies of one picture are one picture here: each maps to the copy that is kept.
    kept = {f.row: f.related_row for f in found if f.issue == "exact_duplicate"}
    out = []
    for (i, j), r in zip(pairs.tolist(), correlation.tolist(), strict=True):
        if r < threshold or kept.get(i, i) == kept.get(j, j):
            continue
        detail = f"pixel correlation {r:.3f} after aligning (up to {neighbours.MAX_SHIFT} px)"
        out.append(pair_finding(rows, i, j, "near_duplicate", r, detail=detail))
    return out


def outlier_findings(rows: Rows, scores: np.ndarray, fence: float) -> list[Finding]:
    return [
        row_finding(
            rows,
            r,
            "outlier",
            scores[r],
            detail=f"mean distance to its nearest training images {scores[r]:.3f} "
            f"(fence {fence:.3f})",
        )
        for r in np.flatnonzero(scores > fence)
    ]


def label_findings(rows: Rows, probs: np.ndarray, splits: list[str]) -> list[Finding]:
    out = []
    for split in splits:
        for issue in labels.label_issues(rows.label, probs, rows.where(split)):
            given, suggested = rows.label[issue.row], issue.suggested
            detail = (
                f"p({rows.classes[given]}) = {probs[issue.row, given]:.2f}, "
                f"p({rows.classes[suggested]}) = {probs[issue.row, suggested]:.2f}"
            )
            out.append(
                row_finding(
                    rows,
                    issue.row,
                    "label",
                    issue.score,
                    suggested_label=rows.classes[suggested],
                    detail=detail,
                )
            )
    return out


def _summary(rows: Rows, findings: list[Finding], settings: dict, seconds: dict) -> dict:
    bundle = rows.bundle
    return {
        "dataset": bundle.spec.name,
        "classes": list(bundle.spec.classes),
        "source": bundle.source,
        "fingerprint": bundle.fingerprint,
        "test_is_carved": bundle.test_is_carved,
        "counts": counts(findings, rows),
        "class_balance": {
            split: {
                c: int(((rows.split == split) & (rows.label == k)).sum())
                for k, c in enumerate(bundle.spec.classes)
            }
            for split in SPLITS
        },
        "settings": settings,
        "seconds": seconds,
        "created": datetime.now().isoformat(timespec="seconds"),
        "toolkit_version": __version__,
    }
