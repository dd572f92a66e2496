"""Export a trained checkpoint to ONNX, Keras 3, torch.export or a TensorFlow SavedModel, each verified against
PyTorch before it lands."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..backbones import backbone
from ..errors import AgeGenderError, one_line
from ..files import atomic_path, write_text_atomic
from ..model.checkpoint import CheckpointMeta
from ..model.config import ModelConfig
from ..model.decode import decode, output_names
from ..model.net import AgeGenderNet
from ..process import env_defaults
from .formats import SUFFIXES
from .graph_weights import Weights, age_values, bn_arrays, dense_arrays, regression_affine

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
KERAS_TOLERANCE = 1e-4
TORCH_TOLERANCE = 1e-5
INPUT_NAME = "input"
KERAS_OUTPUTS = ("p_male", "age", "age_probs")  # the age interval is not in the Keras graph yet


class InferenceModel(nn.Module):
    """The one contract every export shares: normalised float32 ``(N, 3, S, S)`` -> the tensors of ``output_names``,
    decoded by :func:`~agegender.model.decode.decode` exactly as ``predict`` and the evaluation report decode them.

    Wrapping puts ``net`` in eval mode (BatchNorm on running statistics, dropout off).
    """

    def __init__(self, net: AgeGenderNet) -> None:
        super().__init__()
        self.net = net
        self.output_names = output_names(net.config)
        self.eval()

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(input)
        return decode(self.net.config, out.gender_logit, out.age_logits)


# -- shared plumbing ----------------------------------------------------------------------------


def verification_images(meta: CheckpointMeta, n: int = 4, seed: int = 0) -> np.ndarray:
    """A deterministic batch of random uint8 ``(n, S, S, 3)`` RGB images at the model's input size."""
    size = meta.config.image_size
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def verification_batch(meta: CheckpointMeta, n: int = 4, seed: int = 0) -> torch.Tensor:
    """:func:`verification_images` passed through the checkpoint's own preprocessing."""
    return torch.from_numpy(meta.preprocess.normalize_numpy(verification_images(meta, n, seed)))


def export_metadata(meta: CheckpointMeta, fmt: str, **details: Any) -> str:
    """The checkpoint's metadata JSON plus an ``export`` section describing the exported contract.

    ``CheckpointMeta.from_json`` still reads it (it ignores the extra key). ``age`` is null when the model
    has no age head, so predictors know to report none.
    """
    cfg = meta.config
    doc = json.loads(meta.to_json())
    doc["export"] = {
        "format": fmt,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, cfg.image_size, cfg.image_size],
            "normalised_by": "preprocess",
        },
        "outputs": output_names(cfg),
        "age": None
        if cfg.age_head == "none"
        else {"head": cfg.age_head, "unit": "years", "min": cfg.age_min, "max": cfg.age_max},
        "torch": torch.__version__,
        **details,
    }
    return json.dumps(doc, sort_keys=True)


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(output)}.json")


# Names that say "a model file": a SavedModel directory named like one is most likely a mistaken --format.
_FILE_SUFFIXES = {s for s in SUFFIXES.values() if s} | {".safetensors", ".json", ".h5", ".pb", ".tflite"}


