"""A trained model file, ready to run: a checkpoint in PyTorch or an ONNX export in onnxruntime (no torch).

Both take uint8 face crops and return :class:`Decoded` rows, decoded by :func:`agegender.model.decode.decode`
(traced into the ONNX graph, called directly on a checkpoint), so every caller gets the same numbers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..devices import PRECISIONS, use_bf16
from ..errors import AgeGenderError, one_line
from .contract import check_onnx_contract
from .decode import output_names
from .meta import CheckpointMeta, resolve_model

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# What reading each kind of model file needs beyond the light install, for the one-line error.
TORCH_EXTRA = "pip install 'agegender[train]'"


@dataclass
class Decoded:
    """One row per face: calibrated P(male), age in years and its 10th-90th percentile interval (None where the
    model has no such output)."""

    p_male: np.ndarray
    age: np.ndarray | None = None
    age_low: np.ndarray | None = None
    age_high: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.p_male)

    @classmethod
    def of(cls, names: list[str], arrays: list[Any]) -> Decoded:
        got = {n: np.asarray(a, dtype=np.float64) for n, a in zip(names, arrays)}
        return cls(got["p_male"], got.get("age"), got.get("age_low"), got.get("age_high"))

    @classmethod
    def concat(cls, parts: list[Decoded]) -> Decoded:
        if not parts:
            return cls(np.zeros(0))

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(d, name) for d in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return cls(np.concatenate([d.p_male for d in parts]), cat("age"), cat("age_low"), cat("age_high"))


class Backend(Protocol):
    meta: CheckpointMeta
    name: str
    precision: str

    def run(self, crops: np.ndarray) -> Decoded:
        """uint8 ``(N, S, S, 3)`` RGB crops -> decoded outputs."""
        ...

    def set_threads(self, threads: int) -> None:
        """Threads each call may use (the predictor runs several calls at once)."""
        ...


class TorchBackend:
    """A checkpoint in PyTorch. The trunk runs in bf16 when ``precision`` asks for it (``auto``: where the
    hardware has bf16 units); the head always runs in fp32, so bf16 only rounds the trunk's input and
    activations (gender decisions agreed with fp32 on every shared photo in BENCHMARKS.md figure 4).

    Threads may share one backend: inference only reads the weights.
    """

    name = "torch"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "auto") -> None:
        try:
            from ..model.checkpoint import load_checkpoint
            from ..model.net import feature_extractor
        except ImportError as e:
            raise AgeGenderError(
                f"{path}: a .safetensors checkpoint runs in PyTorch ({e.name} is missing): "
                f"{TORCH_EXTRA}, or predict with an .onnx export"
            ) from None

        if precision not in PRECISIONS:
            raise AgeGenderError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.path = path
        self.model, self.meta = load_checkpoint(path, device)
        bf16 = use_bf16(precision, device)
        self.precision = "bf16" if bf16 else "fp32"
        # The trunk in its fastest inference form: oneDNN's blocked layout for a bf16 VGG, else channels_last.
        self.features = feature_extractor(self.model, bf16, device, in_place=True)

    def run(self, crops: np.ndarray) -> Decoded:
        import torch

        return self.run_normalized(self.meta.preprocess.normalize(torch.from_numpy(crops)))

    def run_normalized(self, x: torch.Tensor) -> Decoded:
        """Normalised ``(N, 3, S, S)`` input -> decoded outputs."""
        import torch

        from .decode import decode

        with torch.inference_mode():
            out = self.model.forward_head(self.features(x).float())
            decoded = decode(self.model.config, out.gender_logit, out.age_logits)
        return Decoded.of(output_names(self.meta.config), [t.float().cpu().numpy() for t in decoded])

    def set_threads(self, threads: int) -> None:
        """Torch's one pool, process-wide: callers scope it (:class:`~agegender.process.ThreadScope`)."""
        if "OMP_NUM_THREADS" in os.environ:  # the user's explicit choice wins
            return
        from ..process import set_process_threads

        set_process_threads(threads, opencv=False)


class ModelCallTimeout(AgeGenderError):
    """One call of the model ran past its time limit and was stopped: the error of every face in that call."""


# The time one ONNX session call may take before it is stopped. Generous: a batch of 64 VGG-Face crops (1 TFLOP)
# on one slow core takes tens of seconds; a hostile graph (a Loop of 10^15 turns) would otherwise hold predict for
# good.
CALL_TIMEOUT_S = 120.0


