"""`toolkit models`: what can be trained (registered by toolkit.cli)."""

from __future__ import annotations

import typer

from toolkit.cli.output import console, friendly_errors, table


@friendly_errors
def models_cmd(
    image_size: int = typer.Option(32, help="Input size used for the parameter counts."),
    num_classes: int = typer.Option(10),
    backbones: bool = typer.Option(
        False, help="Also measure a curated table of CPU-friendly timm backbones (~20 s)."
    ),
    backbone_size: int = typer.Option(64, help="Input size of the backbones' MACs."),
):
    """List the registered models (parameters, options, input rule); --backbones adds
    CPU-friendly timm backbones (any timm architecture trains as timm/<name>)."""
    from toolkit.models import MODELS, count_parameters, create_model
    from toolkit.models.registry import count_macs

    rows = []
    for name, entry in MODELS.items():
        params = count_parameters(create_model(name, num_classes, image_size))
        rows.append(
            {
                "name": name,
                "params": params,
                "options": " ".join("--" + o.replace("_", "-") for o in entry.options),
                "input": entry.input_rule,
                "description": entry.description,
            }
        )
    console.print(table(f"models ({num_classes} classes, {image_size}x{image_size})", rows))
    if not backbones:
        console.print("and any timm architecture as timm/<name>: `toolkit models --backbones`")
        return
    from toolkit.models.timm_backbones import CURATED

    size = (backbone_size, backbone_size)
    measured = []
    for arch in CURATED:
        net = create_model(f"timm/{arch}", num_classes, size)
        macs = count_macs(net, size)
        measured.append(
            {"name": f"timm/{arch}", "params": count_parameters(net), "MMACs": f"{macs / 1e6:.1f}"}
        )
    title = f"timm backbones ({num_classes} classes, MACs at {backbone_size}x{backbone_size})"
    console.print(table(title, measured))
