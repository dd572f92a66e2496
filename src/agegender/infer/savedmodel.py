"""TensorFlow SavedModel export for TF Serving: uint8 face crops in, the preprocessing inside the graph.

The directory holds two signatures (tag ``serve``):

* ``serving_default``: ``crops``, uint8 ``(N, S, S, 3)`` RGB, as :class:`~agegender.infer.predict.Predictor`
  frames them; the checkpoint's preprocessing (mean, scale, channel order) runs in the graph;
* ``normalized``: ``input``, float32 ``(N, 3, S, S)`` already normalised, the contract of the other exports.

Both return ``p_male``, then as the head has them ``age`` and (DEX) ``age_probs``, ``age_low`` and ``age_high``
(the 10th and 90th percentiles of the age distribution). The export metadata is ``assets/agegender.json``.
TF Serving reads ``<model_base_path>/<version>/``: export to a new numbered directory, e.g. ``models/agegender/1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AgeGenderError
from ..files import atomic_dir
from ..model.config import ModelConfig, Preprocess
from ..model.meta import CheckpointMeta
from ..model.net import AgeGenderNet
from ..process import env_defaults
from .export import (
    INPUT_NAME,
    KERAS_DEFAULT_BACKEND,
    QUIET_TF,
    _parity,
    _prepare,
    _result,
    _torch_outputs,
    export_metadata,
    output_names,
    verification_images,
)
from .tf_graph import AGE_QUANTILES, age_percentile_numpy, inference_graph

SAVEDMODEL_TOLERANCE = 1e-4  # as ONNX's: absolute for probabilities, relative for age in years
SERVING_SIGNATURE = "serving_default"
NORMALIZED_SIGNATURE = "normalized"
CROPS_NAME = "crops"
METADATA_ASSET = "agegender.json"


def savedmodel_output_names(config: ModelConfig) -> list[str]:
    """The decoded outputs, the DEX percentiles among them, as every export has them."""
    return output_names(config)


def import_tf() -> Any:
    # Importing TensorFlow imports Keras, which then fixes its backend for the process: the same default as
    # the .keras export's, so exporting both in one process gives the same .keras file in either order.
    try:
        with env_defaults(KERAS_BACKEND=KERAS_DEFAULT_BACKEND, **QUIET_TF):
            import tensorflow as tf
    except ImportError as e:
        raise AgeGenderError(f"savedmodel export needs TensorFlow (pip install 'agegender[tf]'): {e}") from None
    return tf


def build_serving_module(tf: Any, net: AgeGenderNet, preprocess: Preprocess, metadata_file: Path) -> Any:
    """A ``tf.Module`` with the weights, both signature functions and the metadata file as an asset."""
    size = net.config.image_size
    forward, variables = inference_graph(tf, net)
    mean = tf.constant(np.asarray(preprocess.mean_rgb, np.float32))
    scale = tf.constant(np.float32(preprocess.scale))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=CROPS_NAME)])
    def serve_crops(crops: Any) -> dict[str, Any]:
        x = (tf.cast(crops, tf.float32) - mean) * scale  # Preprocess.normalize_numpy, op for op
        if preprocess.channel_order == "BGR":
            x = tf.reverse(x, axis=[-1])
        return forward(x)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, size, size], tf.float32, name=INPUT_NAME)])
    def serve_normalized(input: Any) -> dict[str, Any]:  # the signature's input is named after this argument
        return forward(tf.transpose(input, [0, 2, 3, 1]))

    root = tf.Module()
    root.weights = variables  # tracked, so saved with the functions that capture them
    root.serve_crops, root.serve_normalized = serve_crops, serve_normalized
    root.metadata = tf.saved_model.Asset(str(metadata_file))
    return root


@contextlib.contextmanager
def _quiet_logger(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _signature_doc(config: ModelConfig, names: list[str]) -> dict[str, Any]:
    s = config.image_size
    return {
        SERVING_SIGNATURE: {
            "inputs": {
                CROPS_NAME: {
                    "dtype": "uint8",
                    "layout": "NHWC",
                    "shape": ["batch", s, s, 3],
                    "channels": "RGB",
                    "normalised_by": "the graph (preprocess)",
                }
            },
            "outputs": names,
        },
        NORMALIZED_SIGNATURE: {
            "inputs": {
                INPUT_NAME: {"dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, s, s], "normalised_by": "preprocess"}
            },
            "outputs": names,
        },
    }


def _check_percentiles(probs: np.ndarray, got: dict[str, np.ndarray], age_min: int, where: Path, what: str) -> dict[str, float]:
    """Each served percentile must be the reference's, or its neighbour where the reference's cumulative
    probability passes q within the tolerance (float sums in another order may cross q one age apart)."""
    diffs = {}
    for name, q in AGE_QUANTILES.items():
        lo, hi = (age_percentile_numpy(probs, q + d, age_min) for d in (-SAVEDMODEL_TOLERANCE, SAVEDMODEL_TOLERANCE))
        served = np.asarray(got[name])
        if served.shape != lo.shape or not np.all((served >= lo) & (served <= hi)):
            raise AgeGenderError(
                f"{where}: {what} output {name} differs from the PyTorch age distribution's {q:.0%} percentile; nothing written"
            )
        diffs[name] = float(np.abs(served - age_percentile_numpy(probs, q, age_min)).max())
    return diffs


def _verify(
    loaded: Any, signature: str, feed: dict[str, np.ndarray], expected: list[np.ndarray], config: ModelConfig, where: Path
) -> tuple[dict[str, float], dict[str, float]]:
    tf = import_tf()
    got = {k: v.numpy() for k, v in loaded.signatures[signature](**{k: tf.constant(v) for k, v in feed.items()}).items()}
    names = output_names(config)
    if set(got) != set(names):
        raise AgeGenderError(f"{where}: signature {signature} gives {sorted(got)}, expected {sorted(names)}")
    what = f"SavedModel signature {signature} (reloaded)"
    # The percentiles are whole ages: checked apart, where float sums in another order may cross q one age apart.
    smooth = [i for i, n in enumerate(names) if n not in AGE_QUANTILES]
    diffs = _parity(
        [expected[i] for i in smooth],
        [got[names[i]] for i in smooth],
        [names[i] for i in smooth],
        SAVEDMODEL_TOLERANCE,
        where,
        what,
    )
    years = (
        _check_percentiles(expected[names.index("age_probs")], got, config.age_min, where, what)
        if config.age_head == "dex"
        else {}
    )
    return diffs, years


def export_savedmodel(
    net: AgeGenderNet, meta: CheckpointMeta, output: str | os.PathLike[str], verify_inputs: torch.Tensor | None = None
) -> dict[str, Any]:
    """Write the SavedModel directory ``output`` (a new path); both signatures are checked on the reload.

    ``serving_default`` runs on random uint8 images against PyTorch on the same images normalised by the
    checkpoint's preprocessing; ``normalized`` runs on ``verify_inputs`` (default: those images, normalised).
    """
    started = time.perf_counter()
    output, x, model, expected = _prepare(net, meta, output, "savedmodel", verify_inputs)
    cfg = meta.config
    images = verification_images(meta)
    expected_images = _torch_outputs(model, torch.from_numpy(meta.preprocess.normalize_numpy(images)))
    tf = import_tf()
    names = savedmodel_output_names(cfg)
    signatures = _signature_doc(cfg, names)
    meta_json = export_metadata(
        meta,
        "savedmodel",
        tensorflow=tf.__version__,
        outputs=names,
        input={"name": CROPS_NAME, **signatures[SERVING_SIGNATURE]["inputs"][CROPS_NAME]},
        signatures=signatures,
        tag="serve",
        age_quantiles=AGE_QUANTILES if cfg.age_head == "dex" else None,
    )
    with atomic_dir(output) as tmp, tempfile.TemporaryDirectory(prefix="agegender-savedmodel-") as scratch:
        source = Path(scratch) / METADATA_ASSET
        source.write_text(meta_json, encoding="utf-8")
        root = build_serving_module(tf, net, meta.preprocess, source)
        with _quiet_logger(tf.get_logger()):  # its "Assets written to <temp dir>" would only mislead
            tf.saved_model.save(
                root, str(tmp), signatures={SERVING_SIGNATURE: root.serve_crops, NORMALIZED_SIGNATURE: root.serve_normalized}
            )
        if read_metadata_text(tmp) != meta_json:
            raise AgeGenderError(f"{output}: the SavedModel's {METADATA_ASSET} asset was not written; nothing kept")
        loaded = tf.saved_model.load(str(tmp), tags=["serve"])
        diffs, years = _verify(loaded, NORMALIZED_SIGNATURE, {INPUT_NAME: x.numpy()}, expected, cfg, output)
        served, served_years = _verify(loaded, SERVING_SIGNATURE, {CROPS_NAME: images}, expected_images, cfg, output)
    diffs = {k: max(v, served[k]) for k, v in diffs.items()}
    years = {k: max(v, served_years[k]) for k, v in years.items()}
    return _result(
        "savedmodel",
        output,
        cfg,
        diffs,
        started,
        outputs=names,
        tensorflow=tf.__version__,
        signatures=list(signatures),
        percentile_diffs_years=years,
        metadata=str(output / "assets" / METADATA_ASSET),
    )


def read_metadata_text(path: Path) -> str | None:
    asset = path / "assets" / METADATA_ASSET
    return asset.read_text(encoding="utf-8") if asset.is_file() else None


def load_savedmodel_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """The checkpoint metadata of an exported SavedModel directory, read from its asset (no TensorFlow)."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise AgeGenderError(f"{path}: not a SavedModel directory (no saved_model.pb)")
    raw = read_metadata_text(path)
    if raw is None:
        raise AgeGenderError(f"{path}: SavedModel without assets/{METADATA_ASSET} (not exported by agegender)")
    try:
        return CheckpointMeta.from_json(raw)
    except (ValueError, KeyError) as e:
        raise AgeGenderError(f"{path}: {e}") from None
