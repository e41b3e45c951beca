"""`speedrun` against airbench's `train94` on this CPU, on the same CIFAR-10 images (#18).

    pip install -e '.[bench]'            # airbench 0.1.8: benchmark-only, not installed for users
    python -m benchmarks.speedrun --data-dir ../shared/data/cifar10 --seeds 2
    python -m benchmarks.speedrun --data-dir ../shared/data/cifar10 --quick   # smoke check
    python -m benchmarks.speedrun ... --recipe airbench94   # speedrun's SGD recipe (#18's figures)
    python -m benchmarks.speedrun ... --recipe muon --epochs 7   # ours at another budget
    python -m benchmarks.speedrun ... --recipe muon --flags '--micro-batch 0'   # more flags
    python -m benchmarks.speedrun ... --seeds 1 --val-seeds 0 --work W   # one seed's pair now,
    python -m benchmarks.speedrun ... --seeds 2 --val-seeds 0 --work W   # the next one later

In one invocation, for every seed:
- peer: airbench's `train94` from the PyPI package, run on the CPU through a minimal shim
  (in its own process, so the patches touch nothing else): `.half()` and `.cuda()` are
  no-ops, every forward runs under bf16 autocast entered per call (one outer autocast region
  would freeze the bf16 weight copies: the net stays at ~14 %) with the whitening layer in
  fp32, CUDA events are wall-clock timers, and its train.pt / test.pt are written from the
  images the toolkit decoded. --peer-precision auto (the default) is bf16 only where the CPU
  has it natively (AVX512-BF16 or AMX), else fp32, as our --amp auto: emulated bf16 is
  5-20x slower than fp32 on an AVX2 CPU;
- ours: `toolkit train speedrun --val-fraction 0` (all 50,000, final weights), and the
  default 45,000-image run (val carved, best epoch on val), through the normal CLI, each
  then `toolkit evaluate`d once on test.

Training seconds follow airbench's own rule: whitening init + training + the TTA evaluation
(not decoding, not per-epoch evaluation); whole-command wall time is reported beside them.
Writes benchmarks/speedrun.{json,md} (--out elsewhere; --quick writes speedrun-quick.*; the
writer and the targets are in benchmarks/speedrun_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speedrun_report import markdown, summary, targets

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
QUICK_PER_CLASS = (300, 100)  # --quick: train and test images per class, 1 epoch
PARTIAL = "runs-so-far.json"  # in --work: every run measured so far
LABELS = ("peer", "ours_all", "ours_val")


# --- the peer, in its own process -------------------------------------------------------------


def peer_worker(data: Path, seed: int, epochs: float | None, result: Path, bf16: bool) -> None:
    """Run airbench.train94 on the CPU (see the module doc for the shim) and write
    {tta_accuracy, seconds} to `result`."""
    import airbench
    import torch
    from airbench import utils
    from torch import nn

    torch.Tensor.half = lambda self, *a, **k: self  # fp32 data and weights: autocast is bf16
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.half = lambda self: self
    nn.Module.cuda = lambda self, *a, **k: self
    load = torch.load
    torch.load = lambda f, *a, **k: load(f, *a, **{**k, "map_location": "cpu"})

    class WallClockEvent:  # torch.cuda.Event(enable_timing=True) on a CPU
        def __init__(self, *a, **k):
            self.t = 0.0

        def record(self, *a):
            self.t = time.perf_counter()

        def elapsed_time(self, end) -> float:
            return 1e3 * (end.t - self.t)

    torch.cuda.Event = WallClockEvent
    torch.cuda.synchronize = lambda *a, **k: None

    def make_net():
        net = airbench.make_net94()
        whiten, forward = net[0], net.forward
        whiten_forward = whiten.forward

        def fp32_whiten(x):  # 1/sqrt(eigenvalue) filters: bf16 would round them away
            with torch.autocast("cpu", enabled=False):
                return whiten_forward(x.float())

        def bf16_forward(x):  # per call: the bf16 weight copies follow every step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(x)

        if bf16:
            whiten.forward, net.forward = fp32_whiten, bf16_forward
        return net

    final: dict = {}
    show = utils.print_training_details

    def capture(variables, is_final_entry):
        if is_final_entry:
            final.update(
                tta_accuracy=variables["tta_val_acc"], seconds=variables["total_time_seconds"]
            )
        show(variables, is_final_entry)

    utils.print_training_details = capture
    os.chdir(data)  # airbench reads ./cifar10/{train,test}.pt
    torch.manual_seed(seed)
    loader = utils.CifarLoader(
        "cifar10",
        train=True,
        batch_size=1024,
        aug=airbench.lib_airbench94.hyp["aug"],
        altflip=True,
        gpu="cpu",
    )
    kwargs = {} if epochs is None else {"epochs": epochs}
    airbench.train94(loader, make_net=make_net, **kwargs)
    result.write_text(json.dumps({**final, "threads": torch.get_num_threads()}))


def write_peer_data(bundle, folder: Path) -> None:
    """airbench's cifar10/{train,test}.pt (uint8 N×H×W×C) from the toolkit's decode."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", bundle.train), ("test", bundle.test)):
        torch.save(
            {
                "images": split.images.permute(0, 2, 3, 1).contiguous(),
                "labels": split.labels,
                "classes": list(bundle.spec.classes),
            },
            folder / f"{name}.pt",
        )


