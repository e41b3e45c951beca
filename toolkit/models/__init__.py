"""The models: a registry of names (toolkit.models.registry), the toolkit's own networks
(seed: the reference architectures; fast: resnet9 and speedrun) and `timm/<arch>` for any
timm architecture, with or without pretrained weights (timm_backbones, pretrained)."""

# Importing them registers their models, in the order `toolkit models` lists them.
# isort: off
from toolkit.models import seed  # noqa: F401
from toolkit.models import fast  # noqa: F401

# isort: on
from toolkit.models.lookup import create_model, get_entry, resolve_options
from toolkit.models.registry import (
    MODELS,
    TIMM_PREFIX,
    ModelEntry,
    NormalizedClassifier,
    count_parameters,
)

__all__ = [
    "MODELS",
    "TIMM_PREFIX",
    "ModelEntry",
    "NormalizedClassifier",
    "count_parameters",
    "create_model",
    "get_entry",
    "resolve_options",
]
