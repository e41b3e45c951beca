"""`--pretrained [TAG|FILE]`: a timm model's pretrained weights, loaded safely and offline-first.

- A TAG (or no value: the architecture's default tag) loads through timm's own route, the
  Hugging Face hub and its cache. The cache is read first, so a machine whose cache holds
  the weights needs no network (and `HF_HUB_OFFLINE=1` is honoured). Otherwise the hub is
  probed with one short connection before any download, so a machine that cannot reach it
  fails in seconds with one line naming how to supply the weights, instead of a minute of
  retries and a traceback.
- A FILE (`.safetensors`, a `.pth`/`.bin`/`.pt` state dict, a timm training checkpoint or a
  toolkit checkpoint) loads with no network at all. Pickled files are read with torch's
  `weights_only` loader: a file from the internet cannot run code.

Either way timm adapts the tensors (a classifier for the run's classes starts fresh, a ViT's
position embeddings are resampled to the run's image size), and what was loaded, resampled
and left fresh is what config.json records.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from toolkit.errors import ToolkitError, error_summary
from toolkit.models.registry import TIMM_PREFIX
from toolkit.models.timm_backbones import build_timm, split_name
from toolkit.network import PROBE_SECONDS, unreachable

# What timm looks for in a hub repository, in its order (timm.models._hub).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TRUE_WORDS = ("1", "true", "yes", "on")
# Where the weights of a timm training checkpoint sit (timm's train.py writes these).
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


@dataclass(frozen=True)
class Weights:
    """Where pretrained weights come from and the preprocessing they were trained with."""

    kind: str  # "hub" (a timm tag through the Hugging Face hub) or "file"
    where: str  # the tag (resnet18.a1_in1k) or the file's absolute path
    config: dict  # timm's pretrained config: mean, std, input_size, interpolation, crop_pct

    def preprocessing(self) -> dict:
        """What the run adopts from the weights (unless its flags say otherwise): the mean/std
        the network was trained to expect, its input size, resize filter and crop fraction."""
        adopted = {
            "mean": list(self.config["mean"]),
            "std": list(self.config["std"]),
            "input_size": list(self.config["input_size"][1:]),
            "interpolation": self.config.get("interpolation") or "bilinear",
            "crop_fraction": float(self.config.get("crop_pct") or 1.0),
            "from": self._described(),
        }
        if self.config.get("crop_mode", "center") != "center":
            # timm's "squash" and "border" modes: the toolkit crops the centre, always.
            adopted["not_applied"] = {"crop_mode": self.config["crop_mode"]}
        return adopted

    def _described(self) -> str:
        if self.config.get("toolkit_checkpoint"):
            return f"the toolkit run of {self.config['toolkit_checkpoint']}"
        tag = f".{self.config['tag']}" if self.config.get("tag") else ""
        return f"timm's pretrained config of {self.config['architecture']}{tag}"


def resolve(model: str, pretrained: str) -> Weights:
    """`--pretrained` for `model` (a timm/... name): a tag, "" for the default tag (that of
    the model's name, or the architecture's), or a file."""
    if not model.startswith(TIMM_PREFIX):
        raise ToolkitError(
            f"--pretrained loads timm weights, and '{model}' is one of the toolkit's own "
            "models: train timm/<architecture> (see `toolkit models`), or start from one of "
            "your runs with --init-from"
        )
    arch, tag = split_name(model)
    if pretrained and _looks_like_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ToolkitError(f"--pretrained: no file '{path}'")
        config = _toolkit_run_config(path, arch) or _config(arch, tag, required=False)
        return Weights("file", str(path.resolve()), config)
    if pretrained not in ("", arch):
        tag = pretrained.removeprefix(TIMM_PREFIX).removeprefix(f"{arch}.")
    config = _config(arch, tag, required=True)
    return Weights("hub", f"{arch}.{config['tag']}" if config.get("tag") else arch, config)


def _looks_like_file(value: str) -> bool:
    return (
        Path(value).suffix in (".safetensors", *PICKLE_SUFFIXES)
        or os.sep in value
        or Path(value).expanduser().exists()
    )


def _config(arch: str, tag: str, required: bool) -> dict:
    """timm's pretrained config of arch[.tag] as a dict (the default tag's without one)."""
    name = f"{arch}.{tag}" if tag else arch
    known = timm.list_pretrained(f"{arch}.*")
    if tag and name not in known:
        raise ToolkitError(
            f"--pretrained: timm has no weights '{name}'; its tags: {', '.join(known) or 'none'}"
        )
    cfg = get_pretrained_cfg(name) if known else None
    if cfg is None:
        if required:
            raise ToolkitError(
                f"timm has no pretrained weights for {arch}; pass --pretrained FILE, or "
                "train from scratch without --pretrained"
            )
        # A file for an architecture timm has no weights for: the ImageNet convention.
        return {
            "architecture": arch,
            "tag": "",
            "mean": timm.data.IMAGENET_DEFAULT_MEAN,
            "std": timm.data.IMAGENET_DEFAULT_STD,
            "input_size": (3, 224, 224),
            "num_classes": 1000,
        }
    return cfg.to_dict()


def _toolkit_run_config(path: Path, arch: str) -> dict | None:
    """For a toolkit checkpoint, the pretrained config its run implies: the classes it was
    trained for and the mean/std, size and resize it was trained with (not timm's ImageNet
    defaults); None for any other file."""
    if path.suffix not in PICKLE_SUFFIXES:
        return None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: read_weights_file says why, in its one line
        return None
    if not (isinstance(raw, dict) and raw.get("format") == "toolkit-checkpoint"):
        return None
    from toolkit.run.checkpoint import Checkpoint

    ckpt = Checkpoint.from_dict(raw, path)
    trained = ckpt.model["name"]
    if not trained.startswith(TIMM_PREFIX) or split_name(trained)[0] != arch:
        raise ToolkitError(
            f"--pretrained: '{path}' is a toolkit checkpoint of {trained}, not of {arch}; "
            f"train {trained} --init-from it, or pass weights of {arch}"
        )
    ds, resize = ckpt.dataset, ckpt.resize
    return {
        **_config(arch, "", required=False),
        "tag": "",
        "toolkit_checkpoint": str(path.resolve()),
        "num_classes": len(ds["classes"]),
        "mean": tuple(ds["mean"]),
        "std": tuple(ds["std"]),
        "input_size": (3, *resize.size),
        "interpolation": resize.interpolation,
        "crop_pct": resize.crop_fraction,
        "crop_mode": "center",
    }


# --- reading the tensors ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """Weights read into memory, before anything else of a run is done: a missing file or an
    unreachable hub is said in seconds, not after the data is decoded."""

    weights: Weights
    state: dict[str, torch.Tensor]
    path: Path  # the file they were read from


def fetch(model: str, pretrained: str) -> Fetched:
    """`--pretrained` for `model`, resolved and read."""
    weights = resolve(model, pretrained)
    path = Path(weights.where) if weights.kind == "file" else hub_file(weights)
    return Fetched(weights, read_weights_file(path), path)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, a pickled state dict, a timm training checkpoint
    or a toolkit checkpoint; anything else (damaged, empty, code in a pickle) is one line."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(path)
        else:
            with warnings.catch_warnings():  # torch's note on a foreign pickle's protocol
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file, random bytes, a pickle that calls code
        raise ToolkitError(f"--pretrained: '{path}' is unreadable ({_why(path, exc)})") from exc
    if isinstance(raw, dict) and raw.get("format") == "toolkit-checkpoint":
        from toolkit.run.checkpoint import Checkpoint

        raw = Checkpoint.from_dict(raw, path).state_dict
    for key in CHECKPOINT_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(v, torch.Tensor) for v in raw.values())
    ):
        raise ToolkitError(f"--pretrained: '{path}' holds no state dict (name -> tensor)")
    # Saved from a DDP-wrapped model: the names carry its `module.` prefix.
    return {k.removeprefix("module."): v for k, v in raw.items()}


def _why(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a plain tensor file: refused without running anything in it"
    return error_summary(exc)


# --- the hub ---------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, read from the environment now (its own
    constant is fixed when it is first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "huggingface"
    )
    return Path(home) / "hub"


def hub_file(weights: Weights) -> Path:
    """The weights file of a timm tag: from the local hub cache, else downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo = weights.config.get("hf_hub_id")
    if not repo:
        url = weights.config.get("url") or "its original site"
        raise ToolkitError(
            f"timm's weights {weights.where} are not on the Hugging Face hub ({url}); "
            "download them and pass --pretrained FILE"
        )
    files = (
        (weights.config["hf_hub_filename"],) if weights.config.get("hf_hub_filename") else HUB_FILES
    )
    cache = hub_cache_dir()
    for name in files:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(hit, str):
            return Path(hit)
    how = (
        f"on a machine with internet run `hf download {repo}` and copy its cache to {cache} "
        "(or set HF_HUB_CACHE to it), or pass --pretrained FILE"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE_WORDS:
        raise ToolkitError(
            f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {how}"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    problem = unreachable(endpoint)
    if problem:
        raise ToolkitError(f"cannot reach {endpoint} to download {repo} ({problem}); {how}")
    for name in files:
        try:
            return Path(hf_hub_download(repo, name, cache_dir=cache, etag_timeout=PROBE_SECONDS))
        except EntryNotFoundError:
            continue
        except Exception as exc:  # HTTP errors, a connection dropped mid-download
            raise ToolkitError(f"downloading {repo} failed ({error_summary(exc)}); {how}") from exc
    raise ToolkitError(f"{repo} holds none of {', '.join(files)}; pass --pretrained FILE")


# --- into the network ------------------------------------------------------------------------


def load_pretrained(
    net: nn.Module, model: str, fetched: Fetched, model_info: dict, dropout: float = 0.0
) -> dict:
    """Load the `fetched` weights into `net` (the timm model a checkpoint's `model_info`
    describes: num_classes, input_size, in_channels); what config.json records about it."""
    weights, path = fetched.weights, fetched.path
    state = dict(fetched.state)  # timm's adaptation pops the head from the dict it is given
    arch, _ = split_name(model)
    shapes = {k: v.shape for k, v in state.items()}
    num_classes = model_info["num_classes"]
    try:
        # timm's own adaptation: the head dropped for other classes, the first conv for other
        # channels, position embeddings resampled (each architecture's checkpoint filter).
        adapted = build_timm(
            arch,
            num_classes,
            model_info["input_size"],
            model_info["in_channels"],
            dropout,
            pretrained=True,
            pretrained_cfg_overlay={**_timm_fields(weights.config), "state_dict": state},
        )
        net.load_state_dict(adapted.state_dict())
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ToolkitError(
            f"--pretrained: '{path}' does not fit {model} ({error_summary(exc)}); pass weights "
            "of this architecture"
        ) from exc
    own = net.state_dict()
    head = _head_names(weights.config) if num_classes != weights.config.get("num_classes") else ()
    fresh = sorted(k for k in own if k not in shapes or k.startswith(head))
    resampled = sorted(
        k for k in own if k in shapes and k not in fresh and shapes[k] != own[k].shape
    )
    loaded = len(own) - len(fresh) - len(resampled)
    return {
        "source": weights.kind,
        "weights": weights.where,
        "file": str(path),
        "loaded": loaded,
        "of": len(own),
        "resampled": resampled,
        "fresh": fresh,
        "preprocessing": weights.preprocessing(),
    }


def _timm_fields(config: dict) -> dict:
    """The entries of `config` that timm's PretrainedCfg has (it refuses any other)."""
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    return {k: v for k, v in config.items() if k in fields}


def _head_names(config: dict) -> tuple[str, ...]:
    """The classifier's tensor-name prefixes (timm's config: one name or several)."""
    heads = config.get("classifier") or ()
    return tuple(h + "." for h in ((heads,) if isinstance(heads, str) else heads))
