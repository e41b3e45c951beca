"""Findings: one row of issues.csv each, and the counts summary.json gives of them.

A duplicate pair is one row: `path` is the copy an honest evaluation should drop (the
val/test side of a pair that crosses splits, else the later file) and `related_path` the
image it repeats. Every path is relative to the data root.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import asdict, dataclass

from toolkit.audit.rows import SPLITS, Rows

ISSUES = ("unreadable", "exact_duplicate", "near_duplicate", "label", "outlier", "odd_image")
COLUMNS = (
    "path",
    "split",
    "issue",
    "score",
    "given_label",
    "suggested_label",
    "related_path",
    "related_split",
    "detail",
)
SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class Finding:
    path: str
    split: str
    issue: str
    score: float  # higher = surer; comparable within one issue type only
    given_label: str = ""
    suggested_label: str = ""
    related_path: str = ""
    related_split: str = ""
    detail: str = ""
    row: int = -1  # the audit's row (toolkit.audit.rows), -1 for a file that never decoded
    related_row: int = -1

    @property
    def crosses_splits(self) -> bool:
        return bool(self.related_split) and self.related_split != self.split

    @property
    def leaks_into_train(self) -> bool:
        """A val/test image that repeats a training image: its accuracy is partly memory."""
        return self.issue in ("exact_duplicate", "near_duplicate") and (
            self.split != "train" and self.related_split == "train"
        )


def pair_finding(rows: Rows, i: int, j: int, issue: str, score: float, detail: str = "") -> Finding:
    """A duplicate pair as one finding, `path` being the copy to drop: the one in the later
    split (test over val over train), else the later row."""
    first, second = sorted((i, j), key=lambda r: (SPLIT_ORDER[str(rows.split[r])], r))
    return Finding(
        path=rows.path[second],
        split=str(rows.split[second]),
        issue=issue,
        score=round(float(score), 6),
        given_label=rows.classes[rows.label[second]],
        related_path=rows.path[first],
        related_split=str(rows.split[first]),
        detail=detail or f"repeats a {rows.classes[rows.label[first]]} image",
        row=second,
        related_row=first,
    )


def row_finding(rows: Rows, row: int, issue: str, score: float, **extra) -> Finding:
    return Finding(
        path=rows.path[row],
        split=str(rows.split[row]),
        issue=issue,
        score=round(float(score), 6),
        given_label=rows.classes[rows.label[row]],
        row=row,
        **extra,
    )


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """By issue (ISSUES' order), cross-split pairs first, then surest first."""
    return sorted(
        findings, key=lambda f: (ISSUES.index(f.issue), not f.crosses_splits, -f.score, f.path)
    )


def issues_csv(findings: list[Finding]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for f in findings:
        writer.writerow(asdict(f))
    return out.getvalue()


def read_issues_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def counts(findings: list[Finding], rows: Rows) -> dict:
    """Findings per issue and split (every pair counted once, at its `path`), the
    cross-split duplicate pairs, and the images flagged at least once per split."""
    per = {issue: {s: 0 for s in SPLITS} for issue in ISSUES}
    for f in findings:
        per[f.issue][f.split] += 1
    # Only duplicate pairs relate two images, so only they can cross splits.
    leaks = Counter(f"{f.split}->{f.related_split}" for f in findings if f.crosses_splits)
    images = {s: int((rows.split == s).sum()) for s in SPLITS}
    return {
        "images": images,
        "by_issue": per,
        "cross_split_duplicates": dict(sorted(leaks.items())),
        "test_images_leaking_from_train": len(
            {f.path for f in findings if f.split == "test" and f.leaks_into_train}
        ),
        "flagged_images": {s: len({f.path for f in findings if f.split == s}) for s in SPLITS},
    }
