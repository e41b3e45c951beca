"""`timm/<arch>` and `timm/<arch>.<tag>`: any architecture of timm as a registry entry.

The network is timm's own module, built for the run's classes, channels and (for the
architectures whose input size is fixed when built: ViT, DeiT, Swin, ...) its image size.
Weights start fresh; `--pretrained` loads them afterwards (toolkit.models.pretrained), so a
checkpoint holds the same module whichever way it started. The tag names which pretrained
weights `--pretrained` means, and whose preprocessing (mean, std, size) the run adopts.
"""

from __future__ import annotations

import difflib
from functools import partial

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from toolkit.data.specs import parse_size
from toolkit.errors import ToolkitError
from toolkit.models.registry import TIMM_PREFIX, ModelEntry

# CPU-friendly backbones across families, for `toolkit models` and benchmarks/backbones.py:
# small enough to fine-tune on a laptop CPU at 64-160 px.
CURATED = (
    "resnet18",
    "resnet10t",
    "mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "efficientnet_b0",
    "regnetx_002",
    "convnext_atto",
    "convnext_femto",
    "ghostnet_100",
    "repvit_m0_9",
    "fastvit_t8",
    "efficientvit_b0",
    "deit_tiny_patch16_224",
)


def split_name(name: str) -> tuple[str, str]:
    """`timm/resnet18.a1_in1k` -> ("resnet18", "a1_in1k"); no tag -> ("resnet18", "")."""
    return split_model_name_tag(name.removeprefix(TIMM_PREFIX))


def timm_entry(name: str) -> ModelEntry:
    """The registry entry of `timm/<arch>[.<tag>]`; an unknown architecture or tag is one
    line naming the closest real ones."""
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise ToolkitError(
            f"timm has no architecture '{arch}'; {hint}see timm.list_models() for all of them"
        )
    tags = timm.list_pretrained(f"{arch}.*")
    if tag and f"{arch}.{tag}" not in tags:
        raise ToolkitError(
            f"timm has no weights '{arch}.{tag}'; its tags: {', '.join(tags) or 'none'}"
        )
    return ModelEntry(
        name,
        partial(build_timm, arch),
        f"timm's {arch} (normalised with the pretrained weights' mean/std under --pretrained, "
        "else the data's)",
        options=("dropout",),
        input_rule=_input_rule(arch),
    )


def _input_rule(arch: str) -> str:
    cfg = get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size:
        return "built for the --image-size it is given (position embeddings resampled)"
    return "any size (its pooling is global)"


def build_timm(
    arch: str,
    num_classes: int,
    input_size: int | tuple[int, int],
    in_channels: int,
    dropout: float = 0.0,
    **timm_options,
) -> nn.Module:
    """The registry's builder; `timm_options` go to timm.create_model as they are (the
    pretrained weights, toolkit.models.pretrained)."""
    options = {"num_classes": num_classes, "in_chans": in_channels, "drop_rate": dropout}
    return create_timm(arch, parse_size(input_size), **options, **timm_options)


def create_timm(arch: str, size: tuple[int, int], **options) -> nn.Module:
    """timm.create_model, passing the image size to architectures that take one when built
    (a convnet's constructor refuses the argument: it has no fixed size)."""
    try:
        return timm.create_model(arch, img_size=size, **options)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(arch, **options)
