"""`toolkit audit DIR`: the data check, as a command (registered by toolkit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.audit.options import AuditOptions
from toolkit.cli.options import with_declared_options
from toolkit.cli.output import console, friendly_errors, summary_table
from toolkit.data.specs import DataOptions
from toolkit.options import declared, given_values

# The audit reads the source's own splits, carves no val, and reports unreadable files
# instead of stopping on them; the folder is its argument.
AUDIT_DATA_OPTIONS = [
    o for o in declared(DataOptions) if o.name not in ("data_dir", "val_fraction", "bad_files")
]


@friendly_errors
@with_declared_options(AUDIT_DATA_OPTIONS, declared(AuditOptions))
def audit_cmd(
    data_dir: Path = typer.Argument(
        None, help="Class-folder tree to audit (train/, optional val/ and test/)."
    ),
    **flags,
):
    """Check the data: duplicates leaking across splits, wrong labels, outliers, odd and
    unreadable images -> OUT/issues.csv, summary.json, report.html."""
    from toolkit.audit import audit_data

    data = DataOptions(
        **given_values(AUDIT_DATA_OPTIONS, flags),
        data_dir=str(data_dir.resolve()) if data_dir else None,
    )
    options = AuditOptions(**given_values(declared(AuditOptions), flags))
    result = audit_data(data, options)
    counts = result.summary["counts"]
    found = {issue: sum(per.values()) for issue, per in counts["by_issue"].items()}
    console.print(
        summary_table(
            "audit",
            {
                "data": f"{result.summary['dataset']} ({result.summary['source']['path']})",
                "images": " / ".join(f"{n:,} {s}" for s, n in counts["images"].items() if n),
                **{f"{issue} findings": n for issue, n in found.items()},
                "test images repeating a train image": counts["test_images_leaking_from_train"],
                "labels checked in": ", ".join(result.summary["settings"]["labels_checked"]),
                "seconds": result.summary["seconds"]["total"],
            },
        )
    )
    if result.splits_written is not None:
        kept = ", ".join(f"{n:,} {s}" for s, n in result.splits_written.items())
        console.print(f"clean split files ({kept}) in {flags['write_splits']}", soft_wrap=True)
    console.print(f"report: {result.folder / 'report.html'}", soft_wrap=True)
