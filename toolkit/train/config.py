"""TrainConfig: every option of a training run, each declared once (toolkit.options).

The CLI's `toolkit train` flags, `toolkit reproduce`'s printed command lines and config.json
are all derived from these fields. Torch-free, so the command line can read them without
loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from toolkit.data.specs import DataOptions, size_option
from toolkit.errors import ToolkitError
from toolkit.options import as_flags, declared, given_values, option, recipe_option
from toolkit.train import recipes

ON_NAN = ("stop", "skip")  # --on-nan: what a non-finite loss does
BALANCE = ("none", "weights", "sampler")  # --balance: what an imbalanced train split gets
DEFAULT_WEIGHTS = "default"  # a bare --pretrained: the architecture's default pretrained tag


@dataclass(frozen=True)
class ModelOptions:
    """The options a model may take; which of them each model supports, and their defaults,
    is the registry's (toolkit.models)."""

    dropout: float | None = option(None, "Dropout probability, where the model has it.")
    batch_norm: bool = option(False, "Add BatchNorm (where the reference put it, per model).")
    width: int | None = option(None, "First-stage channels, where the model has it.")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run, resolved (recipe + flags); config.json is its asdict()."""

    model: str
    data: DataOptions
    # Set by the recipe (toolkit.train.recipes); the flag overrides the recipe's value.
    epochs: int = recipe_option("Epochs to train.")
    batch_size: int = recipe_option("Global batch size (split across torchrun processes).")
    micro_batch: int = recipe_option(
        "Forward and backward each batch N images at a time, one optimizer step per batch "
        "(0: all at once). BatchNorm then normalises each chunk (ghost batches); on a CPU, "
        "chunks that fit its caches train faster per image."
    )
    optimizer: str = recipe_option(
        "sgd, adam, adamw or muon (Muon for the conv filters, SGD as --lr, --momentum, --l2 "
        "for the rest)."
    )
    lr: float = recipe_option("(Peak) learning rate.")
    momentum: float = recipe_option("SGD momentum.")
    nesterov: bool = recipe_option("Nesterov momentum (SGD).")
    l2: float = recipe_option("Weight decay (what the reference calls L2).")
    schedule: str = recipe_option("none, step, cosine, onecycle, linear or triangle.")
    step_size: int = recipe_option("Epochs between lr drops (step schedule).")
    gamma: float = recipe_option("lr factor at each drop (step schedule).")
    warmup_epochs: float = recipe_option("Linear warm-up (cosine, linear schedules).")
    augment: bool = recipe_option("Batch random crop + flip.")
    cutout: int = recipe_option("Zero a random NxN square per image (0: off).")
    label_smoothing: float = recipe_option("Label smoothing of the training loss.")
    grad_clip: float = recipe_option("Clip the gradient norm (0: off).")
    # The speedrun techniques (airbench); off in every other recipe.
    decoupled: bool = recipe_option(
        "SGD in decoupled form (airbench): --lr is the step per 1024 examples whatever the "
        "momentum and batch, --l2 the decay per step whatever the --lr."
    )
    bias_lr_scale: float = recipe_option("lr multiplier of the BatchNorm biases.")
    freeze_bn_scale: bool = recipe_option("Keep every BatchNorm scale at its init (no training).")
    lookahead: float = recipe_option(
        "Lookahead/EMA of the weights: every 5 steps they are pulled to an EMA of decay "
        "(this^5 x progress^3); the final weights are the EMA (0: off)."
    )
    translate: int = recipe_option(
        "Random translation by up to N px (reflect padding; replaces --augment's 4 px; 0: off)."
    )
    alt_flip: bool = recipe_option(
        "Flip each image in alternate epochs (half of them in odd epochs, the rest in even) "
        "instead of at random."
    )
    tta: int = recipe_option(
        "Test-time augmentation the model is evaluated with: 0 none, 1 flip, 2 flip and "
        "1-px translations (toolkit evaluate reports with and without; export --tta)."
    )
    tta_below: float = recipe_option(
        "Selective TTA: the views only for images whose plain top-1 probability is below "
        "this, the rest keep their plain logits (1: every image)."
    )
    muon_lr: float = recipe_option(
        "Muon's lr (--optimizer muon): each step moves a filter bank by about this share of "
        "its norm."
    )
    muon_momentum: float = recipe_option("Muon's Nesterov momentum (--optimizer muon).")
    # The fine-tuning techniques (recipe finetune); off in every other recipe.
    resized_crop: float = recipe_option(
        "Random resized crop: each image a random crop of at least this share of its area "
        "(aspect 3:4 to 4:3) resized back, replacing --augment's 4-px crop (0: off)."
    )
    freeze_epochs: int = recipe_option("Train only the classifier head for the first N epochs.")
    backbone_lr_scale: float = recipe_option(
        "lr multiplier of everything but the classifier head (pretrained layers move slower)."
    )
    # The run's own options; the engine ones (device, amp, compile) change how it runs, not
    # what it learns: config.json's "engine" block records what they resolved to.
    recipe: str | None = option(
        None,
        "default (modern, fast; Muon for the filters of net, net2, lenet5; 3 epochs or "
        "fewer: no augmentation, twice the lr), seed (the reference), finetune (AdamW, warm-up, "
        "resized crops: the default with --pretrained); speedrun only: muon (its default: "
        "Muon for the filters, 0.82x the samples) or airbench94 (its SGD recipe).",
    )
    model_options: dict = field(default_factory=dict)  # ModelOptions the model takes
    seed: int = option(0, "Seed of the weights, the val carve, the order and augmentation.")
    pretrained: str | None = option(
        None,
        "Start a timm/<arch> model from pretrained weights: a tag (a1_in1k), the default tag "
        "when given without a value, or a file (.safetensors, .pth/.bin state dict, a timm or "
        "toolkit checkpoint). A tag reads the Hugging Face cache and downloads only when it "
        "is not there.",
    )
    balance: str = option(
        "none",
        "Imbalanced classes: none, weights (the loss weighs each class by 1/its share) or "
        "sampler (batches drawn class-balanced, with replacement).",
    )
    init_from: str | None = option(
        None,
        "Start from another run's weights (its folder: best.pt, or a .pt file) of the same "
        "model: matching tensors load, a head for another class count starts fresh.",
        path=True,
    )
    on_nan: str = option(
        "stop",
        "A non-finite loss: stop (naming the last good checkpoint) or skip the batch (no "
        "step; skipped batches are logged; an epoch with no good batch stops).",
    )
    device: str = option("auto", "auto, cpu or cuda.")
    amp: str = option(
        "auto",
        "auto (bf16 where the GPU or CPU has it natively, else fp16 on a GPU and off on a "
        "CPU), off, bf16 or fp16 autocast.",
    )
    compile: bool = option(False, "torch.compile the model (the first epoch compiles).")

    # What the run adopted rather than was told (config.json records both): the pretrained
    # weights' mean/std (toolkit.models.pretrained), the recipe options the flags set (the
    # rest may be fitted to the data: toolkit.train.fit_data).
    normalization: dict | None = None
    set_by_flags: list = field(default_factory=list)
    fitted_to_data: dict | None = None

    def __post_init__(self):
        if self.on_nan not in ON_NAN:
            raise ToolkitError(
                f"unknown --on-nan '{self.on_nan}'; choose one of: {', '.join(ON_NAN)}"
            )
        if self.pretrained and self.init_from:
            raise ToolkitError(
                "--pretrained and --init-from both name starting weights; pass one of them"
            )
        if self.balance not in BALANCE:
            raise ToolkitError(
                f"unknown --balance '{self.balance}'; choose one of: {', '.join(BALANCE)}"
            )

    @classmethod
    def from_recipe(
        cls,
        model: str,
        data: DataOptions,
        recipe: str | None = None,
        model_options: dict | None = None,
        **flags,
    ) -> TrainConfig:
        """What `toolkit train MODEL --recipe RECIPE [flags]` builds: the model's options
        checked against the registry, the recipe's values, then every flag that is not None
        (`flags` are TrainConfig fields). No recipe: finetune with --pretrained, else
        default. --pretrained also brings the weights' mean/std, and their input size, resize
        filter and crop fraction unless --image-size, --interpolation, --crop-fraction say
        otherwise."""
        # The registry builds torch modules: imported when a config is made, so reading the
        # declarations (the CLI) needs no torch.
        from toolkit.models import resolve_options

        unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"TrainConfig has no option(s) {', '.join(unknown)}")
        set_by_recipe = {o.name for o in declared(cls) if o.flag.recipe}
        overrides = {k: v for k, v in flags.items() if k in set_by_recipe}
        others = {k: v for k, v in flags.items() if k not in set_by_recipe and v is not None}
        model_options = resolve_options(model, **(model_options or {}))
        if others.get("pretrained"):
            weights = _pretrained_weights(model, others["pretrained"])
            others["pretrained"] = weights.where  # the tag, or the file's absolute path
            others["normalization"] = weights.preprocessing()
            adopted = others["normalization"]
            data = dataclasses.replace(
                data,
                image_size=data.image_size or size_option(tuple(adopted["input_size"])),
                interpolation=data.interpolation or adopted["interpolation"],
                crop_fraction=(
                    adopted["crop_fraction"] if data.crop_fraction is None else data.crop_fraction
                ),
            )
        recipe = recipe or ("finetune" if others.get("pretrained") else "default")
        return cls(
            model=model,
            data=data,
            recipe=recipe,
            model_options=model_options,
            **recipes.resolve(recipe, model, overrides),
            set_by_flags=sorted(k for k, v in overrides.items() if v is not None),
            **others,
        )

    @classmethod
    def from_options(cls, model: str, **options) -> TrainConfig:
        """`toolkit train MODEL --flags` as one flat set of options: DataOptions, ModelOptions
        and TrainConfig fields by name (the CLI's and the Python API's one way in); an
        unknown name is a ToolkitError."""
        groups = {kind: declared(kind) for kind in (DataOptions, ModelOptions, TrainConfig)}
        known = {o.name for group in groups.values() for o in group}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ToolkitError(
                f"unknown option(s) {', '.join(unknown)}; see `toolkit train --help`"
            )
        return cls.from_recipe(
            model,
            DataOptions(**given_values(groups[DataOptions], options)),
            model_options=given_values(groups[ModelOptions], options),
            **given_values(groups[TrainConfig], options),
        )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config back from config.json or a checkpoint (extra keys there are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # Runs from before an option existed ran without it: its off value (recipes.COMMON).
        values = {**{k: v for k, v in recipes.COMMON.items() if k in known}, **values}
        return cls(**{**values, "data": DataOptions(**d["data"])})

    def command_flags(self) -> list[str]:
        """The flags after `toolkit train MODEL` that rebuild this config: one per option
        whose value differs from what the recipe, the registry and the defaults give."""
        from toolkit.models import resolve_options  # see from_recipe

        values = dataclasses.asdict(self)
        own = recipes.resolve(self.recipe, self.model, {})
        # A recipe's warm-up follows --epochs (recipes.resolve): compare with the scaled one.
        scaled = recipes.resolve(self.recipe, self.model, {"epochs": self.epochs})
        run_options = [o for o in declared(TrainConfig) if not o.flag.recipe]
        implied = {"recipe": "finetune" if self.pretrained else "default"}
        recipe_options = [o for o in declared(TrainConfig) if o.flag.recipe]
        model_defaults = resolve_options(self.model)
        model_values = {o.name: o.default for o in declared(ModelOptions)}
        return [
            *as_flags(declared(DataOptions), values["data"], {}),
            *as_flags(run_options, values, implied),
            *as_flags(recipe_options, values, {**scaled, "epochs": own["epochs"]}),
            *as_flags(
                declared(ModelOptions),
                {**model_values, **self.model_options},
                {**model_values, **model_defaults},
            ),
        ]


def _pretrained_weights(model: str, pretrained: str):
    # Imported here: timm loads with it, and only --pretrained needs it.
    from toolkit.models import pretrained as weights

    return weights.resolve(model, "" if pretrained == DEFAULT_WEIGHTS else pretrained)
