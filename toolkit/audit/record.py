"""Where an audit is found again: by the data's fingerprint, under the data root.

`toolkit audit` registers its folder as <data root>/audits/<fingerprint>.json (the newest
audit of the same pixels and labels wins), so `toolkit evaluate` and `toolkit train` find the
audit of exactly the data they load, wherever the audit was written, and never one of other
data: a changed image or label changes the fingerprint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from toolkit.atomic import atomic_write_json
from toolkit.audit.findings import read_issues_csv
from toolkit.data.sources import default_data_root

log = logging.getLogger(__name__)

ISSUES_FILE = "issues.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"


def index_file(fingerprint: str, data_root: str | Path | None = None) -> Path:
    root = Path(data_root) if data_root else default_data_root()
    return root / "audits" / f"{fingerprint}.json"


def register(audit_dir: Path, fingerprint: str, data_root: str | Path | None = None) -> None:
    """Make `audit_dir` the audit of the data with this fingerprint."""
    entry = {"audit_dir": str(Path(audit_dir).resolve()), "registered": _now()}
    try:
        atomic_write_json(index_file(fingerprint, data_root), entry)
    except OSError as exc:  # a read-only data root: the audit stands, it is just not found
        log.warning("could not register the audit under the data root (%s)", exc)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


@dataclass
class AuditRecord:
    """A finished audit, as evaluation and training read it."""

    folder: Path
    summary: dict
    findings: list[dict]  # issues.csv's rows

    def leaked(self, split: str) -> set[str]:
        """Paths of `split` that repeat a training image (exact or near)."""
        return {
            f["path"]
            for f in self.findings
            if f["split"] == split
            and f["related_split"] == "train"
            and f["issue"] in ("exact_duplicate", "near_duplicate")
        }

    def label_doubts(self) -> dict[str, str]:
        """{path: suggested class} for every image whose label the audit doubts (a path
        names one file, whichever split a run carves it into)."""
        return {f["path"]: f["suggested_label"] for f in self.findings if f["issue"] == "label"}


def load_audit(folder: Path) -> AuditRecord:
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    findings = read_issues_csv((folder / ISSUES_FILE).read_text(encoding="utf-8"))
    return AuditRecord(folder, summary, findings)


def find_audit(fingerprint: str, data_root: str | Path | None = None) -> AuditRecord | None:
    """The registered audit of this data, or None (none run, or its folder is gone)."""
    index = index_file(fingerprint, data_root)
    if not index.is_file():
        return None
    try:
        folder = Path(json.loads(index.read_text())["audit_dir"])
        record = load_audit(folder)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("the registered audit of this data cannot be read (%s); run it again", exc)
        return None
    if record.summary.get("fingerprint") != fingerprint:
        log.warning("%s audits other data than its registration says; ignored", folder)
        return None
    return record
