"""Training recipes: `seed` reproduces the reference exactly, `default` is the modern one,
`finetune` starts from pretrained weights (the default with --pretrained); speedrun also
has `muon` (airbench94_muon's: Muon for the filters, 0.82x the samples; its default) and
`airbench94` (its SGD-and-lookahead recipe, benchmarks/speedrun.md's first figures).

A recipe sets every field of TrainConfig declared with `recipe_option`; explicit flags
override it. `resolve` turns (recipe, model, overrides) into those values, which
config.json records. Torch-free: the CLI reads the tables without loading torch.
"""

from __future__ import annotations

from toolkit.errors import ToolkitError

RECIPES = ("default", "seed", "finetune", "airbench94", "muon")
OPTIMIZERS = ("sgd", "adam", "adamw", "muon")
SCHEDULES = ("none", "step", "cosine", "onecycle", "linear", "triangle")

# The reference recipes, from ../shared/SEED_EXPERIMENTS.md (plain SGD, no momentum,
# no augmentation, constant learning rate unless the table says otherwise).
_SEED_SGD = dict(
    optimizer="sgd",
    lr=1e-2,
    momentum=0.0,
    nesterov=False,
    batch_size=64,
    epochs=300,
    schedule="none",
    augment=False,
    label_smoothing=0.0,
    l2=0.0,
    warmup_epochs=0.0,
    grad_clip=0.0,
)
SEED = {
    "mlp": _SEED_SGD,
    "net": _SEED_SGD,
    "net2": _SEED_SGD,
    "resnet10": {**_SEED_SGD, "lr": 3e-3},
    "lenet5": dict(
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        nesterov=False,
        batch_size=128,
        epochs=100,
        schedule="step",
        step_size=20,
        gamma=0.5,
        augment=False,
        label_smoothing=0.0,
        l2=0.0,
        warmup_epochs=0.0,
        grad_clip=0.0,
    ),
}

