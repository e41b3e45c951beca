"""What a data audit changes in an evaluation: the accuracy without the doubtful images, and
which failures may be the label's fault.

An audit of the very data the run was trained on (same fingerprint, toolkit.audit.record)
names the evaluated split's images that repeat a training image (leaked: partly memory) and
those whose label it doubts. The accuracy is then reported twice, both labelled: on the whole
split, and on the split without them. Without an audit the report says none was run.
"""

from __future__ import annotations

import torch

from toolkit.audit.record import find_audit
from toolkit.data import DataBundle

NO_AUDIT = "none run on this data: `toolkit audit` checks it for leaked duplicates and wrong labels"


def audit_report(
    data: DataBundle, split: str, labels: torch.Tensor, predictions: dict, data_root
) -> tuple[dict, dict[int, str]]:
    """(metrics.json's "audit" block, {index in the split: the class the audit suggests}).

    `predictions` maps a name ("plain", "tta") to predicted classes for the split's images.
    """
    record = find_audit(data.fingerprint, data_root)
    if record is None:
        return {"audit": None, "note": NO_AUDIT}, {}
    paths = data.paths.get(split, ())
    leaked, doubted = record.leaked(split), record.label_doubts()
    is_leaked = torch.tensor([p in leaked for p in paths], dtype=torch.bool)
    is_doubted = torch.tensor([p in doubted for p in paths], dtype=torch.bool)
    keep = ~(is_leaked | is_doubted)
    accuracy = {}
    for name, predicted in predictions.items():
        correct = (predicted == labels).float()
        accuracy[name] = {
            "whole": correct.mean().item(),
            "without_flagged": correct[keep].mean().item() if keep.any() else None,
        }
    report = {
        "audit": str(record.folder),
        "audited": record.summary.get("created"),
        "images": len(paths),
        "excluded": {
            "leaked_from_train": int(is_leaked.sum()),
            "label_doubted": int(is_doubted.sum()),
            "total": int((~keep).sum()),
        },
        "accuracy": accuracy,
    }
    doubts = {i: doubted[p] for i, p in enumerate(paths) if p in doubted}
    return report, doubts
