"""report.html: the audit as pictures, one self-contained file (images inlined as PNG).

Galleries in the order a reader acts on them: duplicates that cross splits (leakage) first,
then duplicates within a split, suspected label errors (given → suggested, with the
probability of each), outliers and odd images, each sorted by score; unreadable files are a
table. Each gallery shows its MAX_SHOWN surest findings; issues.csv lists all of them.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.audit.findings import ISSUES, Finding
from toolkit.audit.rows import SPLITS, Rows

MAX_SHOWN = 120
THUMB = 96  # px on the page; small images are scaled up with visible pixels

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table.counts td, table.counts th { padding: 2px 10px; text-align: right; }
table.counts th:first-child, table.counts td:first-child { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px;
        max-width: 230px; }
.card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
            background: #eee; }
.pair { display: flex; gap: 4px; }
.path { color: #666; word-break: break-all; }
.bad { color: #b00; font-weight: bold; }
.note { color: #555; }
"""

TITLES = {
    "cross": "Duplicates across splits (leakage: a val/test image repeats a training image)",
    "exact_duplicate": "Exact duplicates within a split",
    "near_duplicate": "Near-duplicates within a split",
    "label": "Suspected label errors",
    "outlier": "Outliers (far from every training image)",
    "odd_image": "Odd images (blank, extreme aspect ratio, tiny)",
}


def png_data_uri(chw: np.ndarray) -> str:
    image = Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(rows: Rows, row: int) -> str:
    return f'<img src="{png_data_uri(rows.image(row))}" alt="">' if row >= 0 else ""


def _card(rows: Rows, f: Finding) -> str:
    e = html.escape
    if f.issue in ("exact_duplicate", "near_duplicate"):
        pictures = f'<div class="pair">{_img(rows, f.related_row)}{_img(rows, f.row)}</div>'
        kind = "exact copy" if f.issue == "exact_duplicate" else f"similarity {f.score:.3f}"
        related_label = rows.classes[rows.label[f.related_row]]
        text = (
            f"<b>{e(kind)}</b><br>{e(f.related_split)}: {e(related_label)}"
            f'<div class="path">{e(f.related_path)}</div>{e(f.split)}: {e(f.given_label)}'
            f'<div class="path">{e(f.path)}</div>'
        )
        return f'<div class="card">{pictures}{text}</div>'
    if f.issue == "label":
        text = (
            f'<span class="bad">{e(f.given_label)}</span> → <b>{e(f.suggested_label)}</b>'
            f"<br>{e(f.detail)}"
        )
    else:
        text = f"<b>score {f.score:.3f}</b><br>{e(f.detail)}"
    return (
        f'<div class="card">{_img(rows, f.row)}<br>{e(f.split)} · {text}'
        f'<div class="path">{e(f.path)}</div></div>'
    )


def _gallery(rows: Rows, title: str, findings: list[Finding]) -> str:
    if not findings:
        return f"<h2>{html.escape(title)}</h2><p class='note'>none found</p>"
    shown = sorted(findings, key=lambda f: -f.score)[:MAX_SHOWN]
    more = len(findings) - len(shown)
    note = f"<p class='note'>{len(findings)} found, surest first"
    note += f"; {more} more in issues.csv</p>" if more else "</p>"
    cards = "".join(_card(rows, f) for f in shown)
    return f"<h2>{html.escape(title)}</h2>{note}<div class='gallery'>{cards}</div>"


def _counts_table(summary: dict) -> str:
    by_issue = summary["counts"]["by_issue"]
    head = "".join(f"<th>{s}</th>" for s in SPLITS)
    body = "".join(
        f"<tr><td>{issue}</td>" + "".join(f"<td>{by_issue[issue][s]:,}</td>" for s in SPLITS)
        for issue in ISSUES
    )
    images = summary["counts"]["images"]
    total = "<tr><td><i>images audited</i></td>" + "".join(
        f"<td><i>{images[s]:,}</i></td>" for s in SPLITS
    )
    return f"<table class='counts'><tr><th>issue</th>{head}</tr>{body}{total}</tr></table>"


def render_report(rows: Rows, findings: list[Finding], summary: dict) -> str:
    """The whole page."""
    e = html.escape
    dupes = ("exact_duplicate", "near_duplicate")
    cross = [f for f in findings if f.issue in dupes and f.crosses_splits]
    sections = [_gallery(rows, TITLES["cross"], cross)]
    for issue in ("exact_duplicate", "near_duplicate", "label", "outlier", "odd_image"):
        chosen = [
            f for f in findings if f.issue == issue and not (issue in dupes and f.crosses_splits)
        ]
        sections.append(_gallery(rows, TITLES[issue], chosen))
    unreadable = [f for f in findings if f.issue == "unreadable"]
    if unreadable:
        lines = "".join(f"<tr><td>{e(f.path)}</td><td>{e(f.detail)}</td></tr>" for f in unreadable)
        sections.append(f"<h2>Unreadable files</h2><table>{lines}</table>")
    leak = summary["counts"]["test_images_leaking_from_train"]
    models = ", ".join(Path(m).name for m in summary["settings"]["models"])
    head = (
        f"<h1>Data audit · {e(summary['dataset'])}</h1>"
        f"<p>{e(summary['source']['path'])} · {sum(summary['counts']['images'].values()):,} "
        f"images · {e(models)} · {summary['seconds']['total']:.0f} s</p>"
        f"<p><b>{leak:,}</b> test image(s) repeat a training image.</p>" + _counts_table(summary)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Data audit · "
        f"{e(summary['dataset'])}</title><style>{STYLE}</style></head><body>{head}"
        + "".join(sections)
        + "</body></html>"
    )
