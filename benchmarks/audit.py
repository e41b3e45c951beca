"""How well `toolkit audit` finds planted problems in the real CIFAR-10, and what it finds in
the unmodified one -> benchmarks/audit.{json,md}.

    python -m benchmarks.audit --data-dir ../shared/data/cifar10 --work runs/audit-bench

Three audits with the default settings, each saved as it ends (a rerun measures only what is
missing):
- `real`: the unmodified images;
- `uniform`: a copy (symlinks) with 5 % of train relabelled to a random other class, plus
  planted near-duplicates and exact copies;
- `human`: the same, with the flips people make (cat<->dog, automobile<->truck,
  deer<->horse, bird<->airplane).
Planted near-duplicates: PLANTED_NEAR train images put into test after a JPEG re-encode at
another quality, a 1-2 px shift, a brightness change or a resize round trip (a quarter
each); exact copies: PLANTED_EXACT files copied under new names, half into test, half within
train. Nothing is tuned on test: the ground truth is what was planted.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

PLANTED_NEAR = 240
PLANTED_EXACT = 60
FLIP_SHARE = 0.05
HUMAN_PAIRS = (("cat", "dog"), ("automobile", "truck"), ("deer", "horse"), ("bird", "airplane"))
THRESHOLDS = (0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)


def cpu_name() -> str:
    """The model name and whether the CPU has the bf16 units `--amp auto` trains with."""
    name, flags = platform.processor() or "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "with" if flags & {"avx512_bf16", "amx_bf16"} else "without"
    return f"{name} ({vector}, {bf16} bf16 instructions)"


def _near_copy(path: Path, kind: int, rng) -> Image.Image:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if kind == 0:  # JPEG at another quality
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=int(rng.integers(50, 66)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    array = np.asarray(rgb).astype(np.float32)
    if kind == 1:  # shift by 1-2 px, edges repeated
        dy, dx = rng.integers(-2, 3, 2)
        dy, dx = (dy or 1), (dx or -1)
        array = np.roll(array, (dy, dx), axis=(0, 1))
    elif kind == 2:  # brightness
        array = array * float(rng.choice([0.85, 1.15])) + float(rng.integers(-10, 11))
    else:  # resize round trip
        small = rgb.resize((22, 22), Image.BILINEAR)
        return small.resize(rgb.size, Image.BILINEAR)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def plant(source: Path, target: Path, flips: str, seed: int = 0) -> dict:
    """A symlinked copy of `source` with planted problems; returns the ground truth."""
    rng = np.random.default_rng(seed)
    if target.exists():
        shutil.rmtree(target)
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    train = [(c, p) for c in classes for p in sorted((source / "train" / c).iterdir())]
    order = rng.permutation(len(train))
    n_flip = int(FLIP_SHARE * len(train))
    if flips == "uniform":
        chosen = order[:n_flip]
        new_label = {
            int(i): classes[
                (classes.index(train[i][0]) + rng.integers(1, len(classes))) % len(classes)
            ]
            for i in chosen
        }
    else:
        partner = {a: b for x, y in HUMAN_PAIRS for a, b in ((x, y), (y, x))}
        eligible = [int(i) for i in order if train[i][0] in partner]
        chosen = np.array(eligible[:n_flip])
        new_label = {i: partner[train[i][0]] for i in chosen.tolist()}
    rest = [int(i) for i in order[n_flip:] if int(i) not in new_label]
    near_src, exact_src = rest[:PLANTED_NEAR], rest[PLANTED_NEAR : PLANTED_NEAR + PLANTED_EXACT]
    truth = {"flipped": [], "near": [], "exact": []}
    for split in ("train", "test"):
        for c in classes:
            (target / split / c).mkdir(parents=True)
    for i, (c, path) in enumerate(train):
        label = new_label.get(i, c)
        name = path.name if label == c else f"flip-{c}-{path.name}"
        (target / "train" / label / name).symlink_to(path.resolve())
        if label != c:
            truth["flipped"].append(f"train/{label}/{name}")
    for c in classes:
        for path in sorted((source / "test" / c).iterdir()):
            (target / "test" / c / path.name).symlink_to(path.resolve())
    for k, i in enumerate(near_src):
        c, path = train[i]
        name = f"test/{c}/near-{k:04d}.png"
        _near_copy(path, k % 4, rng).save(target / name)
        truth["near"].append(
            [name, f"train/{c}/{path.name}", ["jpeg", "shift", "bright", "resize"][k % 4]]
        )
    for k, i in enumerate(exact_src):
        c, path = train[i]
        split = "test" if k % 2 == 0 else "train"
        name = f"{split}/{c}/copy-{k:04d}{path.suffix}"
        shutil.copyfile(path, target / name)
        truth["exact"].append([name, f"train/{c}/{path.name}"])
    return truth


def _prf(found: set, truth: set) -> dict:
    hit = len(found & truth)
    return {
        "found": len(found),
        "planted": len(truth),
        "precision": hit / len(found) if found else None,
        "recall": hit / len(truth) if truth else None,
    }


def score_planted(audit_dir: Path, truth: dict) -> dict:
    from cleanlab.count import num_label_issues

    from toolkit.audit import load_audit

    record = load_audit(audit_dir)
    rows = record.findings
    out = {}
    flagged = {r["path"] for r in rows if r["issue"] == "label" and r["split"] == "train"}
    out["label_filter"] = _prf(flagged, set(truth["flipped"]))
    # The ranking: the train rows least confident in their given label, at the noise rate
    # confident learning estimates and at the true one.
    outputs = np.load(audit_dir / "outputs.npz")
    probs, labels, split = outputs["probs"], outputs["labels"], outputs["split"]
    paths = outputs["path"]
    train = np.flatnonzero(split == "train")
    p = np.clip(probs[train].astype(np.float64), 1e-7, 1)
    p /= p.sum(1, keepdims=True)
    self_conf = p[np.arange(len(train)), labels[train]]
    ranked = paths[train][np.argsort(self_conf)]
    estimated = int(num_label_issues(labels[train], p))
    for name, n in (("rank_at_estimated", estimated), ("rank_at_true", len(truth["flipped"]))):
        out[name] = {"n": n, **_prf(set(ranked[:n].tolist()), set(truth["flipped"]))}
    pairs = {
        (r["path"], r["related_path"])
        for r in rows
        if r["issue"] in ("near_duplicate", "exact_duplicate")
    }
    near_truth = {(a, b) for a, b, _ in truth["near"]}
    out["near_recall"] = len(near_truth & pairs) / len(near_truth)
    out["near_recall_by_kind"] = {
        kind: sum((a, b) in pairs for a, b, k in truth["near"] if k == kind)
        / sum(1 for *_, k in truth["near"] if k == kind)
        for kind in ("jpeg", "shift", "bright", "resize")
    }
    exact_pairs = {(r["path"], r["related_path"]) for r in rows if r["issue"] == "exact_duplicate"}
    exact_truth = {tuple(x) for x in truth["exact"]}
    out["exact"] = {
        "recall": len(exact_truth & exact_pairs) / len(exact_truth),
        "found": len(exact_pairs),
        "planted": len(exact_truth),
    }
    out["near_at_threshold"] = threshold_sweep(audit_dir, near_truth)
    return out


def threshold_sweep(audit_dir: Path, near_truth: set) -> dict:
    """Planted-pair recall and the test images with a train match at each pixel-correlation
    threshold, from the saved candidate pairs (no re-run)."""
    outputs = np.load(audit_dir / "outputs.npz")
    return sweep(outputs, near_truth)


def sweep(outputs, near_truth: set | None) -> dict:
    paths, split = outputs["path"].tolist(), outputs["split"]
    pairs, r = outputs["candidate_pairs"], outputs["candidate_correlation"]
    index = {p: i for i, p in enumerate(paths)}
    found = {(int(i), int(j)): float(c) for (i, j), c in zip(pairs, r, strict=True)}
    crossing = (split[pairs[:, 0]] == "train") & (split[pairs[:, 1]] == "test")
    crossing |= (split[pairs[:, 0]] == "test") & (split[pairs[:, 1]] == "train")
    test_side = np.where(split[pairs[:, 0]] == "test", pairs[:, 0], pairs[:, 1])
    out = {"candidates": len(pairs), "rows": []}
    planted = []
    if near_truth:
        for a, b in near_truth:
            i, j = sorted((index[a], index[b]))
            planted.append(found.get((i, j), -1.0))
        out["candidate_recall"] = float(np.mean([c > -1 for c in planted]))
    for t in THRESHOLDS:
        row = {
            "threshold": t,
            "test_images_with_a_train_match": int(len(set(test_side[crossing & (r >= t)]))),
        }
        if planted:
            row["planted_recall"] = float(np.mean([c >= t for c in planted]))
        out["rows"].append(row)
    return out


def run(kind: str, data_dir: Path, work: Path) -> dict:
    from toolkit.audit import AuditOptions, audit_data
    from toolkit.data import DataOptions

    truth = None
    source = data_dir
    if kind != "real":
        source = work / f"planted-{kind}"
        truth = plant(data_dir, source, kind)
    out = work / f"audit-{kind}"
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    result = audit_data(
        DataOptions(data_dir=str(source), data_root=str(work / "data-root")),
        AuditOptions(out=str(out)),
    )
    wall = time.perf_counter() - start
    summary = result.summary
    entry = {
        "kind": kind,
        "wall_seconds": round(wall, 1),
        "stage_seconds": summary["seconds"],
        "counts": summary["counts"],
        "settings": {
            k: summary["settings"][k]
            for k in ("cv_model", "width", "folds", "epochs", "batch_size", "near_threshold")
        },
    }
    if truth is not None:
        entry["planted"] = {k: len(v) for k, v in truth.items()}
        entry["scores"] = score_planted(out, truth)
    else:
        entry["near_at_threshold"] = sweep(np.load(out / "outputs.npz"), None)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/audit-bench"))
    parser.add_argument("--only", default="real,uniform,human")
    parser.add_argument("--report", action="store_true", help="Only rewrite audit.md/.json.")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    so_far = work / "runs-so-far.json"
    results = json.loads(so_far.read_text()) if so_far.exists() else {}
    for kind in [] if args.report else args.only.split(","):
        if kind in results:
            continue
        results[kind] = run(kind, args.data_dir.resolve(), work)
        so_far.write_text(json.dumps(results, indent=1))
    report = {
        "cpu": cpu_name(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "results": results,
        "command": "python -m benchmarks.audit --data-dir ../shared/data/cifar10",
    }
    here = Path(__file__).parent
    (here / "audit.json").write_text(json.dumps(report, indent=1) + "\n")
    (here / "audit.md").write_text(markdown(report))
    print(markdown(report))


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def markdown(report: dict) -> str:
    """The tables of audit.md (the prose around them is written by hand into docs/audit.md)."""
    results = report["results"]
    newest = results.get("real") or next(iter(results.values()))
    settings = ", ".join(f"{k} {v}" for k, v in newest["settings"].items())
    lines = [
        "# `toolkit audit` on the real CIFAR-10",
        "",
        f"Machine: {report['cpu']}, {report['cores']} cores. Settings (the defaults, as `real` "
        f"and `human` ran; `uniform` ran at near_threshold 0.9): {settings}.",
        f"Reproduce: `{report['command']}`.",
        "",
        "## Time (all 60,000 images and the planted copies)",
        "",
        "| audit | images | wall s | load | pixels | models | neighbours | labels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, r in results.items():
        s = r["stage_seconds"]
        n = sum(r["counts"]["images"].values())
        lines.append(
            f"| {kind} | {n:,} | {r['wall_seconds']:,.0f} | {s['load']:.0f} | {s['pixels']:.0f} "
            f"| {s['models']:.0f} | {s['neighbours']:.0f} | {s['labels']:.0f} |"
        )
    lines += ["", "## Planted problems: precision and recall", ""]
    lines += [
        "| copy | finding | planted | flagged | precision | recall |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, r in results.items():
        if "scores" not in r:
            continue
        sc = r["scores"]
        for name, label in (
            ("label_filter", "label errors (what the audit flags)"),
            ("rank_at_estimated", "label errors, ranking at cleanlab's estimated count"),
            ("rank_at_true", "label errors, ranking at the true count (oracle)"),
        ):
            m = sc.get(name)
            if m:
                lines.append(
                    f"| {kind} | {label} | {m['planted']:,} | {m['found']:,} | "
                    f"{_pct(m['precision'])} | {_pct(m['recall'])} |"
                )
        kinds = ", ".join(f"{k} {_pct(v)}" for k, v in sc["near_recall_by_kind"].items())
        lines.append(
            f"| {kind} | near-duplicates across splits ({kinds}) | {r['planted']['near']} | — "
            f"| — | {_pct(sc['near_recall'])} |"
        )
        e = sc["exact"]
        lines.append(
            f"| {kind} | exact copies | {e['planted']} | {e['found']} | "
            f"{_pct(e['planted'] / e['found'] if e['found'] else None)} | {_pct(e['recall'])} |"
        )
    lines += ["", "## Near-duplicate threshold (pixel correlation after alignment)", ""]
    head = "| threshold |" + "".join(
        f" {k}: planted recall | {k}: test images matching train |" for k in results
    )
    lines += [head, "|---:|" + "---:|---:|" * len(results)]
    sweeps = {
        k: (r.get("scores", {}).get("near_at_threshold") or r.get("near_at_threshold"))
        for k, r in results.items()
    }
    for i, t in enumerate(THRESHOLDS):
        cells = ""
        for k in results:
            row = sweeps[k]["rows"][i]
            cells += (
                f" {_pct(row.get('planted_recall'))} | {row['test_images_with_a_train_match']:,} |"
            )
        lines.append(f"| {t} |{cells}")
    lines += ["", "## What the audit finds (counts per split: train / val / test)", ""]
    lines += [
        "| audit | " + " | ".join(ISSUE_NAMES) + " | test images repeating train |",
        "|---|" + "---:|" * (len(ISSUE_NAMES) + 1),
    ]
    for kind, r in results.items():
        by = r["counts"]["by_issue"]
        cells = " | ".join(
            f"{by[i]['train']:,} / {by[i]['val']:,} / {by[i]['test']:,}" for i in ISSUE_NAMES
        )
        lines.append(f"| {kind} | {cells} | {r['counts']['test_images_leaking_from_train']:,} |")
    return "\n".join(lines) + "\n" + HISTORY


# What earlier runs of this benchmark measured, kept because the defaults were chosen on them.
HISTORY = """
## How the defaults were chosen (earlier runs, same machine, planted `uniform` copy)