# The modern recipe: batch crop+flip, label smoothing, SGD-nesterov with a one-cycle
# schedule, weight decay. resnet10 has no normalisation on its residual stream: SGD at a rate
# that trains the small nets fast collapses it, and the rate that keeps it stable (0.02 with
# clipping) under-fits (74 % val after 20 epochs). AdamW, whose steps do not scale with the
# growing stream, reached 71 % val in a 5-epoch probe, so resnet10 uses it.
_DEFAULT = dict(
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    batch_size=128,
    epochs=15,
    schedule="onecycle",
    augment=True,
    label_smoothing=0.1,
    l2=5e-4,
    warmup_epochs=0.0,
    grad_clip=0.0,
)
# resnet9: the DAWNBench ResNet-9 recipe (94 % on CIFAR-10 in 24 epochs): global batch 512,
# SGD-nesterov at peak lr 0.4 with weight decay 5e-4 (its sum-of-losses lr 0.4/512 and decay
# 5e-4*512, restated for the mean loss used here), linear warm-up to epoch 5 then linear
# decay to zero, crop + flip + 8x8 cutout, plus label smoothing 0.2.
_RESNET9 = dict(
    optimizer="sgd",
    lr=0.4,
    momentum=0.9,
    nesterov=True,
    batch_size=512,
    epochs=24,
    schedule="linear",
    warmup_epochs=5.0,
    augment=True,
    cutout=8,
    label_smoothing=0.2,
    l2=5e-4,
    grad_clip=0.0,
)
# speedrun: airbench94's recipe restated for this engine (mean loss; decoupled SGD, whose lr
# and decay are per 1024 examples): batch 1024, Nesterov momentum 0.85, lr 11.5, decay
# 0.0153, BatchNorm biases at 64x the lr with their scales frozen, label smoothing 0.2, the
# triangle schedule, lookahead 0.95 every 5 steps, 2-px translation + alternating flip, and
# TTA with flip and 1-px translations. 10 epochs (airbench's 9.9 rounded up: the engine
# counts whole epochs).
_SPEEDRUN = dict(
    optimizer="sgd",
    decoupled=True,
    lr=11.5,
    momentum=0.85,
    nesterov=True,
    l2=0.0153,
    batch_size=1024,
    epochs=10,
    schedule="triangle",
    warmup_epochs=0.0,
    augment=False,
    translate=2,
    alt_flip=True,
    label_smoothing=0.2,
    bias_lr_scale=64.0,
    freeze_bn_scale=True,
    lookahead=0.95,
    tta=2,
    grad_clip=0.0,
)
# speedrun's `--recipe muon`: airbench94_muon's recipe restated for this engine, speedrun's
# default since it beat airbench's own train94 side by side (issue #25: 0.7x its seconds at a
# higher test accuracy, benchmarks/speedrun-muon-vs-train94/speedrun.md). Muon (lr 0.24,
# Nesterov momentum 0.6, toolkit.train.muon) trains the conv filters; Nesterov SGD at
# momentum 0.85 the rest: the head at lr 6.5 (decoupled: airbench94_muon's 0.67 on a summed
# loss over 2,000 examples, restated for the mean loss and this net's head scale of 1/9
# instead of its 1/256), every vector (BatchNorm shifts, the whitening bias) at 64x that,
# decay 0.0157 (its 0.004 per step). Batch 2000, 8 epochs (0.82x airbench94's samples), a
# linear decay to zero with no warm-up and no lookahead; augmentation, label smoothing and
# TTA views as airbench94.
_SPEEDRUN_MUON = {
    **_SPEEDRUN,
    "optimizer": "muon",
    "lr": 6.5,
    "l2": 0.0157,
    "muon_lr": 0.24,
    "muon_momentum": 0.6,
    "batch_size": 2000,
    # Each batch forward and backward 500 images at a time (ghost batches for BatchNorm): on
    # a 2-core AVX512-BF16 EPYC an epoch takes 50 instead of 70 s, the whole batch's
    # activations overflowing its caches. Val, 2 seeds: 89.79 % against 89.65 % in one pass
    # (chunks of 250, seed 0: 89.40 %; benchmarks/speedrun-muon-cpu.md).
    "micro_batch": 500,
    "epochs": 8,
    "schedule": "linear",
    "lookahead": 0.0,
    # Selective TTA: the views only below a plain top-1 probability of 0.57, a quarter of the
    # val images; chosen on a first run's val (90.80 % against 90.82 % with every view). On
    # the shipped model's (benchmarks/tta_serving.md): 90.90 % either way, at 1.42 instead of
    # 3.17 ms per upload.
    "tta_below": 0.57,
}
# net, net2 and lenet5 train their conv filters with Muon (toolkit.train.muon), the rest with
# the recipe's SGD: Muon moves every direction of a filter bank alike, so as many steps go
# further. On val at the recipe's 15 epochs (benchmarks/small_muon.md, 2 seeds, the same
# seconds): net 66.72 -> 68.26 %, net2 65.53 -> 66.94, lenet5 69.01 -> 70.51, ahead in all six
# pairs. Its lr and momentum were chosen on 2-epoch runs (see _short_run): 0.03 / 0.07 / 0.1 /
# 0.24 gave net 63.2 / 64.2 / 63.9 / 62.8 % (3 seeds, momentum 0.6).
MUON_MODELS = ("net", "net2", "lenet5")
MUON_FILTERS = {"optimizer": "muon", "muon_lr": 0.05, "muon_momentum": 0.8}
_SMALL_CNN = {**_DEFAULT, **MUON_FILTERS}
DEFAULT = {
    "mlp": {**_DEFAULT, "lr": 0.01},
    "net": _SMALL_CNN,
    "net2": _SMALL_CNN,
    "resnet10": {**_DEFAULT, "optimizer": "adamw", "lr": 3e-3, "l2": 0.05, "epochs": 20},
    "lenet5": _SMALL_CNN,
    "resnet9": _RESNET9,
    "speedrun": _SPEEDRUN_MUON,
}
# Recipes of one model: speedrun's published SGD recipe keeps its own name, so
# benchmarks/speedrun.md's first figures stay reproducible (`--recipe airbench94`).
SPEEDRUN_RECIPES = {"airbench94": {"speedrun": _SPEEDRUN}, "muon": {"speedrun": _SPEEDRUN_MUON}}
# finetune: what timm's and fastai's fine-tuning do, for a pretrained backbone and a new head:
# AdamW at 1e-3 for every layer, a one-epoch warm-up then cosine decay, random resized crops of
# at least 35 % of the area (fastai's fine-tuning minimum: timm's 8 % is for training from
# scratch on ImageNet) with flips, label smoothing 0.1 and decay 0.05. Batch 32 and 10 epochs:
# photo folders are small. lr, backbone_lr_scale and freeze_epochs were chosen on val
# (benchmarks/finetune_values.md: a CIFAR-trained backbone fine-tuned to five unseen classes,
# 18 combinations x 2 seeds): the pretrained layers at the head's rate beat a tenth of it by
# 3.8 points of val, and a head-only first epoch changed nothing. ImageNet weights could not
# be tried here; --backbone-lr-scale 0.1 --freeze-epochs 1 is the fastai-style alternative.
_FINETUNE = dict(
    optimizer="adamw",
    lr=1e-3,
    momentum=0.9,
    nesterov=False,
    batch_size=32,
    epochs=10,
    schedule="cosine",
    warmup_epochs=1.0,
    augment=True,
    resized_crop=0.35,
    label_smoothing=0.1,
    l2=0.05,
    grad_clip=0.0,
    freeze_epochs=0,
    backbone_lr_scale=1.0,
)
# Anything not in the tables above (new models, timm's) takes these.
FALLBACK = {"seed": _SEED_SGD, "default": _DEFAULT, "finetune": _FINETUNE}
# Values no table sets; cutout 0 keeps the seed recipe free of augmentation.
COMMON = dict(
    micro_batch=0,
    step_size=20,
    gamma=0.5,
    cutout=0,
    decoupled=False,
    bias_lr_scale=1.0,
    freeze_bn_scale=False,
    lookahead=0.0,
    translate=0,
    alt_flip=False,
    tta=0,
    tta_below=1.0,
    resized_crop=0.0,
    freeze_epochs=0,
    backbone_lr_scale=1.0,
    # airbench94_muon's: what --optimizer muon gives the filters unless told otherwise.
    muon_lr=0.24,
    muon_momentum=0.6,
)
TTA_LEVELS = (0, 1, 2)
# The default recipe's runs of at most SHORT_RUN_EPOCHS train without augmentation, and its
# one-cycle runs with SGD steps (Muon's included) peak at SHORT_RUN_LR_SCALE x its lr
# (_short_run's comments: the measurements that chose them).
SHORT_RUN_EPOCHS = 3
SHORT_RUN_LR_SCALE = 2.0


