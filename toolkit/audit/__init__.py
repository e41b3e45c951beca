"""Data checks: exact and near duplicates (leakage across splits), label errors (confident
learning on cross-validated probabilities), outliers, odd and unreadable images, and the
report; evaluation and training find an audit again by the data's fingerprint.

    DataOptions ─► audit_data ─► OUT/issues.csv, summary.json, report.html [, clean splits]
                                 └► find_audit(fingerprint) ─► evaluate, train, failures
"""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "options": ("AuditOptions",),
    "pipeline": ("AuditResult", "audit_data"),
    "record": ("AuditRecord", "find_audit", "load_audit"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