def peer(work: Path, seed: int, epochs, precision: str) -> dict:
    """One peer run in its own process; its result plus the whole call's wall time."""
    result = work / f"peer-{seed}.json"
    start = time.perf_counter()
    worker = [str(work / "peer"), str(seed), str(epochs or "-"), str(result), precision]
    subprocess.run(
        [sys.executable, "-m", "benchmarks.speedrun", "--peer-worker", *worker],
        check=True,
        cwd=REPO,
    )
    return {**json.loads(result.read_text()), "wall_seconds": time.perf_counter() - start}


# --- ours: the normal CLI --------------------------------------------------------------------


def _toolkit(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "toolkit", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def ours(
    data_dir: Path, run_dir: Path, seed: int, val_fraction: float | None, epochs, recipe, more=""
) -> dict:
    """Train and evaluate one run; airbench's timing rule from its files (the TTA seconds are
    the evaluation's own timing of its TTA pass over the test split)."""
    import torch

    from toolkit.run.folder import read_metrics

    flags = ["--data-dir", str(data_dir), "--seed", str(seed), "--run-dir", str(run_dir)]
    if val_fraction is not None:
        flags += ["--val-fraction", str(val_fraction)]
    if epochs is not None:
        flags += ["--epochs", str(epochs)]
    if recipe is not None:
        flags += ["--recipe", recipe]
    flags += shlex.split(more)
    wall = _toolkit("train", "speedrun", *flags)
    wall += _toolkit("evaluate", str(run_dir))
    record = json.loads((run_dir / "eval" / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    history = read_metrics(run_dir)
    train_seconds = sum(r["seconds"] for r in history)
    tta_seconds = record["tta"]["seconds"]
    return {
        "tta_accuracy": record["tta"]["accuracy"],
        "accuracy_without_tta": record["accuracy"],
        "seconds": config["prepare_seconds"] + train_seconds + tta_seconds,
        "prepare_seconds": config["prepare_seconds"],
        "train_seconds": train_seconds,
        "tta_seconds": tta_seconds,
        "tta_with_views": record["tta"].get("with_views", 1.0),
        "recipe": config["recipe"],
        "epochs": len(history),
        "wall_seconds": wall,
        "train_images": config["sizes"]["train"],
        "micro_batch": config["micro_batch"],
        "selection": config["selection"],
        "engine": config["engine"],
        "threads": torch.get_num_threads(),
    }


# --- the comparison --------------------------------------------------------------------------


def cpu_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
    return {
        "model": model or platform.processor(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def subset_folder(source: Path, target: Path, per_class: tuple[int, int]) -> Path:
    """--quick: a folder of symlinks to the first N images per class of each split."""
    for split, n in zip(("train", "test"), per_class, strict=True):
        for cls in sorted((source / split).iterdir()):
            out = target / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                if not (out / f.name).is_symlink():  # a later call with the same --work
                    (out / f.name).symlink_to(f.resolve())
    return target


def load_partial(partial: Path, setup: dict) -> dict:
    """What an earlier call with this --work saved ({} if none); exits with one line naming
    what differs if it was measured with another setup."""
    saved = json.loads(partial.read_text()) if partial.exists() else {}
    before = saved.get("setup", setup)
    changed = [f"{k} {before.get(k)} -> {v}" for k, v in setup.items() if before.get(k) != v]
    if changed:
        sys.exit(f"{partial} was measured with another {', '.join(changed)}: use a new --work")
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/cifar10")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--val-seeds", type=int, help="seeds of the 45,000-image default run (default: --seeds)"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch on a small subset")
    parser.add_argument("--work", type=Path, help="run folders and peer data (default: tmp)")
    parser.add_argument("--out", type=Path, help="where the .json/.md go")
    parser.add_argument("--recipe", help="ours: a speedrun recipe (default: its default)")
    parser.add_argument(
        "--epochs", type=int, help="ours: epochs instead of the recipe's (the peer keeps its own)"
    )
    parser.add_argument(
        "--flags", default="", help="ours: more `toolkit train` flags, e.g. '--micro-batch 0'"
    )
    parser.add_argument("--peer-precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--peer-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        data, seed, epochs, result, precision = args.peer_worker
        epochs = None if epochs == "-" else float(epochs)
        peer_worker(Path(data), int(seed), epochs, Path(result), precision == "bf16")
        return
    cpu = cpu_facts()
    precision = args.peer_precision
    if precision == "auto":
        precision = "bf16" if cpu["avx512_bf16"] or cpu["amx_bf16"] else "fp32"

    import torch

    from toolkit.data import DataOptions, load_data

    # Absolute: the peer's worker runs in its data folder (airbench reads ./cifar10/).
    work = (args.work or Path(tempfile.mkdtemp(prefix="speedrun-bench-"))).resolve()

    # Every measured run is saved as it ends; a later call with the same --work measures only
    # what is missing (one more seed; a run that failed, once its folder is deleted). A seed's
    # peer and ours run back to back, so they are side by side unless a call stopped between
    # them (the report names such seeds). Runs are only carried into a call of the same setup:
    # another CPU, torch, recipe or data would make the ratio mean nothing.
    partial = work / PARTIAL
    setup = {
        "cpu": cpu,
        "torch": torch.__version__,
        "peer_precision": precision,
        "recipe": args.recipe or "default",
        "epochs": args.epochs,  # ours; None: the recipe's
        "flags": args.flags,  # ours: more toolkit train flags
        "data": str(args.data_dir),
        "quick": args.quick,
    }
    saved = load_partial(partial, setup)
    results = saved.get("runs", {k: [] for k in LABELS})
    invocations = saved.get("invocations", [])
    this_call = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # named once it measures
    out = args.out or OUT
    out.mkdir(parents=True, exist_ok=True)  # now, not after hours of measuring

    data_dir = args.data_dir.resolve()
    if args.quick:
        data_dir = subset_folder(data_dir, work / "subset", QUICK_PER_CLASS)
    peer_epochs, our_epochs = (1, 1) if args.quick else (None, args.epochs)
    bundle = load_data(DataOptions(data_dir=str(data_dir), val_fraction=0.0))
    write_peer_data(bundle, work / "peer" / "cifar10")

    carried = sum(map(len, results.values()))
    if carried:
        print(f"{carried} run(s) already measured in {partial}: not repeated")

    def measure(key: str, seed: int, run, *args) -> None:
        if any(r["seed"] == seed for r in results[key]):
            return
        if this_call not in invocations:
            invocations.append(this_call)
        results[key].append({"seed": seed, "invocation": len(invocations), **run(*args)})
        record = {"setup": setup, "invocations": invocations, "runs": results}
        partial.write_text(json.dumps(record, indent=2))

    val_seeds = args.seeds if args.val_seeds is None else args.val_seeds
    for seed in range(args.seeds):
        measure("peer", seed, peer, work, seed, peer_epochs, precision)
        all_dir, val_dir = work / f"ours_all-{seed}", work / f"ours_val-{seed}"
        ours_flags = (our_epochs, args.recipe, args.flags)
        measure("ours_all", seed, ours, data_dir, all_dir, seed, 0.0, *ours_flags)
        if seed < val_seeds:
            measure("ours_val", seed, ours, data_dir, val_dir, seed, None, *ours_flags)

    stats = {k: summary(v) for k, v in results.items() if v}  # --val-seeds 0: no ours_val
    report = {
        **setup,
        "command": shlex.join(["python", "-m", "benchmarks.speedrun", *sys.argv[1:]]),
        "sizes": bundle.sizes(),
        "runs": results,
        "invocations": invocations,  # the calls that measured these runs; each run names its own
        "summary": stats,
        "targets": targets(stats),
    }
    name = "speedrun-quick" if args.quick else "speedrun"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