class OnnxBackend:
    """onnxruntime only; sessions are thread-safe, and preprocessing is numpy.

    The file must hold all its tensors (:func:`check_self_contained`: a model never reads another file), and each
    call is stopped after ``call_timeout`` seconds (onnxruntime checks its terminate flag between operators).
    """

    name = "onnx"
    precision = "as exported"

    def __init__(self, path: Path, call_timeout: float | None = None) -> None:
        self.path = path
        self.call_timeout = CALL_TIMEOUT_S if call_timeout is None else call_timeout
        self.session = self._session(None)
        self.meta = read_onnx_meta(self.session, path)
        check_onnx_contract(self.session, self.meta, path)
        outputs = {o.name for o in self.session.get_outputs()}
        if "p_male" not in outputs:
            raise AgeGenderError(f"{path}: ONNX model has no p_male output (outputs: {sorted(outputs)})")
        # Exports older than the age interval lack age_low/age_high; they still run, without an interval.
        self.outputs = [n for n in output_names(self.meta.config) if n in outputs and n != "age_probs"]
        config = self.meta.config
        self._age_range = (config.age_min, config.age_max)

    def _session(self, threads: int | None) -> Any:
        import onnxruntime as ort

        from .onnx_file import check_self_contained

        check_self_contained(self.path)  # before onnxruntime opens any file the model names
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise AgeGenderError(f"{self.path}: not a loadable ONNX model ({one_line(e)})") from None

    def set_threads(self, threads: int) -> None:
        """Threads for each run (a new session); by default onnxruntime's own choice, every core."""
        self.session = self._session(threads)

    def run(self, crops: np.ndarray) -> Decoded:
        got = Decoded.of(self.outputs, self._call({"input": self.meta.preprocess.normalize_numpy(crops)}))
        if got.age is not None:  # exports older than decode() did not clamp a regression head's ages
            got.age = np.clip(got.age, *self._age_range)
        return got

    def _call(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """One session run, stopped by a watchdog after ``call_timeout`` seconds."""
        import threading

        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # the stop is reported once, as our error, not also in onnxruntime's log
        watchdog = threading.Timer(self.call_timeout, setattr, (options, "terminate", True))
        watchdog.daemon = True
        watchdog.start()
        try:
            return self.session.run(self.outputs, feeds, options)
        except Exception:
            if options.terminate:
                raise ModelCallTimeout(
                    f"{self.path}: the model took longer than {self.call_timeout:g} s on one "
                    f"batch of {len(next(iter(feeds.values())))} and was stopped"
                ) from None
            raise
        finally:
            watchdog.cancel()


def read_onnx_meta(session: Any, path: str | os.PathLike[str]) -> CheckpointMeta:
    """The checkpoint metadata an agegender export stores in the ``metadata_props`` of the ONNX file ``path``,
    read through its onnxruntime ``session`` (the one reader of ONNX metadata)."""
    raw = session.get_modelmeta().custom_metadata_map.get("agegender")
    if raw is None:
        raise AgeGenderError(f"{path}: ONNX model without agegender metadata (not exported by agegender)")
    try:
        return CheckpointMeta.from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise AgeGenderError(f"{path}: {e}") from None


class FlipAveraged:
    """Test-time flip: each face is run as it is and mirrored, in one batch, and the two answers averaged.

    P(male) is averaged in logit space (the calibration's temperature divides both alike) and the age in years
    (the mean of the two age distributions' means); the interval's ends are averaged too, an approximation of
    the mixed distribution's percentiles. It doubles the model's work per face (DECISIONS.md: test-time flip).
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.meta, self.name, self.precision = backend.meta, f"{backend.name} + flip", backend.precision

    def set_threads(self, threads: int) -> None:
        self.backend.set_threads(threads)

    def run(self, crops: np.ndarray) -> Decoded:
        n = len(crops)
        both = self.backend.run(np.concatenate([crops, crops[:, :, ::-1]]))
        p = np.clip(both.p_male, 1e-12, 1 - 1e-12)
        logit = np.log(p) - np.log1p(-p)
        return Decoded(
            1 / (1 + np.exp(-(logit[:n] + logit[n:]) / 2)), *(_halves_mean(a, n) for a in (both.age, both.age_low, both.age_high))
        )


def _halves_mean(a: np.ndarray | None, n: int) -> np.ndarray | None:
    return None if a is None else (a[:n] + a[n:]) / 2


def load_backend(model: str | os.PathLike[str], device: str = "cpu", precision: str = "auto", flip: bool = False) -> Backend:
    """A run directory, a checkpoint .safetensors or an .onnx export, ready to run; ``flip`` averages each face
    with its mirror image (:class:`FlipAveraged`)."""
    backend = _load_backend(model, device, precision)
    return FlipAveraged(backend) if flip else backend


def _load_backend(model: str | os.PathLike[str], device: str, precision: str) -> Backend:
    path = resolve_model(model)
    if path.suffix == ".onnx":
        if device != "cpu":
            log.warning("%s: ONNX models run on the CPU; ignoring device %s", path, device)
        return OnnxBackend(path)
    if path.suffix == ".safetensors":
        return TorchBackend(path, device, precision)
    raise AgeGenderError(
        f"{path}: not a model file that predict, evaluate and serve run (a run directory, a "
        "checkpoint .safetensors or an .onnx export; .keras, .pt2 and SavedModel exports are for "
        "Keras, PyTorch and TF Serving)"
    )
