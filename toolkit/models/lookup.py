"""A model by name: the registered ones (toolkit.models.registry), and `timm/<arch>` for any
timm architecture (toolkit.models.timm_backbones, imported only when one is asked for:
timm takes a second to import, and only its users pay it)."""

from __future__ import annotations

from torch import nn

from toolkit.errors import ToolkitError
from toolkit.models.registry import MODELS, TIMM_PREFIX, ModelEntry


def get_entry(name: str) -> ModelEntry:
    if name.startswith(TIMM_PREFIX):
        from toolkit.models.timm_backbones import timm_entry

        return timm_entry(name)
    if name not in MODELS:
        raise ToolkitError(
            f"unknown model '{name}'; choose one of: {', '.join(MODELS)}, or "
            f"{TIMM_PREFIX}<architecture> for any timm model"
        )
    return MODELS[name]


def resolve_options(name: str, **options) -> dict:
    """Fill in defaults and reject options the model does not support.

    Options left at None/False/0 mean "not asked for" and are dropped, so a CLI can pass every
    flag unconditionally.
    """
    entry = get_entry(name)
    asked = {k: v for k, v in options.items() if v not in (None, False, 0, 0.0)}
    unsupported = sorted(set(asked) - set(entry.options))
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        supported = ", ".join("--" + k.replace("_", "-") for k in entry.options) or "none"
        raise ToolkitError(f"model '{name}' does not support {flags} (it supports: {supported})")
    if "dropout" in asked and not 0.0 < float(asked["dropout"]) < 1.0:
        raise ToolkitError(f"--dropout must be between 0 and 1, got {asked['dropout']}")
    if "width" in asked and int(asked["width"]) < 2:
        raise ToolkitError(f"--width must be at least 2, got {asked['width']}")
    return {**entry.defaults, **asked}


def create_model(
    name: str,
    num_classes: int = 10,
    input_size: int | tuple[int, int] = 32,
    in_channels: int = 3,
    **options,
) -> nn.Module:
    """Build a registered model; unknown names and unsupported options raise ToolkitError."""
    entry = get_entry(name)
    resolved = resolve_options(name, **options)
    try:
        return entry.builder(
            num_classes=num_classes, input_size=input_size, in_channels=in_channels, **resolved
        )
    except ValueError as exc:  # e.g. an input too small for the pooling stages
        raise ToolkitError(f"cannot build '{name}': {exc}") from exc