def check_output(output: str | os.PathLike[str], fmt: str) -> Path:
    path = Path(output)
    # A parent that is a file fails only at the write, after minutes of tracing: say so first.
    blocker = next((a for a in path.absolute().parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise AgeGenderError(f"{path}: cannot write here ({blocker} is a file, not a directory)")
    if not SUFFIXES[fmt]:  # a directory: TF Serving reads <base>/<version>/, so the name is usually a number
        if path.suffix.lower() in _FILE_SUFFIXES:
            raise AgeGenderError(
                f"{path}: a {fmt} export is a directory; name it without a file suffix "
                "(for TF Serving, a version number such as models/agegender/1)"
            )
        if path.exists() or path.is_symlink():
            raise AgeGenderError(f"{path}: already exists; a {fmt} export never overwrites (choose a new version)")
        return path
    if path.suffix != SUFFIXES[fmt]:
        raise AgeGenderError(f"{path}: a {fmt} export must be named *{SUFFIXES[fmt]}")
    if path.is_dir():
        raise AgeGenderError(f"{path}: is a directory, not a file name")
    return path


def _check_inputs(x: torch.Tensor | None, meta: CheckpointMeta) -> torch.Tensor:
    if x is None:
        return verification_batch(meta)
    size = meta.config.image_size
    if (
        not isinstance(x, torch.Tensor)
        or x.dtype != torch.float32
        or x.ndim != 4
        or tuple(x.shape[1:]) != (3, size, size)
        or x.shape[0] < 1
    ):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise AgeGenderError(f"verification inputs must be float32 (N, 3, {size}, {size}), got {got}")
    return x.detach().cpu().contiguous()


def _torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(x)]


def _parity(
    expected: Sequence[np.ndarray], got: Sequence[Any], names: Sequence[str], tolerance: float, where: Path, what: str
) -> dict[str, float]:
    """Per-output max abs diff; raises unless every ``|diff| <= tolerance * max(1, |reference|)``.

    The scale matters only for ``age`` in years: float32 itself carries ~1e-6 relative error through
    the trunk, which a fixed 1e-4 would reject for a regression head (34.5 years per logit unit).
    Probabilities are <= 1, so for them this is the plain absolute tolerance.
    """
    got = [np.asarray(g) for g in got]
    if len(got) != len(expected):
        raise AgeGenderError(f"{where}: {what} gives {len(got)} outputs, expected {len(expected)} ({names})")
    diffs, worst = {}, 0.0
    for name, e, g in zip(names, expected, got):
        if e.shape != g.shape:
            raise AgeGenderError(f"{where}: {what} output {name} has shape {g.shape}, PyTorch gives {e.shape}")
        d = np.abs(e.astype(np.float64) - g)
        diffs[name] = float(d.max())
        worst = max(worst, float((d / np.maximum(1.0, np.abs(e))).max()))
    if not worst <= tolerance:  # also catches NaN
        raise AgeGenderError(
            f"{where}: {what} differs from PyTorch by {worst:.3g} (> {tolerance:g}, per output {diffs}); nothing written"
        )
    log.info("%s: %s matches PyTorch (max abs diff per output %s; at most %.3g of max(1, |value|))", where, what, diffs, worst)
    return diffs


@contextlib.contextmanager
def _suffixed_temp(dest: Path) -> Iterator[Path]:
    """Like ``atomic_path`` but the temp name keeps ``dest``'s suffix, for writers that insist on one."""
    with atomic_path(dest) as tmp:
        named = tmp.with_name(tmp.name + dest.suffix)
        try:
            yield named
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)


def _write_sidecar(output: Path, meta_json: str) -> Path:
    """Write ``<output>.json``; if that fails, take the model file back so neither half is left alone."""
    side = sidecar_path(output)
    try:
        write_text_atomic(side, meta_json)
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return side


def _result(fmt: str, output: Path, config: ModelConfig, diffs: dict[str, float], started: float, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "format": fmt,
        "path": str(output),
        "outputs": [n for n in output_names(config) if n in diffs],
        "age": None if config.age_head == "none" else config.age_head,
        "max_abs_diff": max(diffs.values()),
        "diffs": diffs,
        "seconds": round(time.perf_counter() - started, 3),
        **extra,
    }
    if config.age_head == "none":
        result["note"] = "model has no age head: exported p_male only; predictors report no age"
    return result


# -- ONNX ---------------------------------------------------------------------------------------


def _pick_onnx_exporter(exporter: str) -> str:
    if exporter == "auto":
        # The torch.export-based exporter is torch's default and future; it needs onnxscript. The
        # TorchScript one is deprecated but still complete in torch 2.13. Both pass the same parity gate.
        return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be auto, dynamo or torchscript, not {exporter!r}")
    return exporter


# Loggers of the ONNX exporters: each export logs a dozen INFO lines and torchvision warnings that say nothing
# about this model. Shown with -v (debug logging); errors always.
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Raise the exporters' log levels to ERROR unless this package logs at DEBUG; restored afterwards."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_to_onnx(model: InferenceModel, example: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    names = model.output_names
    with warnings.catch_warnings(), quiet_exporters():
        # torch-internal deprecation chatter; the TorchScript exporter is chosen knowingly as the fallback.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                verbose=False,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}},
            )
            return
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *names)},
        )


