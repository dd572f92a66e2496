"""Training configuration: the presets, defined once, and the typed config every run reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..backbones import BACKBONE_OPTIONS, BACKBONES, DEFAULT_BACKBONE, OWN_PIXELS, backbone
from ..devices import use_bf16
from ..errors import AgeGenderError, OptionError
from ..model.config import ModelConfig

# Presets are defined once here; CLI flags override individual fields.
PRESETS: dict[str, dict[str, Any]] = {
    # Frozen VGG-Face trunk with no BatchNorm inside it (VGG-Face never had any, and BN between frozen convs
    # shifts the activations each conv was trained on and forbids the feature cache); BN lives in the head.
    # Batch 512 at lr 2e-3: the fastest cached head step, as accurate as batch 128 (DECISIONS.md: the default
    # training preset).
    "default": dict(
        epochs=25,
        batch_size=512,
        lr=2e-3,
        weight_decay=1e-4,
        head_bn=True,
        feature_bn=True,
        block_bn=False,
        dropout=(0.5, 0.5),
        age_head="regression",
        age_weight=1.0,
        pixels=OWN_PIXELS,
    ),
    # The seed notebook: /255 RGB pixels, BN after each conv block, dropout after fc1 only, one sigmoid, no age.
    "seed": dict(
        epochs=25,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.0,
        head_bn=False,
        feature_bn=False,
        block_bn=True,
        dropout=(0.5, 0.0),
        age_head="none",
        pixels="seed",
    ),
}

# What the default preset changes for a backbone is the backbone's own (BackboneSpec.train_defaults).

# A fine-tune of the trunk's last levels (``tune_levels``) starts from a trained frozen run and moves little: Adam at
# 1e-4 on dlib's levels undid the descriptor in one epoch, 1e-5 pulled the old towards the middle, 3e-6 for the
# trunk and 2e-4 for the head for five epochs helped on every split seed (DECISIONS.md: a fine-tune of dlib's last
# two levels helps).
TUNE_DEFAULTS: dict[str, Any] = dict(epochs=5, lr=2e-4, trunk_lr_mult=0.015)


@dataclass
class TrainConfig:
    data: str | tuple[str, ...]  # one labelled folder, or several trained on together
    out: str = "runs/latest"
    backbone: str = DEFAULT_BACKBONE  # a name in agegender.backbones.BACKBONES
    feature_layer: str = ""  # which backbone layer feeds the head ("" = the backbone's default)
    alignment: str = ""  # how faces are framed ("" = the backbone's; else one of its spec's alignments)
    weights: str | None = None  # the backbone's pretrained file (default: the zoo's, where it finds one)
    init: str = "pretrained"  # or "scratch": no pretrained weights, the whole net trains
    preset: str = "default"
    split: str = "identity"
    seed: int = 0
    epochs: int = 25
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 64
    # Regression beat DEX (softmax expectation) on every small set we could measure (see README).
    age_head: str = "regression"
    age_weight: float = 1.0
    head_bn: bool = True
    feature_bn: bool = True
    block_bn: bool = False
    dropout: tuple[float, ...] = (0.5, 0.5)
    hidden: tuple[int, ...] = (4096, 4096)
    # The options below image_size's kind are read by the backbones that say so (BackboneSpec.train_options).
    widths: tuple[int, ...] = ()  # with --init scratch (() = the backbone's own); pretrained: from the file
    pixels: str = OWN_PIXELS  # or a recipe of the backbone's ("seed": /255 RGB)
    unfreeze: bool = False
    mirror: bool = False  # a face's mirror image half of the time (the cache holds the features of both)
    tune_levels: int = 0  # train the trunk's last N levels, from activations cached in front of them (mirrored)
    start_from: str | None = None  # a trained model file whose weights the run starts from (with tune_levels)
    trunk_lr_mult: float = 0.1
    cache: bool = True
    cache_dir: str | None = None
    precision: str = "auto"  # trunk precision: auto = bf16 where the hardware has bf16 units
    patience: int = 0
    limit: int = 0
    exclude: str | None = None  # a list of files to leave out (data.records.read_exclusions)
    workers: int = 2
    device: str = "cpu"
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> TrainConfig:
        if preset not in PRESETS:
            raise AgeGenderError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None and (v != "" or k == "data")}
        if "hidden" in given and "dropout" not in given:
            # One dropout per hidden layer, at the preset's rate: `--hidden 64` alone must just work.
            rate = float(PRESETS[preset]["dropout"][0])
            given["dropout"] = (rate,) * len(given["hidden"])
        spec = BACKBONES.get(str(given.get("backbone", DEFAULT_BACKBONE)))  # an unknown one: validate() says so
        backbone_defaults = dict(spec.train_defaults) if spec is not None and preset == "default" else {}
        values = {**PRESETS[preset], **backbone_defaults, **given}
        if values.get("tune_levels"):
            values = {**values, **{k: v for k, v in TUNE_DEFAULTS.items() if k not in given}}
        if values.get("init") == "scratch":
            # From scratch the whole trunk learns at the full rate, and a 13-conv stack trains far better
            # with BatchNorm after each block.
            values.update(unfreeze=True, block_bn=True, trunk_lr_mult=1.0)
        return cls(preset=preset, **values)

    def validate(self) -> TrainConfig:
        """Every option checked before anything is written; a problem is one line naming the option."""
        from ..data.splits import PROTOCOLS
        from ..devices import PRECISIONS

        spec = backbone(self.backbone)
        checks = [  # (fine, the problem with the parameter in backticks, the parameter)
            (self.epochs >= 1, f"`epochs` must be at least 1, got {self.epochs}", "epochs"),
            (
                self.batch_size >= 2,
                f"`batch_size` must be at least 2 (BatchNorm needs two faces), got {self.batch_size}",
                "batch_size",
            ),
            (self.lr > 0, f"`lr` must be positive, got {self.lr}", "lr"),
            (self.workers >= 1, f"`workers` must be at least 1, got {self.workers}", "workers"),
            (self.limit >= 0, f"`limit` must be 0 (all) or positive, got {self.limit}", "limit"),
            (self.patience >= 0, f"`patience` must be 0 (off) or positive, got {self.patience}", "patience"),
            (self.split in PROTOCOLS, f"`split` must be one of {', '.join(PROTOCOLS)}, got {self.split!r}", "split"),
            (self.precision in PRECISIONS, f"`precision` must be one of {', '.join(PRECISIONS)}", "precision"),
            (self.init in ("pretrained", "scratch"), f"`init` must be pretrained or scratch, got {self.init!r}", "init"),
            (
                not self.alignment or self.alignment in spec.alignments,
                f"`alignment` {self.alignment}: {spec.name} takes "
                f"{' or '.join(spec.alignments) if spec.alignments else 'no other alignment than its own'}",
                "alignment",
            ),
            (
                self.pixels == OWN_PIXELS or self.pixels in spec.pixels,
                f"`preset` {self.preset}: its {self.pixels!r} pixels are not a recipe of {spec.name}",
                "preset",
            ),
        ]
        for ok, message, parameter in checks:
            if not ok:
                raise OptionError(message, parameter)
        if self.tune_levels:
            self._check_tuning(spec)
        if self.mirror and not self.cache:
            raise OptionError(
                "`mirror` draws from cached features of each face and its mirror image: it needs the cache", "mirror"
            )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise OptionError(f"{out}: `out` names a run directory, but this is a file", "out")
        for data in [self.data] if isinstance(self.data, str) else list(self.data):
            if not Path(data).exists():
                raise OptionError(f"{data}: no such file or directory (`data`)", "data")
        if self.exclude is not None and not Path(self.exclude).is_file():
            raise OptionError(f"{self.exclude}: no such file (`exclude`)", "exclude")
        if self.weights is not None and not Path(self.weights).is_file():
            raise OptionError(f"{self.weights}: no such weights file (`weights`)", "weights")
        if self.start_from is not None and not Path(self.start_from).is_file():
            raise OptionError(f"{self.start_from}: no such model file (`start_from`)", "start_from")

        # The model config checks sizes, widths and head shapes in one place; the backbone says which of them
        # come from the options.
        shape = spec.training_shape({"widths": self.widths, "image_size": self.image_size})
        model = ModelConfig(
            backbone=spec.name,
            widths=shape["widths"],
            image_size=shape["image_size"],
            hidden=self.hidden,
            dropout=self.dropout,
            age_head=self.age_head,
            feature_layer=self.feature_layer,
        )
        _check_fits_memory(model, self.batch_size)
        return self

    def _check_tuning(self, spec: Any) -> None:
        levels = spec.trunk_class().levels
        problem = (
            f"{spec.name} has no levels to tune; `unfreeze` trains its whole trunk"
            if "tune_levels" not in spec.train_options or not levels
            else f"must be 0 to {levels} for {spec.name}, got {self.tune_levels}"
            if not 0 < self.tune_levels <= levels
            else "and `unfreeze` both train the trunk: choose one"
            if self.unfreeze or self.init == "scratch"
            else "trains from activations cached in front of the tuned levels: it needs the feature cache"
            if not self.cache
            else "needs `start_from`: the model file of a trained frozen run, whose head it fine-tunes"
            if self.start_from is None
            else ""
        )
        if problem:
            raise OptionError(f"`tune_levels` {problem}", "tune_levels", "start_from", "unfreeze")

    @property
    def bf16(self) -> bool:
        return use_bf16(self.precision, self.device)

    @property
    def trunk_trains(self) -> bool:
        return self.unfreeze or self.block_bn

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def applicable_dict(self) -> dict[str, Any]:
        """``to_dict`` without the options that do nothing for this backbone (BACKBONE_OPTIONS it does not read:
        a dlib run has no image size, pixels or widths; a VGG run no alignment), as a run's config.json records it.
        Resuming fills the missing ones with their defaults, which change nothing."""
        spec = backbone(self.backbone)
        unused = BACKBONE_OPTIONS - spec.train_options
        if self.init != "scratch":
            unused = unused | {"widths"}  # pretrained widths come from the weights file
        d = {k: v for k, v in self.to_dict().items() if k not in unused}
        if "widths" in d:  # the widths the run was built with
            d["widths"] = list(spec.training_shape(self.to_dict())["widths"])
        return d


def _check_fits_memory(model: ModelConfig, batch_size: int) -> None:
    """Refuse a head or a batch that cannot fit this machine's memory, before data or weights are read.

    A lower bound: the head's weights with their gradient and Adam's two moments (16 bytes a weight), and one
    batch of its activations forward and backward; the trunk comes on top.
    """
    import itertools
    import os

    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not reported: nothing to check against
        return
    widths = [model.feature_dim, *model.hidden]
    weights = sum(a * b for a, b in itertools.pairwise(widths)) + widths[-1] * (model.ages + 1)
    activations = batch_size * (sum(widths) + model.ages) * 4 * 3
    need = 16 * weights + activations
    if need > memory:
        raise OptionError(
            f"`hidden` {' '.join(map(str, model.hidden))} with `batch_size` {batch_size} needs at "
            f"least {need / 2**30:.1f} GiB to train, more than this machine's {memory / 2**30:.1f} GiB",
            "hidden",
            "batch_size",
        )