def resolve(recipe: str, model: str, overrides: dict) -> dict:
    """Recipe values for `model`, then every override that is not None.

    Overriding the epochs scales the recipe's warm-up with them (unless it is given too).
    The default recipe's runs of at most SHORT_RUN_EPOCHS change as `_short_run` says.
    """
    if recipe not in RECIPES:
        raise ToolkitError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES)}")
    table = {"seed": SEED, "default": DEFAULT, **SPEEDRUN_RECIPES}.get(recipe, {})
    if model not in table and recipe not in FALLBACK:
        raise ToolkitError(
            f"recipe '{recipe}' is for {', '.join(table)} only; choose one of: "
            f"{', '.join(FALLBACK)} (or --optimizer muon with any of them)"
        )
    values = {**COMMON, **table.get(model, FALLBACK.get(recipe))}
    recipe_epochs = values["epochs"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("warmup_epochs") is None and values["epochs"] != recipe_epochs:
        # A recipe's warm-up is a share of its training: a shorter (or longer) run keeps the
        # share, so `--epochs 3` does not spend every step warming up.
        values["warmup_epochs"] = values["warmup_epochs"] * values["epochs"] / recipe_epochs
    if recipe == "default" and values["epochs"] <= SHORT_RUN_EPOCHS:
        values.update(_short_run(values, overrides))
    if overrides.get("freeze_epochs") is None:  # a shorter run still trains its backbone
        values["freeze_epochs"] = min(values["freeze_epochs"], int(values["epochs"]) - 1)
    _check(values)
    return values


def _short_run(values: dict, overrides: dict) -> dict:
    """What a default-recipe run of at most SHORT_RUN_EPOCHS changes; a flag that sets a
    value itself wins. Chosen on val (45,000 / 5,000 CIFAR-10 images, seeds as counted)."""
    changes = {}
    if overrides.get("augment") is None:
        # Too short to overfit: crops and flips only slow the fit. net: 2 epochs 58.8 % with
        # them, 60.3 % without; 3 epochs 61.4 / 63.4 %.
        changes["augment"] = False
    # Muon trains everything but the conv filters with SGD at --lr.
    sgd_steps = values["optimizer"] in ("sgd", "muon")
    if overrides.get("lr") is None and values["schedule"] == "onecycle" and sgd_steps:
        # One cycle this short reaches further with a higher peak. Twice the lr at 2 epochs
        # (3-5 seeds): net 60.30 -> 61.36 %, net2 55.87 -> 58.74, mlp 42.61 -> 44.50, lenet5
        # 58.30 -> 58.09 (within its seeds' spread); at 3 epochs mlp 44.47 -> 46.81 (2 seeds)
        # and net 62.89 -> 62.83 (3 seeds). With Muon for the filters at MUON_FILTERS (the
        # rest SGD at twice the lr), 2 epochs: net 61.53 -> 64.46 % (6 seeds), net2 58.74 ->
        # 62.56, lenet5 58.09 -> 63.08 (3 seeds each); 3 epochs (2 seeds, SGD at the recipe's
        # lr): net 62.94 -> 66.06, net2 58.76 -> 63.93, lenet5 61.83 -> 65.13
        # (benchmarks/small_command.md).
        changes["lr"] = values["lr"] * SHORT_RUN_LR_SCALE
    return changes


def _check(v: dict) -> None:
    if v["optimizer"] not in OPTIMIZERS:
        raise ToolkitError(
            f"unknown optimizer '{v['optimizer']}'; choose one of: {', '.join(OPTIMIZERS)}"
        )
    if v["schedule"] not in SCHEDULES:
        raise ToolkitError(
            f"unknown schedule '{v['schedule']}'; choose one of: {', '.join(SCHEDULES)}"
        )
    for name in ("epochs", "batch_size"):
        if int(v[name]) < 1:
            raise ToolkitError(f"--{name.replace('_', '-')} must be at least 1, got {v[name]}")
    if int(v["micro_batch"]) < 0:
        raise ToolkitError(
            f"--micro-batch must be zero (the whole batch at once) or a number of images, "
            f"got {v['micro_batch']}"
        )
    if float(v["lr"]) <= 0:
        raise ToolkitError(f"--lr must be positive, got {v['lr']}")
    if float(v["l2"]) < 0:
        raise ToolkitError(f"--l2 must be zero or positive, got {v['l2']}")
    if not 0.0 <= float(v["label_smoothing"]) < 1.0:
        raise ToolkitError(f"--label-smoothing must be in [0, 1), got {v['label_smoothing']}")
    if int(v["cutout"]) < 0:
        raise ToolkitError(f"--cutout must be zero (off) or a size in pixels, got {v['cutout']}")
    if v["decoupled"] and v["optimizer"] not in ("sgd", "muon"):
        raise ToolkitError(f"--decoupled is a form of SGD; it cannot apply to {v['optimizer']}")
    if float(v["muon_lr"]) <= 0:
        raise ToolkitError(f"--muon-lr must be positive, got {v['muon_lr']}")
    if not 0.0 <= float(v["muon_momentum"]) < 1.0:
        raise ToolkitError(f"--muon-momentum must be in [0, 1), got {v['muon_momentum']}")
    if float(v["bias_lr_scale"]) <= 0:
        raise ToolkitError(f"--bias-lr-scale must be positive, got {v['bias_lr_scale']}")
    if not 0.0 <= float(v["lookahead"]) < 1.0:
        raise ToolkitError(f"--lookahead must be in [0, 1) (0: off), got {v['lookahead']}")
    if int(v["translate"]) < 0:
        raise ToolkitError(f"--translate must be zero (off) or pixels, got {v['translate']}")
    if not 0.0 <= float(v["resized_crop"]) <= 1.0:
        raise ToolkitError(f"--resized-crop must be in [0, 1] (0: off), got {v['resized_crop']}")
    if not 0 <= int(v["freeze_epochs"]) < int(v["epochs"]):
        raise ToolkitError(
            f"--freeze-epochs must be at least 0 and less than --epochs ({v['epochs']}), "
            f"got {v['freeze_epochs']}"
        )
    if float(v["backbone_lr_scale"]) <= 0:
        raise ToolkitError(f"--backbone-lr-scale must be positive, got {v['backbone_lr_scale']}")
    if int(v["tta"]) not in TTA_LEVELS:
        raise ToolkitError(f"--tta must be one of {TTA_LEVELS}, got {v['tta']}")
    if not 0.0 < float(v["tta_below"]) <= 1.0:
        raise ToolkitError(f"--tta-below must be in (0, 1] (1: every image), got {v['tta_below']}")
    if not 0.0 <= float(v["warmup_epochs"]) < int(v["epochs"]):
        raise ToolkitError(
            f"--warmup-epochs must be at least 0 and less than --epochs ({v['epochs']}), "
            f"got {v['warmup_epochs']}"
        )
