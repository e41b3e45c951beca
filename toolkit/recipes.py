"""Training recipes: `seed` reproduces the reference exactly, `default` is the modern one.

Explicit CLI flags override either recipe; `resolve` turns (recipe, model, overrides) into
every training option, which is what config.json records.
"""

from __future__ import annotations

from toolkit.errors import ToolkitError

RECIPES = ("default", "seed")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "onecycle")

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
# schedule, weight decay. resnet10 has no normalisation on its residual stream, so it gets
# a lower peak, a longer warm-up and gradient clipping (the aggressive recipe collapses it).
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
DEFAULT = {
    "mlp": {**_DEFAULT, "lr": 0.01},
    "net": _DEFAULT,
    "net2": _DEFAULT,
    "resnet10": {**_DEFAULT, "lr": 0.02, "epochs": 20, "grad_clip": 2.0},
    "lenet5": _DEFAULT,
}
# Anything not in the tables above (new models) takes these.
FALLBACK = {"seed": _SEED_SGD, "default": _DEFAULT}
COMMON = dict(step_size=20, gamma=0.5, seed=0)


def resolve(recipe: str, model: str, overrides: dict) -> dict:
    """Recipe values for `model`, then every override that is not None."""
    if recipe not in RECIPES:
        raise ToolkitError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES)}")
    table = SEED if recipe == "seed" else DEFAULT
    values = {**COMMON, **table.get(model, FALLBACK[recipe])}
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check(values)
    return values


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
    if float(v["lr"]) <= 0:
        raise ToolkitError(f"--lr must be positive, got {v['lr']}")
    if float(v["l2"]) < 0:
        raise ToolkitError(f"--l2 must be zero or positive, got {v['l2']}")
    if not 0.0 <= float(v["label_smoothing"]) < 1.0:
        raise ToolkitError(f"--label-smoothing must be in [0, 1), got {v['label_smoothing']}")
