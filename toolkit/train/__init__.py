"""Training: the config and its recipes, optimisers and schedules, batches and precision,
the engine (one epoch, evaluation), torchrun/DDP, and `fit` / `resume`, which fill a run
folder.

    TrainConfig.from_recipe(model, data, recipe, **flags) ─► fit(config, run_dir) ─► RunResult
"""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "config": ("ModelOptions", "TrainConfig"),
    "trainer": ("RunResult", "fit", "resume"),
    "recipes": ("RECIPES",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