def export_onnx(
    net: AgeGenderNet,
    meta: CheckpointMeta,
    output: str | os.PathLike[str],
    verify_inputs: torch.Tensor | None = None,
    *,
    opset: int = ONNX_OPSET,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Write ``output`` (.onnx) with the metadata in ``metadata_props``; ONNX checker, then onnxruntime parity."""
    import onnx
    import onnxruntime as ort

    started = time.perf_counter()
    output, x, model, expected = _prepare(net, meta, output, "onnx", verify_inputs)
    exporter = _pick_onnx_exporter(exporter)
    meta_json = export_metadata(meta, "onnx", opset=opset, exporter=exporter)
    size = meta.config.image_size
    with atomic_path(output) as tmp:
        # Trace with batch 2: exporters specialise a batch of 1 into a constant.
        _torch_to_onnx(model, torch.zeros(2, 3, size, size), tmp, opset, exporter)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {"agegender": meta_json, "opset": str(opset)})
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise AgeGenderError(f"{output}: exported graph fails the ONNX checker ({one_line(e)})") from None
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(model.output_names, {INPUT_NAME: x.numpy()})
        diffs = _parity(expected, got, model.output_names, ONNX_TOLERANCE, output, "onnxruntime")
    return _result("onnx", output, meta.config, diffs, started, opset=opset, exporter=exporter)


def store_weights_fp16(
    source: str | os.PathLike[str], output: str | os.PathLike[str], min_elements: int = 1024
) -> dict[str, Any]:
    """Copy an ONNX export with its large float32 weights stored as float16, each behind a Cast back to float32.

    Half the bytes on disk; the arithmetic stays float32, since onnxruntime folds the Casts once when it loads the
    model. Weights round to 11 significant bits, so outputs move slightly: check them against the original on
    real faces before shipping (MODEL_CARD.md gives the figures for the bundled model).
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    graph, casts, halved, before = proto.graph, [], 0, 0
    keep = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        before += array.nbytes
        if init.data_type != onnx.TensorProto.FLOAT or array.size < min_elements:
            keep.append(init)
            continue
        half = array.astype(np.float16)
        if not np.isfinite(half).all():
            raise AgeGenderError(f"{source}: weight {init.name} overflows float16; keep the float32 export")
        keep.append(numpy_helper.from_array(half, f"{init.name}.fp16"))
        casts.append(
            onnx.helper.make_node(
                "Cast", [f"{init.name}.fp16"], [init.name], to=onnx.TensorProto.FLOAT, name=f"{init.name}.to_fp32"
            )
        )
        halved += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(output) as tmp:
        onnx.save(proto, str(tmp))
    return {"path": str(output), "halved": halved, "bytes_before": before, "bytes_after": Path(output).stat().st_size}


# -- Keras --------------------------------------------------------------------------------------

# TensorFlow prints its oneDNN and CPU notes on import unless told not to; Keras's saving imports it when present.
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Keras's backend unless KERAS_BACKEND says otherwise: torch, so that building a .keras file never needs TensorFlow.
KERAS_DEFAULT_BACKEND = "torch"


def _import_keras() -> Any:
    # Keras fixes its backend at first import. Defaulting to torch means exporting never needs TensorFlow;
    # an explicit KERAS_BACKEND, or keras already imported with another backend, is respected as is,
    # which is safe because the model below is built from backend-neutral layers and numpy weights.
    try:
        with env_defaults(KERAS_BACKEND=KERAS_DEFAULT_BACKEND, **QUIET_TF):
            import keras
    except ImportError as e:
        raise AgeGenderError(f"keras export needs Keras 3 (pip install 'agegender[export]'): {e}") from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise AgeGenderError(f"keras export needs Keras 3, found {keras.__version__}")
    return keras


def build_keras_model(net: AgeGenderNet) -> keras.Model:
    """The Keras 3 functional twin of ``InferenceModel(net)``: same NCHW input, same named outputs.

    Inside, it runs channels-last (TensorFlow has no channels-first conv on CPU). BatchNorm layers carry
    the running statistics, which is what eval mode computes. The trunk's layers are its backbone's Keras graph
    (``BackboneSpec.graphs["keras"]``: :mod:`.keras_vgg`, :mod:`.keras_dlib`); the head is the same for all.
    """
    keras = _import_keras()
    layers = keras.layers
    cfg, trunk = net.config, net.trunk
    weights: Weights = {}

    inputs = keras.Input((3, cfg.image_size, cfg.image_size), name=INPUT_NAME)
    x = layers.Permute((2, 3, 1), name="to_channels_last")(inputs)
    x = backbone(cfg.backbone).graph("keras")(keras, x, trunk, weights)

    fc = 0
    for module in net.fc:
        if isinstance(module, nn.Linear):
            fc += 1
            x = layers.Dense(module.out_features, use_bias=module.bias is not None, name=f"fc{fc}")(x)
            weights[f"fc{fc}"] = dense_arrays(module)
        elif isinstance(module, nn.BatchNorm1d):
            name = f"fc{fc}_bn" if fc else "features_bn"
            x = layers.BatchNormalization(epsilon=module.eps, name=name)(x)
            weights[name] = bn_arrays(module)
        elif isinstance(module, nn.ReLU):
            x = layers.Activation("relu", name=f"fc{fc}_relu")(x)
        elif not isinstance(module, nn.Dropout):  # dropout is the identity at inference
            raise TypeError(f"no Keras equivalent for head layer {type(module).__name__}")
    features = x

    gender = layers.Dense(1, activation="sigmoid", name="gender")(features)
    # sigmoid(logit / T): the calibration temperature folded into the layer's weights
    weights["gender"] = dense_arrays(net.gender, 1.0 / cfg.temperature)
    assert net.age is not None or cfg.age_head == "none"
    outputs = [layers.Reshape((), name="p_male")(gender)]
    if cfg.age_head == "dex":
        probs = layers.Dense(cfg.ages, activation="softmax", name="age_probs")(features)
        weights["age_probs"] = dense_arrays(net.age)  # type: ignore[arg-type]
        # DEX age is the expectation of the age distribution: one fixed dot product with the ages.
        years = layers.Dense(1, use_bias=False, name="age_expectation")(probs)
        weights["age_expectation"] = [age_values(cfg)[:, None]]
        outputs += [layers.Reshape((), name="age")(_keras_stretch(layers, cfg, years)), probs]
    elif cfg.age_head == "regression":
        scale, offset = regression_affine(cfg)
        years = layers.Dense(1, name="age_years")(features)  # minus age_min, so a ReLU clamps the range
        weights["age_years"] = dense_arrays(net.age, scale, offset - cfg.age_min)  # type: ignore[arg-type]
        years = layers.ReLU(max_value=float(cfg.age_max - cfg.age_min), name="age_clamp")(years)
        years = layers.Rescaling(1.0, offset=float(cfg.age_min), name="age_offset")(years)
        outputs.append(layers.Reshape((), name="age")(_keras_stretch(layers, cfg, years)))

    model = keras.Model(inputs, outputs, name=f"agegender_{cfg.age_head}")
    for name, arrays in weights.items():
        model.get_layer(name).set_weights(arrays)
    return model


def _keras_stretch(layers: Any, cfg: ModelConfig, years: Any) -> Any:
    """``decode.stretch_years`` in Keras layers: years + stretch * relu(years - pivot), clamped to the range."""
    if not cfg.age_stretch:
        return years
    over = layers.Rescaling(1.0, offset=-cfg.age_pivot, name="age_over_pivot")(years)
    over = layers.ReLU(name="age_over_relu")(over)
    over = layers.Rescaling(cfg.age_stretch, name="age_stretch")(over)
    years = layers.Add(name="age_stretched")([years, over])
    # The clamp as in the regression path: shift to age_min, a ReLU capped at the range's width, shift back.
    years = layers.Rescaling(1.0, offset=-float(cfg.age_min), name="age_stretched_from_min")(years)
    years = layers.ReLU(max_value=float(cfg.age_max - cfg.age_min), name="age_stretched_clamp")(years)
    return layers.Rescaling(1.0, offset=float(cfg.age_min), name="age_stretched_offset")(years)


def _keras_outputs(model: Any, x: np.ndarray) -> list[np.ndarray]:
    keras = _import_keras()
    outs = model(x, training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [keras.ops.convert_to_numpy(o) for o in outs]


def _prepare(
    net: AgeGenderNet, meta: CheckpointMeta, output: str | os.PathLike[str], fmt: str, verify_inputs: torch.Tensor | None
) -> tuple[Path, torch.Tensor, InferenceModel, list[np.ndarray]]:
    """The checked output path, the verification batch, the wrapped model and its PyTorch reference outputs."""
    out = check_output(output, fmt)
    x = _check_inputs(verify_inputs, meta)
    model = InferenceModel(net)
    return out, x, model, _torch_outputs(model, x)


def export_keras(
    net: AgeGenderNet, meta: CheckpointMeta, output: str | os.PathLike[str], verify_inputs: torch.Tensor | None = None
) -> dict[str, Any]:
    """Write ``output`` (.keras) and ``<output>.json``; parity is checked on the saved file, reloaded."""
    started = time.perf_counter()
    output, x, model, expected = _prepare(net, meta, output, "keras", verify_inputs)
    keras = _import_keras()
    kmodel = build_keras_model(net)
    backend = keras.backend.backend()
    meta_json = export_metadata(
        meta,
        "keras",
        keras=keras.__version__,
        built_with_backend=backend,
        note="input is NCHW like the ONNX export; the model permutes to NHWC inside",
    )
    with _suffixed_temp(output) as tmp, env_defaults(**QUIET_TF):
        kmodel.save(str(tmp))
        reloaded = keras.saving.load_model(str(tmp))
        names = [n for n in model.output_names if n in KERAS_OUTPUTS]
        diffs = _parity(
            [e for n, e in zip(model.output_names, expected) if n in KERAS_OUTPUTS],
            _keras_outputs(reloaded, x.numpy()),
            names,
            KERAS_TOLERANCE,
            output,
            f"Keras ({backend} backend, reloaded)",
        )
    side = _write_sidecar(output, meta_json)
    return _result("keras", output, meta.config, diffs, started, backend=backend, metadata=str(side))


_TF_RUNNER = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    if keras.backend.backend() != "tensorflow":
        sys.exit(f"keras backend is {keras.backend.backend()}, not tensorflow")
    model = keras.saving.load_model(sys.argv[1])
    with np.load(sys.argv[2]) as z:
        outs = model(z["input"], training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    np.savez(sys.argv[3], **{n: keras.ops.convert_to_numpy(o) for n, o in zip(model.output_names, outs)})
""")


def check_keras_in_tensorflow(
    path: str | os.PathLike[str], inputs: torch.Tensor | np.ndarray, timeout: float = 600
) -> dict[str, np.ndarray]:
    """Run a .keras export under TensorFlow's Keras in a fresh process; returns ``{output name: array}``.

    A subprocess because Keras fixes its backend per process, and this one may already be on torch.
    """
    path = Path(path)
    if not path.is_file():
        raise AgeGenderError(f"{path}: no such Keras file")
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs, np.float32)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", **QUIET_TF}
    with tempfile.TemporaryDirectory(prefix="agegender-tf-") as tmp:
        src, dst = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(src, input=x)
        proc = subprocess.run(
            [sys.executable, "-c", _TF_RUNNER, str(path.resolve()), str(src), str(dst)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no error output"]
            raise AgeGenderError(f"{path}: TensorFlow Keras could not run the model ({lines[-1]})")
        with np.load(dst) as z:
            return {name: z[name] for name in z.files}


# -- torch.export -------------------------------------------------------------------------------


def export_torch(
    net: AgeGenderNet, meta: CheckpointMeta, output: str | os.PathLike[str], verify_inputs: torch.Tensor | None = None
) -> dict[str, Any]:
    """Write ``output`` (.pt2) with the metadata as an extra file and in ``<output>.json``; parity on the reload."""
    started = time.perf_counter()
    output, x, model, expected = _prepare(net, meta, output, "torch", verify_inputs)
    meta_json = export_metadata(meta, "torch")
    size = meta.config.image_size
    # Trace with batch 2: torch.export specialises sizes 0 and 1, so a batch of 1 would not stay dynamic.
    program = torch.export.export(
        model, (torch.zeros(2, 3, size, size),), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}
    )
    with _suffixed_temp(output) as tmp:
        torch.export.save(program, str(tmp), extra_files={"agegender.json": meta_json})
        got = _torch_outputs(torch.export.load(str(tmp)).module(), x)
        diffs = _parity(expected, got, model.output_names, TORCH_TOLERANCE, output, "torch.export program (reloaded)")
    side = _write_sidecar(output, meta_json)
    return _result("torch", output, meta.config, diffs, started, metadata=str(side))