- A first run with 4 epochs per fold model, cleanlab's default filter and the embedding
  alone for near-duplicates (11.7 min): the default `prune_by_noise_rate` flagged 6,487
  images at precision 0.32 / recall 0.82, while ranking by self-confidence at cleanlab's own
  estimate of the count (4,037) reached 0.52 / 0.84: `low_self_confidence` became the rule.
  Near-duplicates by embedding similarity alone: recall 0.67 at 0.95 (shifts 0.22), and
  2,345 test images matched at the 0.88 that reached 0.94 recall: a classifier's embedding
  puts every confident image of a class close to the others. The pixel check that aligns a
  pair by up to 2 px replaced it.
- Then 8 epochs per fold (the fold models' train accuracy rose from 69 % to 78 %) and the
  image-and-mirror average: the runs below. `uniform` ran at the earlier near-duplicate
  threshold of 0.90; its sweep shows the same planted recall (98.3 %) at 0.92, the highest
  threshold that loses no planted pair, which became the default before `real` and `human`.
- During the `uniform` and `real` runs the test suite ran beside them at the lowest priority
  (nice 19), and during `human` a fresh clone's `make install` (nice 10): their times are
  upper bounds, `human`'s most of all.
"""


ISSUE_NAMES = ("unreadable", "exact_duplicate", "near_duplicate", "label", "outlier", "odd_image")


if __name__ == "__main__":
    main()
